"""The pruned model's own Hugging Face model card, ``model/README.md``.

The merge writes it (what was removed, how, from which data, the command and config that made it);
the evaluate step writes it again with the perplexities it measured, so a card never states a number
that was not measured on the model next to it. The source's card is quoted below ours, its front
matter dropped and its headings demoted under "Original model card", never presented as ours.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from replaceme import __version__
from replaceme.config import HUB_REPO_ID, SECRET_WORDS, ReplaceMeConfig, _redact_input, redact_uri

CARD_FILE = "README.md"
TAGS = ["replaceme", "depth-pruning"]
# carried from the source's front matter: a pruned model is still bound by the source's licence
CARRIED_METADATA = ("license", "license_name", "license_link", "language")
PAPER = "https://arxiv.org/abs/2505.02819"
_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_HEADING = re.compile(r"^(#{1,6})(?=\s|$)")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")


def base_model(config: ReplaceMeConfig) -> str | None:
    """The Hub repo id the card names as its base model: ``output.base_model``, else ``model_path``
    when it is a Hub repo id. A local folder or a bucket URI is no Hub model (the Hub refuses them
    as ``base_model``), so the card then names none in its metadata."""
    if config.output.base_model:
        return config.output.base_model
    path = config.model_path
    if "://" in path or os.path.exists(path) or not HUB_REPO_ID.fullmatch(path):
        return None
    return path


def command_line(argv: Sequence[str] | None = None) -> str | None:
    """The command this process runs, as a user would type it, secrets redacted; None when this
    process is not replaceme's command line or a pipeline step (e.g. the Python API in a notebook)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return None
    program = argv[0].replace("\\", "/")
    folder, _, name = program.rpartition("/")
    if program.endswith("replaceme/__main__.py"):
        prefix = ["python", "-m", "replaceme"]
    elif name == "replaceme":
        prefix = ["replaceme"]
    elif folder.endswith("ops") and name.endswith(".py"):
        prefix = ["python", "-m", f"ops.{name.removesuffix('.py')}"]
    else:
        return None
    return shlex.join([*prefix, *(_redact_argument(a) for a in argv[1:])])


def _redact_argument(argument: str) -> str:
    key, sep, value = argument.partition("=")
    if sep and any(word in key.lower() for word in SECRET_WORDS):
        return f"{key}=***"
    return _redact_input(argument)


def render_card(config: ReplaceMeConfig, *, num_layers: int, blocks: Sequence[tuple[int, int]], source_uri: str,
                source_card: str | None = None, calibration: dict[str, Any] | None = None,
                solver: Sequence[dict[str, Any]] | None = None, metrics: dict[str, Any] | None = None,
                evaluation: dict[str, Any] | None = None, command: str | None = None,
                criterion: str | None = None) -> str:
    """The card's text. ``criterion``: what chose the blocks (selection.json's ``residual`` or ``distance``);
    ``calibration``: the calibrate step's record (data identity and tokens);
    ``solver``: per-block residuals; ``metrics``: what evaluate measured (None: not evaluated),
    ``evaluation``: the eval data's identity; ``source_card``: the source's README.md."""
    source_meta, source_body = split_front_matter(source_card) if source_card else ({}, "")
    removed = sum(e - s for s, e in blocks)
    base = base_model(config)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta.update({key: source_meta[key] for key in CARRIED_METADATA if source_meta.get(key)})
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": TAGS})
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n")
    relation = ("# base_model_relation is left out: the Hub's values are adapter, merge, quantized and finetune, and\n"
                "# a pruned model with a fitted linear map is none of them (the Hub infers one when it is absent).\n")
    name = base or source_uri.rstrip("/").rsplit("/", 1)[-1]  # a folder's name, not where it sits on a machine
    lines = [f"---\n{front}\n{relation}---", "",
             f"# {name}, depth-pruned with ReplaceMe ({removed} of {num_layers} layers removed)", "",
             f"This model is **{name}** with {removed} of its {num_layers} decoder layers removed by "
             f"replaceme {__version__}, an implementation of ReplaceMe "
             f"([arXiv 2505.02819]({PAPER})): each removed block is replaced by one linear map, estimated from "
             "a small calibration set with no training and folded into the weights of the layer before the cut. "
             "It is an ordinary checkpoint of the same architecture with fewer layers; it loads with "
             "`AutoModelForCausalLM.from_pretrained` and needs no custom code.", ""]
    lines += _pruning_section(config, num_layers, blocks, source_uri, calibration, solver, criterion)
    lines += _evaluation_section(metrics, evaluation)
    lines += _provenance_section(config, command)
    if source_body.strip():
        lines += ["## Original model card", "",
                  f"The text below is the card of the source model ({name}), kept for reference with its "
                  "headings demoted. It describes the model **before** pruning: none of its figures were "
                  "measured on this model.", "", demote_headings(source_body.strip(), 2), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _pruning_section(config: ReplaceMeConfig, num_layers: int, blocks: Sequence[tuple[int, int]], source_uri: str,
                     calibration: dict[str, Any] | None, solver: Sequence[dict[str, Any]] | None,
                     criterion: str | None) -> list[str]:
    c = config
    score = {"residual": "the residual their least-squares maps leave (per token, relative to the stream)",
             "distance": "angular distance"}.get(criterion or "", "the profile in distances.csv")
    chosen = "named in the config" if c.blocks else (
        f"chosen by {score}: the {c.num_A} lowest-scoring non-overlapping blocks of {c.layers_to_skip} "
        f"layers{', touching ones merged' if c.merge_consecutive else ''}")
    method = {"lstsq": "least squares (ridge)", "cosine": f"cosine-distance objective ({c.solver}, {c.loss} loss)"}[c.method]
    rows = [("Source model", f"`{_display(source_uri)}`"),
            ("Removed blocks", ", ".join(f"[{s}, {e})" for s, e in blocks)
             + f" (0-based, half-open, the source's layer numbering; {chosen})"),
            ("Layers", f"{num_layers} → {num_layers - sum(e - s for s, e in blocks)}"),
            ("Estimator", f"`method: {c.method}`, {method}{', diagonal map' if c.diag else ''}"),
            ("alpha (ridge term)", f"{c.alpha:g}")]
    if calibration:
        data = calibration.get("data", {})
        rows += [("Calibration data", f"`{_display(str(data.get('uri', c.dataset)))}`"
                  + (f" (column `{c.dataset_column}`)" if c.dataset_column else "")),
                 ("Calibration texts", f"{data.get('rows', '?')} texts, digest `{data.get('digest', '?')}`"),
                 ("Calibration tokens", _number(calibration.get("tokens")))]
    else:
        rows += [("Calibration data", f"`{_display(c.dataset)}` (texts and token count not recorded)")]
    if c.output.dtype != "source":
        rows += [("Weights dtype", f"{c.output.dtype} (cast from the source's)")]
    lines = ["## How it was pruned", "", "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
    if solver:
        lines += ["Relative residual of each block's map on the calibration set (0 is exact; plain dropping of the "
                  "block, for comparison):", "", "| block | tokens | map | plain dropping |", "| --- | --- | --- | --- |"]
        for detail in solver:
            s, e = detail["block"]
            lines.append(f"| [{s}, {e}) | {_number(detail.get('tokens'))} | {_number(detail.get('relative_residual'))} | "
                         f"{_number(detail.get('relative_residual_dropping'))} |")
        lines.append("")
    return lines


def _evaluation_section(metrics: dict[str, Any] | None, evaluation: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if not metrics or "perplexity_after" not in metrics:
        return lines + ["Not measured: this checkpoint has not been evaluated, so the card states no perplexity or "
                        "benchmark score. `replaceme evaluate` with `eval.dataset` set measures it and rewrites this card.",
                        ""]
    where = f" on `{_display(str(evaluation['uri']))}` ({evaluation.get('rows', '?')} texts, digest " \
            f"`{evaluation.get('digest', '?')}`)" if evaluation else ""
    lines += [f"Perplexity measured by replaceme{where}, {_number(metrics.get('eval_tokens'))} tokens:", "",
              "| model | perplexity |", "| --- | --- |",
              f"| source | {metrics['perplexity_before']:.4f} |", f"| this model | {metrics['perplexity_after']:.4f} |",
              "", f"Retention (source perplexity / this model's): {metrics['retention']:.4f}.", ""]
    for task, values in (metrics.get("lm_eval") or {}).items():
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            lines.append(f"- lm-eval `{task}`: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
    return lines + [""] if metrics.get("lm_eval") else lines


def _provenance_section(config: ReplaceMeConfig, command: str | None) -> list[str]:
    said = f"Written by `{command}`" if command else "Written through replaceme's Python API (no command line)"
    settings = yaml.safe_dump(config.public_dict(), sort_keys=False, allow_unicode=True).rstrip("\n")
    return ["## Reproduce", "", f"{said} with replaceme {__version__} and this configuration (secrets redacted):", "",
            "```yaml", settings, "```", ""]


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """A card's YAML front matter (``{}`` when absent or unreadable) and the text after it."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        meta = {}
    return (meta if isinstance(meta, dict) else {}), text[match.end():]


def demote_headings(text: str, levels: int) -> str:
    """Markdown ATX headings ``#`` … pushed down ``levels`` (at most ``######``), code fences untouched."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            line = _HEADING.sub(lambda m: "#" * min(6, len(m.group(1)) + levels), line)
        out.append(line)
    return "\n".join(out)


def _number(value: Any) -> str:
    """An int with thousands separators, a float to four significant digits, else "not recorded"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "not recorded"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _display(location: str) -> str:
    """A location as a card may show it: URIs without passwords."""
    return redact_uri(location) or location
