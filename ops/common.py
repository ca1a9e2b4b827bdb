"""What every pipeline step shares: its config (a file or URI), its command line, and the completion
markers of :mod:`replaceme.markers`, run by the same :class:`replaceme.recipe.StepRunner` as the CLI's
step commands and ``replaceme run``:

- a rerun with the same settings finds a matching marker and skips the step ("already done");
- a changed setting changes the digest of that step, and (through the execution ids) of every
  step after it, which therefore run again;
- a step whose upstream marker is missing or was made with other settings refuses to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from replaceme import recipe
from replaceme.cli import add_log_level, configure_logging
from replaceme.config import ReplaceMeConfig, load_config
from replaceme.errors import ReplaceMeError
from replaceme.lineage import PIPELINE_RUN_ENV
from replaceme.markers import marker_name
from replaceme.outputs import OutputDir

log = logging.getLogger("replaceme.ops")

# --- config --------------------------------------------------------------------------------------


def load_step_config(config_uri: str | None, overrides: list[str] | tuple[str, ...] = (),
                     output: str | None = None) -> ReplaceMeConfig:
    """The config from a local file or an fsspec URI (s3://…), ``--set`` overrides applied;
    ``output`` replaces ``output_dir``."""
    return load_config(config_uri, [*overrides, *([f"output_dir={json.dumps(output)}"] if output else [])])


def output_dir(config: ReplaceMeConfig) -> OutputDir:
    return OutputDir(config.output_dir, config.storage_options(config.output_dir))


def ops_command(step: str) -> str:
    return f"python -m ops.{step}"


def current_marker(step: str, config: ReplaceMeConfig, out: OutputDir) -> dict[str, Any] | None:
    """The step's marker when it matches these settings and a current upstream execution, else None."""
    runner = recipe.StepRunner(config, out, command=ops_command)
    return runner.current(step)


# --- running a step ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    help: str

    def run(self, config: str | None = None, *, overrides: list[str] | tuple[str, ...] = (), output: str | None = None,
            force: bool = False, pipeline_run_id: str | None = None, progress: bool = False) -> recipe.Outcome:
        """Run the step on the config at ``config`` (a file or URI), unless it is already done."""
        if pipeline_run_id:  # read by the report's lineage and by MLflow tracking
            os.environ[PIPELINE_RUN_ENV] = pipeline_run_id
        settings = load_step_config(config, overrides, output)
        return recipe.run_step(settings, self.name, progress=progress, command=ops_command, force=force)

    def main(self, argv: list[str] | None = None) -> int:
        args = _parser(self).parse_args(argv)
        try:
            configure_logging(args.log_level)
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
    parser.add_argument("--force", action="store_true", help=f"run even when steps/{step.name}.json says it is done")
    parser.add_argument("--pipeline-run-id", metavar="ID",
                        help=f"the Kubeflow run this step belongs to (exported as ${PIPELINE_RUN_ENV})")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress (bars, or log lines off a terminal)")
    add_log_level(parser)
    return parser


