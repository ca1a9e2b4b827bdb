"""Joining a Ray cluster and reserving its resources, with errors that say what is missing."""

from __future__ import annotations

import logging
import socket

from replaceme.errors import ReplaceMeError

log = logging.getLogger("replaceme")


def require_ray():
    try:
        import ray
    except ImportError:
        raise ReplaceMeError("engine.backend: ray needs Ray; pip install 'replaceme[ray]'") from None
    return ray


def connect(address: str | None):
    """Join the cluster at ``address`` ('auto', host:port, ray://…); ``None`` joins the cluster of
    the Ray job this runs in (RAY_ADDRESS) or starts a local one."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ReplaceMeError(f"engine.address: cannot reach a Ray cluster at {address!r} ({_first_line(exc)}); "
                             "start one with `ray start --head` or fix the address") from None
    return ray


def _check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """Ray retries an unreachable GCS for minutes; a host:port that refuses connections is an error now."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ReplaceMeError(f"engine.address: {address!r} is not host:port, 'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ReplaceMeError(f"engine.address: cannot reach a Ray cluster at {address!r} ({exc.strerror or exc}); "
                             "start one with `ray start --head` or fix the address") from None


def reserve(bundles: list[dict[str, float]], *, timeout_s: float, what: str):
    """A placement group of ``bundles`` packed onto as few nodes as possible, or a clear error
    naming the resources the cluster could not grant within ``timeout_s``."""
    ray = require_ray()
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        wanted = _total(bundles)
        available = {k: v for k, v in ray.cluster_resources().items() if k in wanted}
        raise ReplaceMeError(
            f"engine: the cluster did not grant {what} ({_describe(wanted)} in all) within {timeout_s:g} s; "
            f"it has {_describe(available) or 'none of these'} in total. Lower engine.replicas, engine.stages, "
            "engine.gpus_per_stage or engine.cpus_per_stage, add nodes, or raise engine.resource_timeout_s"
        )
    return group


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return {k: v for k, v in total.items() if v > 0}


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
