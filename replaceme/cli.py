"""Command line: ``replaceme run | profile | calibrate | solve | merge | evaluate | plan``.

Every command takes ``--config FILE`` and any number of ``--set key=value`` overrides (values
parsed as YAML, dotted keys for nested settings). Errors a user can fix print one line, no
traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

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
        sub.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        if name == "plan":
            _add_plan_arguments(sub)
    return parser


def _add_plan_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_argument("--tokens", type=_positive(int), metavar="N",
                     help="calibration tokens; overrides dataset_size x max_length, required without dataset_size")
    sub.add_argument("--gpus-per-node", type=_positive(int), default=8, metavar="N", help="GPUs per node (default 8)")
    sub.add_argument("--gpu-memory-gb", type=_positive(float), default=80.0, metavar="GB",
                     help="memory of one GPU in GB of 10^9 bytes (default 80)")


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return _dispatch(args)
    except ReplaceMeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from replaceme import recipe
    from replaceme.config import load_config
    from replaceme.outputs import OutputDir

    overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
    config = load_config(args.config, overrides)
    if args.command == "plan":
        return _plan(config, args)
    progress = not args.quiet
    if args.command == "run":
        report = recipe.run(config, progress=progress, on_step=lambda step: log.info("step: %s", step))
        print(summary(report, config.output_dir))
        return 0
    ctx = recipe.Context(config, progress=progress)
    out = OutputDir(config.output_dir, ctx.output_options)
    if args.command == "profile":
        print(json.dumps({"blocks": recipe.profile(ctx, out)}))
    elif args.command == "calibrate":
        blocks = ctx.blocks or recipe.saved_blocks(out) or recipe.profile(ctx, out)
        _print_solver(recipe.calibrate(ctx, out, blocks))
    elif args.command == "solve":
        _print_solver(recipe.solve(ctx, out))
    elif args.command == "merge":
        recipe.merge(ctx, out)
        print(f"pruned model written to {out.uri}/model")
    elif args.command == "evaluate":
        print(json.dumps(recipe.evaluate_and_record(ctx, out), indent=2))
    return 0


def _plan(config: Any, args: argparse.Namespace) -> int:
    """Reads only config.json: no data, tokenizer or weights (recipe.Context would load them)."""
    from replaceme.planner import format_plan, plan, to_json

    result = plan(config, tokens=args.tokens, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb)
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
                     f"(retention {report['retention']:.3f}, {report['eval_tokens']} eval tokens)")
    lines.append(f"outputs         {output_dir}  (model/, transforms.safetensors, blocks.json, report.json)")
    return "\n".join(lines)
