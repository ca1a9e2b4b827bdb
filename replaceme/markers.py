"""What each artefact of an output folder was built from: one completion marker per step.

A step (profile → calibrate → solve → merge → evaluate → register) writes its artefacts, then
``steps/<step>.json`` last. The marker holds a digest of the settings that shape the step's output
together with the execution id of the upstream step it consumed, so:

- a step whose marker matches these settings and a current upstream is done (skipped, and
  ``replaceme run`` resumes its staging folder this way);
- a changed setting changes the digest of that step, and (through the execution ids) of every
  step after it;
- a step whose upstream marker is missing or stale refuses to run, naming the command that
  rebuilds it.

``replaceme run``, the CLI's step commands and the pipeline steps in ``ops/`` all use these markers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from replaceme.config import ReplaceMeConfig
from replaceme.errors import ReplaceMeError
from replaceme.outputs import OutputDir

STEPS = ("profile", "calibrate", "solve", "merge", "evaluate", "register")
UPSTREAM = dict(zip(STEPS[1:], STEPS[:-1], strict=True))
DOWNSTREAM = {step: STEPS[STEPS.index(step) + 1:] for step in STEPS}

_DATA = ("model_path", "dataset", "dataset_column", "dataset_size", "dataset_subset", "batch_size", "max_length")
_SELECTION = ("blocks", "layers_to_skip", "num_A", "merge_consecutive", "min_distance_layer", "distances_path")


def _pick(config: ReplaceMeConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: getattr(config, key) for key in keys}


def statistics_settings(config: ReplaceMeConfig, dtype: str) -> dict[str, Any]:
    """Every setting that shapes the calibration statistics, with the dtype they are computed in
    (``compute_dtype`` resolved: ``auto`` is float32 on CPU and the checkpoint's dtype on GPUs).
    The activation store's run id and the calibrate step's digest are both made from it."""
    c = config
    settings = {**_pick(c, (*_DATA, *_SELECTION, "sequential")),
                "compute_dtype": dtype, "batches_per_shard": c.engine.batches_per_shard}
    if c.statistics_depend_on_solver:
        settings.update(c.solver_settings())
    return settings


def _calibrate_settings(c: ReplaceMeConfig, dtype: str) -> dict[str, Any]:
    return {**statistics_settings(c, dtype), "run_id": c.run_id, "activations": c.activations.model_dump(),
            "keeps_rows": c.method == "cosine"}


SETTINGS: dict[str, Callable[[ReplaceMeConfig, str], dict[str, Any]]] = {
    "profile": lambda c, dtype: {"blocks": c.blocks} if c.blocks else  # named: nothing measured
    {**_pick(c, (*_DATA, *_SELECTION)), "compute_dtype": dtype},
    "calibrate": _calibrate_settings,
    "solve": lambda c, dtype: c.solver_settings(),  # another alpha or estimator: re-solve, no model run
    # the layout of model/ and what its card names (the card's metrics come with evaluate)
    "merge": lambda c, dtype: {"shard_size": c.output.shard_bytes, "dtype": c.output.dtype,
                               "base_model": c.output.base_model},
    # (where the source perplexity is cached shapes nothing: eval.cache is left out)
    "evaluate": lambda c, dtype: {"eval": c.eval.model_dump(exclude={"cache"}) if c.eval else None,
                                  "compute_dtype": c.compute_dtype},
    "register": lambda c, dtype: c.mlflow.model_dump(),
}


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_id(config: ReplaceMeConfig, dtype: str) -> str:
    """``run_id``, or a digest of the settings that shape the statistics, so that a rerun of the same
    job finds (and resumes) its own shards in the activation store, and a GPU run never mixes its
    shards with a CPU run's."""
    return config.run_id or "run-" + digest(statistics_settings(config, dtype))


def step_digest(step: str, config: ReplaceMeConfig, dtype: str, upstream_run: str | None) -> str:
    return digest({"step": step, "settings": SETTINGS[step](config, dtype), "upstream_run": upstream_run})


def marker_name(step: str) -> str:
    return f"steps/{step}.json"


def read_marker(out: OutputDir, step: str) -> dict[str, Any] | None:
    if not out.exists(marker_name(step)):
        return None
    return json.loads(out.read_text(marker_name(step)))


def current_marker(step: str, config: ReplaceMeConfig, dtype: str, out: OutputDir) -> dict[str, Any] | None:
    """The step's marker when it matches these settings and a current upstream execution, else None."""
    marker = read_marker(out, step)
    if marker is None:
        return None
    upstream_run = None
    if step in UPSTREAM:
        upstream = current_marker(UPSTREAM[step], config, dtype, out)
        if upstream is None:
            return None
        upstream_run = upstream["run"]
    return marker if marker.get("digest") == step_digest(step, config, dtype, upstream_run) else None


def check_inputs(step: str, config: ReplaceMeConfig, dtype: str, out: OutputDir, artefacts: Mapping[str, str],
                 command: Callable[[str], str]) -> dict[str, Any] | None:
    """Refuse to start without the upstream artefacts and a current upstream marker; returns that
    marker. ``command(step)`` is how the user runs a step (``replaceme solve``, ``python -m ops.solve``)."""
    for name, producer in artefacts.items():
        if not out.exists(name):
            raise ReplaceMeError(f"{step}: {out.uri}/{name} is missing; run `{command(producer)}` with this config first")
    if step not in UPSTREAM:
        return None
    upstream = UPSTREAM[step]
    if read_marker(out, upstream) is None:
        raise ReplaceMeError(f"{step}: {out.uri}/{marker_name(upstream)} is missing; run `{command(upstream)}` "
                             "with this config first")
    marker = current_marker(upstream, config, dtype, out)
    if marker is None:
        raise ReplaceMeError(f"{step}: the {upstream} step in {out.uri} was run with other settings (or before an "
                             f"earlier step changed); run `{command(upstream)}` with this config first")
    return marker


def invalidate_after(out: OutputDir, step: str) -> None:
    """``step`` is about to change its artefacts: the markers of the steps after it, and the report
    that describes them, no longer hold (a report never describes a model it did not measure)."""
    for name in [*(marker_name(s) for s in (step, *DOWNSTREAM[step])), "report.json"]:
        out.remove(name)
