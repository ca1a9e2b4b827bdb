"""The merge on a Ray cluster: output shards written in parallel by Ray tasks, one task per shard.

A 140 GB checkpoint merged through one process is bound by one machine's disk and network, so the
shards are handed to tasks that Ray spreads over the nodes. The driver reads only metadata (the
index and the shard headers) to plan the merge; each task opens the source itself from its URI,
so no weights pass through the driver, and writes one output shard from scratch, so a task that
Ray retries (its worker died, or the store raised an ``OSError``) rewrites the same bytes. The
driver writes the index, the small files and, last, the config once every shard is in place.

Source and output must be URIs every worker can reach (an object store or a shared filesystem):
a bare local path means each node's own disk.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from replaceme.checkpoint import Checkpoint
from replaceme.distributed.cluster import require_ray
from replaceme.errors import ReplaceMeError
from replaceme.families import Family
from replaceme.merge import Block, ShardPlan, finish_merge, plan_merge, write_shard
from replaceme.progress import progress as progress_display
from replaceme.storage import filesystem, fsspec_options


@dataclass(frozen=True)
class ShardReport:
    """What one task did: which shard, how long it took and its process's peak memory meanwhile."""

    shard: str
    nbytes: int
    seconds: float
    peak_rss_mb: float | None  # None where /proc is not available
    node: str
    pid: int


@dataclass(frozen=True)
class _Where:
    """Everything a task needs to open the source and the output itself."""

    source_uri: str
    source_options: dict[str, Any]
    allow_pickle: bool
    out_uri: str
    out_options: dict[str, Any]
    family: Family


def merge_on_ray(source_uri: str, transforms: dict[Block, torch.Tensor], out_uri: str, *, workers: int,
                 endpoint_url: str | None = None, storage_options: dict[str, Any] | None = None,
                 cpus_per_worker: float = 1.0, timeout_s: float = 600.0, max_retries: int = 3,
                 allow_pickle: bool = False, progress: bool = True, shard_size: int | None = None,
                 dtype: str = "source", on_shard: Callable[[ShardReport], None] | None = None) -> dict:
    """Write the pruned model into ``out_uri`` with at most ``workers`` Ray tasks in flight, on the
    cluster this process is connected to (:func:`replaceme.distributed.cluster.connect`).

    Gives the same files as :func:`replaceme.merge.merge_checkpoint` with the same ``shard_size`` and
    ``dtype`` (the driver plans the shards; each task writes one, casting as planned). ``timeout_s`` bounds the wait
    for the next shard to finish: a cluster that cannot run the tasks fails instead of hanging.
    ``on_shard`` sees each finished shard's report. Returns the new config.
    """
    if workers < 1:
        raise ReplaceMeError(f"merge: workers must be at least 1, got {workers}")
    ray = require_ray()
    source_options = fsspec_options(source_uri, endpoint_url, storage_options)
    out_options = fsspec_options(out_uri, endpoint_url, storage_options)
    out_fs, out_root = filesystem(out_uri, field="output_dir", endpoint_url=endpoint_url, options=storage_options)
    out_fs.makedirs(out_root, exist_ok=True)
    with Checkpoint(source_uri, storage_options=source_options, allow_pickle=allow_pickle) as source:
        plan = plan_merge(source, transforms, shard_size=shard_size, dtype=dtype)
        # Full URIs (file:///abs/… for local paths): a worker's working directory is not the driver's.
        where = _Where(source.fs.unstrip_protocol(source.root), source_options, allow_pickle,
                       out_fs.unstrip_protocol(out_root), out_options, plan.family)
        task = ray.remote(_merge_shard).options(num_cpus=cpus_per_worker, max_retries=max_retries,
                                               retry_exceptions=[OSError], scheduling_strategy="SPREAD")
        # Shards with a fold (a matmul: the slowest) first, then the largest, so that no long shard
        # starts last while the other workers idle.
        shards = sorted(plan.shards, key=lambda s: (bool(plan.folds_for(s)), s.nbytes), reverse=True)
        jobs = [(shard, plan.folds_for(shard)) for shard in shards]
        with progress_display(total=sum(s.nbytes for s in shards), desc="merge", unit="B", unit_scale=True,
                              disable=not progress) as bar:
            for report in _run(ray, task, where, jobs, workers=workers, timeout_s=timeout_s,
                               cpus_per_worker=cpus_per_worker):
                bar.update(report.nbytes)
                if on_shard is not None:
                    on_shard(report)
        return finish_merge(source, plan, out_fs, out_root)


def _run(ray, task, where: _Where, jobs: list[tuple[ShardPlan, dict[str, torch.Tensor]]], *, workers: int,
         timeout_s: float, cpus_per_worker: float) -> Iterator[ShardReport]:
    """The tasks' reports as they finish, with at most ``workers`` in flight; if one fails for good,
    or the caller stops, the others are cancelled (their shards are unfinished, the config unwritten)."""
    waiting = list(jobs)
    in_flight: list[Any] = []  # Ray object refs
    try:
        while waiting or in_flight:
            while waiting and len(in_flight) < workers:
                shard, folds = waiting.pop(0)
                in_flight.append(task.remote(where, shard, folds))
            done, in_flight = ray.wait(in_flight, num_returns=1, timeout=timeout_s)
            if not done:
                raise _stalled(ray, timeout_s, workers, cpus_per_worker)
            yield ray.get(done[0])  # a task's last failure is raised here
    finally:
        for ref in in_flight:
            ray.cancel(ref)


def _merge_shard(where: _Where, shard: ShardPlan, folds: dict[str, torch.Tensor]) -> ShardReport:
    """The Ray task: open source and output from their URIs and write one shard."""
    started = time.perf_counter()
    _reset_peak_rss()
    out_fs, out_root = filesystem(where.out_uri, field="output_dir", options=where.out_options)
    with Checkpoint(where.source_uri, storage_options=where.source_options, allow_pickle=where.allow_pickle) as source:
        write_shard(source, shard, folds, where.family, out_fs, out_root)
    return ShardReport(shard.name, shard.nbytes, time.perf_counter() - started, _peak_rss_mb(),
                       socket.gethostname(), os.getpid())


def _stalled(ray, timeout_s: float, workers: int, cpus_per_worker: float) -> ReplaceMeError:
    cpus = ray.cluster_resources().get("CPU", 0)
    return ReplaceMeError(
        f"merge: no shard finished within {timeout_s:g} s ({workers} workers of {cpus_per_worker:g} CPU each; "
        f"the cluster has {cpus:g} CPU). Add nodes or lower the CPUs per worker if the tasks cannot start; "
        "raise the timeout if single shards take this long to copy"
    )


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM): Ray reuses worker processes across tasks."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024
