"""Command line: ``replaceme run | profile | calibrate | solve | merge | evaluate | plan | log | compare``.

The pruning commands take ``--config FILE`` and any number of ``--set key=value`` overrides
(values parsed as YAML, dotted keys for nested settings). Errors a user can fix print one line,
no traceback, and exit with status 2; a finished run whose MLflow record failed exits with 3; a
storage failure (disk full, read-only, unreachable) exits with 4, also with one line; an interrupt
(Ctrl-C, a scheduler's SIGINT) prints one line and exits with 130.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from replaceme import __version__
from replaceme.errors import ReplaceMeError

log = logging.getLogger("replaceme")

COMMANDS = {
    "run": "prune end to end: select blocks, calibrate, solve, merge, evaluate",
    "profile": "measure block distances and choose the blocks to remove (distances.csv, blocks.json)",
    "calibrate": "run the model up to the last needed layer and solve each block's map (transforms.safetensors)",
    "solve": "re-solve the maps from saved statistics, e.g. with another alpha, without running the model",
    "merge": "fold the maps into a pruned copy of the checkpoint (model/)",
    "evaluate": "perplexity of the source and the pruned model on the eval text (report.json)",
    "plan": "GPUs, nodes, memory per stage, stored bytes and FLOPs of a distributed calibration, from config.json alone",
}
TRACKING_FAILED = 3  # exit status: outputs complete, MLflow record missing (re-log with `replaceme log`)
STORAGE_FAILED = 4  # exit status: reading or writing files failed (disk full, read-only, …)
INTERRUPTED = 130  # exit status after SIGINT, as shells report it (128 + 2)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_LEVEL_ENV = "REPLACEME_LOG_LEVEL"  # the level, for the processes a command starts (the MLflow child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replaceme",
        description="Training-free depth pruning (ReplaceMe): replace a block of decoder layers by one linear map.",
        epilog="Example: replaceme run --config examples/quickstart.yaml --set blocks=[[6,10]] --set alpha=0.1",
    )
    parser.add_argument("--version", action="version", version=f"replaceme {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", "-c", required=True, metavar="FILE", help="YAML config (see examples/quickstart.yaml)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key; the value is parsed as YAML (repeatable)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output")
        sub.add_argument("--quiet", "-q", action="store_true", help="no progress (bars, or log lines off a terminal)")
        add_log_level(sub)
        if name == "plan":
            _add_plan_arguments(sub)
    _add_log_command(commands)
    _add_compare_command(commands)
    return parser


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None, metavar="LEVEL",
                        help=f"replaceme's log level: {', '.join(LOG_LEVELS)} (default: ${LOG_LEVEL_ENV}, else INFO). "
                        "Off a terminal (Ray job, pod logs) progress is INFO log lines with percent, rate and ETA")


def configure_logging(level: str | None) -> None:
    """INFO lines on stderr; ``level`` (or $REPLACEME_LOG_LEVEL) for replaceme's own logger, passed on to
    the processes the command starts."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    level = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    if level not in LOG_LEVELS:
        raise ReplaceMeError(f"${LOG_LEVEL_ENV}: {level!r} is not one of {', '.join(LOG_LEVELS)}")
    logging.getLogger("replaceme").setLevel(level)
    os.environ[LOG_LEVEL_ENV] = level


def _add_log_command(commands: Any) -> None:
    text = "record a finished output folder in MLflow (e.g. after the tracking server was down)"
    sub = commands.add_parser("log", help=text, description=text)
    sub.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output folder or URI (holds report.json)")
    sub.add_argument("--config", "-c", metavar="FILE", help="config to take mlflow/storage settings from "
                     "(default: the one recorded in report.json)")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. mlflow.tracking_uri=http://host:5000 (repeatable)")
    add_log_level(sub)


def _add_compare_command(commands: Any) -> None:
    text = "compare the runs of an MLflow experiment: method, alpha, blocks, perplexity, retention, time"
    sub = commands.add_parser("compare", help=text, description=text)
    sub.add_argument("--experiment", "-e", default="replaceme", help="MLflow experiment name (default: replaceme)")
    sub.add_argument("--tracking-uri", metavar="URI",
                     help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder")
    sub.add_argument("--metric", dest="metrics", action="append", default=[], metavar="NAME",
                     help="add an MLflow metric as a column, e.g. solver/relative_residual (repeatable)")
    sub.add_argument("--sort", default="retention", metavar="COLUMN", help="sort by this column (default: retention)")
    sub.add_argument("--max-runs", type=_positive(int), default=100, metavar="N")
    sub.add_argument("--plot", metavar="PNG", help="also write a plot: removed fraction against --plot-metric")
    sub.add_argument("--plot-metric", default="retention", metavar="COLUMN")
    add_log_level(sub)


def _add_plan_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_argument("--tokens", type=_positive(int), metavar="N",
                     help="calibration tokens; overrides dataset_size x max_length, required without dataset_size")
    sub.add_argument("--gpus-per-node", type=_positive(int), default=8, metavar="N", help="GPUs per node (default 8)")
    sub.add_argument("--gpu-memory-gb", type=_positive(float), default=80.0, metavar="GB",
                     help="memory of one GPU in GB of 10^9 bytes (default 80)")
    sub.add_argument("--mfu", type=_positive(float), default=None, metavar="F",
                     help="model FLOPs utilisation the wall-time estimate assumes (default 0.4)")
    sub.add_argument("--gpu", metavar="NAME", help="the GPU the wall time is estimated for, e.g. H100, A100, L40S "
                     "(default: this machine's, if it has one)")
    sub.add_argument("--peak-tflops", type=_positive(float), metavar="N",
                     help="one device's peak TFLOP/s, for a GPU not in the table (overrides --gpu)")


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level)
        return _dispatch(args)
    except ReplaceMeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"error: {str(exc) or _interrupted(args.command)}", file=sys.stderr)
        return INTERRUPTED
    except OSError as exc:
        log.debug("storage failure", exc_info=True)
        print(f"error: {storage_failure(exc)}", file=sys.stderr)
        return STORAGE_FAILED


def entry() -> NoReturn:
    """The ``replaceme`` command: :func:`main`, then exit with its status."""
    exit_process(main())


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``. After an interrupt the process ends here and now, with 130: CPython
    marks an interrupt that surfaced inside code an extension ran through ``PyRun_*`` as unhandled
    (even once we caught it) and would kill itself with SIGINT at exit, hiding the status."""
    if code != INTERRUPTED:
        raise SystemExit(code)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the exit short
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def storage_failure(exc: OSError) -> str:
    """One line for a failed read or write: what failed, where, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where}; the run's partial output was removed, nothing was "
                "published. Free space or choose another output_dir, then rerun")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {exc.strerror}; choose a writable output_dir"
    return f"storage failure{where}: {exc.strerror or exc}; nothing was published"


def _interrupted(command: str) -> str:
    """What an interrupt of ``command`` left behind, for the one line the user sees."""
    if command == "run":  # the run is staged in <output>.incomplete and published only when complete
        return "interrupted; nothing was published (a rerun resumes from the steps it completed)"
    if command == "log":
        return "interrupted; the run may not be recorded in MLflow: run `replaceme log` again"
    if command in COMMANDS and command != "plan":
        return f"interrupted; `replaceme {command}` did not finish: run it again"
    return "interrupted"


def _dispatch(args: argparse.Namespace) -> int:
    from replaceme.config import load_config

    if args.command == "log":
        return _log(args)
    if args.command == "compare":
        return _compare(args)
    overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
    config = load_config(args.config, overrides)
    if args.command == "plan":
        return _plan(config, args)
    progress = not args.quiet
    if args.command == "run":
        return _run(config, progress)
    _step(args.command, config, progress)
    return 0


def _step(command: str, config: Any, progress: bool) -> None:
    """One step on the output folder, with the same completion markers as `run` and the ops steps:
    done steps are skipped, stale inputs refused, a model pass replaced only with --overwrite."""
    from replaceme import recipe

    outcome = recipe.run_step(config, command, progress=progress, force=config.overwrite, protect=True)
    if outcome.skipped:
        print(f"{command}: already done with these settings ({outcome.marker_uri}); pass --overwrite to redo it")
    elif command == "profile":
        print(json.dumps({"blocks": outcome.marker["blocks"]}))
    elif command in ("calibrate", "solve"):
        _print_solver(outcome.marker["solver"])
    elif command == "merge":
        print(f"pruned model written to {outcome.marker['artefacts']['model']}")
    elif command == "evaluate":
        print(json.dumps(outcome.marker["metrics"], indent=2))


def _run(config: Any, progress: bool) -> int:
    """``replaceme run``: :func:`replaceme.prune`, then its summary and MLflow run."""
    from replaceme.api import prune
    from replaceme.tracking import TrackingError

    try:
        result = prune(config, progress=progress)
    except TrackingError as exc:
        if exc.result is None:
            raise
        print(summary(exc.result.report, config.output_dir))
        print(f"error: {exc}", file=sys.stderr)
        return TRACKING_FAILED
    print(summary(result.report, config.output_dir))
    if result.mlflow_run_id is not None:
        print(_tracked(config, result.mlflow_run_id))
    return 0


def _tracked(config: Any, run_id: str) -> str:
    from replaceme.config import redact_uri
    from replaceme.tracking import tracking_uri

    return f"mlflow run      {run_id}  (experiment {config.mlflow.experiment!r} at {redact_uri(tracking_uri(config.mlflow))})"


def _track(config: Any, output_dir: str, tracker: Any) -> int:
    """Record a finished output folder in MLflow (``replaceme log``); a failure leaves the outputs as they are."""
    from replaceme.tracking import TrackingError

    try:
        run_id = tracker.log(output_dir)
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return TRACKING_FAILED
    print(_tracked(config, run_id))
    return 0


def _log(args: argparse.Namespace) -> int:
    from replaceme.config import load_config
    from replaceme.outputs import OutputDir
    from replaceme.tracking import Tracker

    if args.config:
        config = load_config(args.config, [*args.overrides, f"output_dir={args.output_dir}"])
    else:
        out = OutputDir(args.output_dir)
        if not out.exists("report.json"):
            raise ReplaceMeError(f"OUTPUT_DIR: {args.output_dir} has no report.json; only a finished run can be "
                                 "logged (for s3:// outputs pass --config with the storage settings)")
        recorded = json.loads(out.read_text("report.json"))["config"]
        _check_redacted_uris(recorded, args.overrides)
        config = load_config(None, [*_recorded_settings(recorded), *args.overrides, f"output_dir={args.output_dir}"])
    return _track(config, args.output_dir, Tracker(config))


def _recorded_settings(recorded: dict[str, Any]) -> list[str]:
    """The config recorded in report.json as ``--set`` items, without the redacted secrets."""
    recorded = {key: value for key, value in recorded.items() if value != "***"}
    recorded["storage"]["options"] = {k: v for k, v in recorded["storage"]["options"].items() if v != "***"}
    for section, key in REDACTED_URIS:
        if _is_redacted(recorded[section].get(key)):
            del recorded[section][key]
    return [f"{key}={json.dumps(value)}" for key, value in recorded.items()]


REDACTED_URIS = (("mlflow", "tracking_uri"), ("storage", "endpoint_url"))  # recorded as scheme://user:***@host


def _is_redacted(uri: Any) -> bool:
    from urllib.parse import urlsplit

    return isinstance(uri, str) and urlsplit(uri).password == "***"


def _check_redacted_uris(recorded: dict[str, Any], overrides: list[str]) -> None:
    """A URI recorded without its password cannot be used again; the user must give it."""
    from replaceme.tracking import credentials_hint

    given = {item.partition("=")[0].strip() for item in overrides}
    for section, key in REDACTED_URIS:
        uri = recorded.get(section, {}).get(key)
        if _is_redacted(uri) and not given & {section, f"{section}.{key}"}:
            hint = (credentials_hint(uri) if section == "mlflow" else
                    "pass --config with the storage settings, or --set storage.endpoint_url=<the URI>")
            raise ReplaceMeError(f"{section}.{key}: the run was made with a password in {section}.{key}, which "
                                 f"report.json does not keep; {hint}")


def _compare(args: argparse.Namespace) -> int:
    from replaceme.compare import compare_runs, format_table, plot_comparison
    from replaceme.config import MlflowConfig
    from replaceme.tracking import tracking_uri

    uri = args.tracking_uri or tracking_uri(MlflowConfig())
    field = ("--tracking-uri" if args.tracking_uri else
             "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking URI")
    table = compare_runs(uri, args.experiment, metrics=args.metrics, sort=args.sort, max_runs=args.max_runs,
                         field=field)
    print(format_table(table))
    if args.plot:
        Path(args.plot).write_bytes(plot_comparison(table, args.plot_metric))
        print(f"plot written to {args.plot}")
    return 0


def _plan(config: Any, args: argparse.Namespace) -> int:
    """Reads only config.json: no data, tokenizer or weights (recipe.Context would load them)."""
    from replaceme.planner import DEFAULT_MFU, find_peak, format_plan, local_gpu, plan, to_json

    if args.mfu is not None and args.mfu > 1:
        raise ReplaceMeError(f"--mfu: {args.mfu:g} is a share of the peak, at most 1 (e.g. 0.4)")
    peak = find_peak(args.gpu or (None if args.peak_tflops else local_gpu()), args.peak_tflops)
    result = plan(config, tokens=args.tokens, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
                  mfu=args.mfu or DEFAULT_MFU, peak=peak)
    print(to_json(result) if args.json else format_plan(result))
    return 0


def _print_solver(details: list[dict[str, Any]]) -> None:
    for d in details:
        print(f"block {d['block']}: relative residual {d['relative_residual']:.4f} "
              f"(dropping: {d['relative_residual_dropping']:.4f}), {d['tokens']} tokens")


def summary(report: dict[str, Any], output_dir: str) -> str:
    lines = [
        f"removed blocks  {report['blocks']}  ({report['removed_layers']} of {report['num_layers']} layers, "
        f"{report['removed_fraction']:.0%})",
    ]
    if "perplexity_before" in report:
        lines.append(f"perplexity      {report['perplexity_before']:.2f} -> {report['perplexity_after']:.2f}  "
                     f"(retention {report['retention']:.3f}, {report['eval_tokens']} eval tokens"
                     f"{', source from the cache' if report.get('perplexity_before_cached') else ''})")
    lines.append(f"outputs         {output_dir}  (model/, transforms.safetensors, blocks.json, report.json)")
    return "\n".join(lines)
