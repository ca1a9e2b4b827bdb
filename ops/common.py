"""What every pipeline step shares: its config (a file or URI), completion markers, input checks.

A step writes its artefacts into the output folder, then ``steps/<step>.json`` last. The marker
holds a digest of the settings that shape the step's output together with the execution id of
the upstream step it consumed, so:

- a rerun with the same settings finds a matching marker and skips the step ("already done");
- a changed setting changes the digest of that step, and (through the execution ids) of every
  step after it, which therefore run again;
- a step whose upstream marker is missing or was made with other settings refuses to run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ops import STEPS
from replaceme import __version__
from replaceme.config import ReplaceMeConfig, load_config
from replaceme.errors import ReplaceMeError
from replaceme.lineage import PIPELINE_RUN_ENV
from replaceme.outputs import OutputDir
from replaceme.tracking import tracking_uri

log = logging.getLogger("replaceme.ops")

UPSTREAM = dict(zip(STEPS[1:], STEPS))

# --- the settings that shape each step's output ------------------------------------------------

_DATA = ("model_path", "dataset", "dataset_column", "dataset_size", "dataset_subset", "batch_size", "max_length",
         "compute_dtype", "allow_pickle")


def _pick(config: ReplaceMeConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: _where(getattr(config, key)) if key in _PATHS else getattr(config, key) for key in keys}


_PATHS = ("model_path", "dataset", "distances_path")


def _where(path: str | None) -> str | None:
    """A local path as an absolute one, so that a step run from another folder matches."""
    if path is None or "://" in path or not os.path.exists(path):
        return path  # a URI, or a Hugging Face name
    return os.path.abspath(path)


def _calibrate_settings(c: ReplaceMeConfig) -> dict[str, Any]:
    settings = {**_pick(c, ("sequential", "run_id")), "activations": c.activations.model_dump(),
                "batches_per_shard": c.engine.batches_per_shard,  # names the run in the activation store
                "keeps_rows": c.method == "cosine"}
    if c.statistics_depend_on_solver:
        settings.update(c.solver_settings())
    return settings


SETTINGS: dict[str, Callable[[ReplaceMeConfig], dict[str, Any]]] = {
    "profile": lambda c: _pick(c, (*_DATA, "blocks", "layers_to_skip", "num_A", "merge_consecutive",
                                   "min_distance_layer", "distances_path")),
    "calibrate": _calibrate_settings,
    "solve": ReplaceMeConfig.solver_settings,  # alpha or the estimator changed: re-solve from the saved statistics
    "merge": lambda c: {},
    "evaluate": lambda c: {"eval": {**c.eval.model_dump(), "dataset": _where(c.eval.dataset)} if c.eval else None},
    "register": lambda c: {**c.mlflow.model_dump(), "tracking_uri": tracking_uri(c.mlflow)},
}


# --- config --------------------------------------------------------------------------------------


def load_step_config(config_uri: str | None, overrides: list[str] | tuple[str, ...] = (),
                     output: str | None = None) -> ReplaceMeConfig:
    """The config from a local file or an fsspec URI (s3://…), ``--set`` overrides applied;
    ``output`` replaces ``output_dir``."""
    config = load_config(config_uri, overrides)
    return config.model_copy(update={"output_dir": output}) if output else config


def output_dir(config: ReplaceMeConfig) -> OutputDir:
    return OutputDir(config.output_dir, config.storage_options(config.output_dir))


# --- markers and digests -------------------------------------------------------------------------


def marker_name(step: str) -> str:
    return f"steps/{step}.json"


def read_marker(out: OutputDir, step: str) -> dict[str, Any] | None:
    if not out.exists(marker_name(step)):
        return None
    return json.loads(out.read_text(marker_name(step)))


def digest(step: str, config: ReplaceMeConfig, upstream_run: str | None) -> str:
    shaping = {"step": step, "settings": SETTINGS[step](config), "upstream_run": upstream_run}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def current_marker(step: str, config: ReplaceMeConfig, out: OutputDir) -> dict[str, Any] | None:
    """The step's marker when it matches these settings and a current upstream execution, else None."""
    marker = read_marker(out, step)
    if marker is None:
        return None
    upstream_run = None
    if step in UPSTREAM:
        upstream = current_marker(UPSTREAM[step], config, out)
        if upstream is None:
            return None
        upstream_run = upstream["run"]
    return marker if marker.get("digest") == digest(step, config, upstream_run) else None


def _missing(step: str, uri: str, producer: str) -> ReplaceMeError:
    return ReplaceMeError(f"{step}: {uri} is missing; run `python -m ops.{producer}` with this config first")


def check_inputs(step: str, config: ReplaceMeConfig, out: OutputDir, artefacts: Mapping[str, str]) -> dict | None:
    """Refuse to start without the upstream artefacts and a current upstream marker; returns that marker."""
    for name, producer in artefacts.items():
        if not out.exists(name):
            raise _missing(step, f"{out.uri}/{name}", producer)
    if step not in UPSTREAM:
        return None
    upstream = UPSTREAM[step]
    if read_marker(out, upstream) is None:
        raise _missing(step, f"{out.uri}/{marker_name(upstream)}", upstream)
    marker = current_marker(upstream, config, out)
    if marker is None:
        raise ReplaceMeError(f"{step}: the {upstream} step in {out.uri} was run with other settings (or before "
                             f"an earlier step changed); run `python -m ops.{upstream}` with this config first")
    return marker


# --- running a step ------------------------------------------------------------------------------


@dataclass
class StepRun:
    """What a step's work function gets: the config, the opened run (if the step needs one), the
    output folder and the markers of the steps before it."""

    config: ReplaceMeConfig
    out: OutputDir
    ctx: Any = None  # replaceme.recipe.Context
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    step: str
    skipped: bool
    marker_uri: str
    marker: dict[str, Any]


@dataclass(frozen=True)
class Step:
    name: str
    work: Callable[[StepRun], dict[str, Any]]  # returns the marker's extra fields, "artefacts" among them
    help: str
    inputs: Callable[[ReplaceMeConfig], dict[str, str]] = lambda config: {}  # artefact -> step that makes it
    needs_model: bool = True  # opens recipe.Context (tokenizer, data, checkpoint index)

    def run(self, config: str | None = None, *, overrides: list[str] | tuple[str, ...] = (), output: str | None = None,
            force: bool = False, pipeline_run_id: str | None = None, progress: bool = False) -> Outcome:
        """Run the step on the config at ``config`` (a file or URI), unless it is already done."""
        if pipeline_run_id:  # read by the report's lineage and by MLflow tracking
            os.environ[PIPELINE_RUN_ENV] = pipeline_run_id
        settings = load_step_config(config, overrides, output)
        out = output_dir(settings)
        upstream = check_inputs(self.name, settings, out, self.inputs(settings))
        expected = digest(self.name, settings, upstream["run"] if upstream else None)
        marker_uri = f"{out.uri}/{marker_name(self.name)}"
        done = read_marker(out, self.name)
        if done and done.get("digest") == expected and not force:
            log.info("%s: already done (%s)", self.name, marker_uri)
            return Outcome(self.name, True, marker_uri, done)
        if done:  # a crash from here on must not leave a marker that looks current
            out.fs.rm(out.path(marker_name(self.name)))
        marker = self._execute(settings, out, expected, upstream, progress)
        out.write_json(marker_name(self.name), marker)
        log.info("%s: done (%s)", self.name, marker_uri)
        return Outcome(self.name, False, marker_uri, marker)

    def _execute(self, config: ReplaceMeConfig, out: OutputDir, expected: str, upstream: dict | None,
                 progress: bool) -> dict[str, Any]:
        started, clock = _now(), time.perf_counter()
        job = StepRun(config, out, upstream={s: m for s in STEPS[:STEPS.index(self.name)]
                                             if (m := read_marker(out, s)) is not None})
        if self.needs_model:
            from replaceme.recipe import Context

            job.ctx = Context(config, progress=progress)
        try:
            extra = self.work(job)
        finally:
            if job.ctx:
                job.ctx.close_engine()  # a Ray profile's stages hold CPUs and GPUs until then
        return {
            "step": self.name,
            "digest": expected,
            "run": uuid.uuid4().hex,  # this execution; the next step's digest names it
            "upstream_run": upstream["run"] if upstream else None,
            "pipeline_run_id": os.environ.get(PIPELINE_RUN_ENV),
            "replaceme_version": __version__,
            "started": started,
            "finished": _now(),
            "seconds": round(time.perf_counter() - clock, 3),
            "timings": dict(job.ctx.timings) if job.ctx else {},
            "step_memory": dict(job.ctx.step_memory) if job.ctx else {},
            **extra,
        }

    def main(self, argv: list[str] | None = None) -> int:
        args = _parser(self).parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        try:
            outcome = self.run(args.config, overrides=args.overrides, output=args.output, force=args.force,
                               pipeline_run_id=args.pipeline_run_id, progress=not args.quiet)
        except ReplaceMeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # the marker is written last: the step is not done
            print(f"error: interrupted; the {self.name} step did not finish and wrote no {marker_name(self.name)}: "
                  "run it again", file=sys.stderr)
            return 130
        print(json.dumps({"step": self.name, "status": "already done" if outcome.skipped else "done",
                          "marker": outcome.marker_uri}))
        return 0


def _parser(step: Step) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m ops.{step.name}", description=step.help)
    parser.add_argument("--config", "-c", metavar="FILE_OR_URI",
                        help="YAML config: a local file or an fsspec URI (s3://…); optional when --set gives every key")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; the value is parsed as YAML (repeatable)")
    parser.add_argument("--output", metavar="URI", help="output folder (replaces output_dir)")
    parser.add_argument("--force", action="store_true", help="run even when steps/%s.json says it is done" % step.name)
    parser.add_argument("--pipeline-run-id", metavar="ID",
                        help=f"the Kubeflow run this step belongs to (exported as ${PIPELINE_RUN_ENV})")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def artefact_uris(out: OutputDir, *names: str) -> dict[str, str]:
    return {name: f"{out.uri}/{name}" for name in names}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
