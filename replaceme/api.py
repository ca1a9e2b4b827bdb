"""The Python API: :func:`prune` runs what ``replaceme run`` runs and returns a :class:`PruneResult`.

``replaceme run`` is a thin layer over it: the same staging, resume, checks and MLflow record.
Errors are raised as :class:`~replaceme.errors.ReplaceMeError` (a failed MLflow record as its
subclass :class:`~replaceme.tracking.TrackingError`, whose ``result`` holds the complete outputs).

    from replaceme import prune

    result = prune("examples/quickstart.yaml", output_dir="outputs/api", alpha=0.1)
    result.blocks, result.report["retention"], result.mlflow_run_id
    maps = result.maps()            # {(start, end): [hidden, hidden] float32 tensor}, read on demand
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replaceme.blocks import Block
from replaceme.config import ReplaceMeConfig, read_yaml, validate_config
from replaceme.errors import Interrupted
from replaceme.lineage import warn_about_ray_job_paths

if TYPE_CHECKING:
    import torch

log = logging.getLogger("replaceme")


@dataclass(frozen=True)
class PruneResult:
    """What a finished run produced; everything also lies in ``output_dir``."""

    blocks: list[Block]  # removed blocks, 0-based, half-open, original numbering (blocks.json)
    output_dir: str  # local folder or URI of the published outputs
    report: dict[str, Any]  # report.json: perplexities, retention, solver residuals, seconds, lineage, config
    mlflow_run_id: str | None  # None when mlflow.enabled is false
    config: ReplaceMeConfig = field(repr=False)

    @property
    def transforms_uri(self) -> str:
        """The maps, one float32 ``[hidden, hidden]`` tensor per block, key ``"{s}-{e}"``."""
        return f"{self.output_dir.rstrip('/')}/transforms.safetensors"

    @property
    def model_dir(self) -> str | None:
        """The pruned checkpoint (``AutoModelForCausalLM.from_pretrained``); None with ``save_transform_only``."""
        return None if self.config.save_transform_only else f"{self.output_dir.rstrip('/')}/model"

    def maps(self) -> dict[Block, torch.Tensor]:
        """Each block's map, read from ``transforms.safetensors`` now (not kept in memory by the result)."""
        from replaceme.outputs import OutputDir
        from replaceme.recipe import load_transforms

        return load_transforms(OutputDir(self.output_dir, self.config.storage_options(self.output_dir)))


def prune(config: ReplaceMeConfig | str | Path | Mapping[str, Any] | None = None, /, *, progress: bool = True,
          on_step: Callable[[str], None] | None = None, **settings: Any) -> PruneResult:
    """Prune end to end (profile, calibrate, solve, merge, evaluate) and record the run in MLflow.

    ``config``: a :class:`ReplaceMeConfig`, the path or URI of a YAML config, or a mapping of its keys;
    ``settings``: config keys that override it (``alpha=0.1``, ``mlflow={"enabled": False}``; a
    mapping is merged into the section it names). Without ``config`` the settings are the whole config.
    ``on_step`` is called with each step's name as it starts (default: an INFO log line).
    Raises :class:`ReplaceMeError` for anything the user can fix; :class:`TrackingError` (with
    ``.result``) when only the MLflow record failed; ``OSError`` for storage failures.
    """
    from replaceme import recipe

    resolved = resolve_config(config, settings)
    warn_about_ray_job_paths(resolved, tracked=True)
    tracker = _tracker(resolved)  # opens MLflow in a child process while the run computes
    try:
        report = recipe.run(resolved, progress=progress, on_step=on_step or (lambda step: log.info("step: %s", step)))
    except BaseException:
        if tracker is not None:
            tracker.cancel()
        raise
    result = PruneResult([(int(s), int(e)) for s, e in report["blocks"]], resolved.output_dir, report, None, resolved)
    if tracker is None:
        return result
    from replaceme.tracking import TrackingError

    try:
        run_id = tracker.log(resolved.output_dir)
    except TrackingError as exc:
        exc.result = result
        raise
    except KeyboardInterrupt:
        tracker.cancel()
        raise Interrupted(f"interrupted; the outputs in {resolved.output_dir} are complete but may not be recorded "
                          f"in MLflow: record them with `replaceme log {resolved.output_dir}`") from None
    return PruneResult(result.blocks, result.output_dir, report, run_id, resolved)


def resolve_config(config: ReplaceMeConfig | str | Path | Mapping[str, Any] | None,
                   settings: Mapping[str, Any]) -> ReplaceMeConfig:
    """One validated config from a config object, YAML path or mapping, overridden by ``settings``."""
    if isinstance(config, ReplaceMeConfig) and not settings:
        return config
    if isinstance(config, ReplaceMeConfig):
        data: dict[str, Any] = config.model_dump()  # python mode: the token stays a SecretStr
        resolved = validate_config(_merged(data, settings))
        kept = {k: v for k, v in config._relative_outputs.items() if k.split(".")[0] not in settings}
        resolved._relative_outputs = {**kept, **resolved._relative_outputs}  # as given, before made absolute
        return resolved
    elif isinstance(config, (str, Path)):
        data = read_yaml(config)
    elif config is None:
        data = {}
    else:
        data = dict(config)
    return validate_config(_merged(data, settings))


def _merged(base: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in settings.items():
        if key == "eval" and isinstance(merged.get(key), str):  # the path shorthand, being refined
            merged[key] = {"dataset": merged[key]}
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _tracker(config: ReplaceMeConfig) -> Any:
    if not config.mlflow.enabled:
        return None
    from replaceme.tracking import TrackerProcess

    return TrackerProcess(config)

