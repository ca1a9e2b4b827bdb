"""Block selection: which criterion picks the block that a linear map replaces best.

For each trained model, every candidate block is scored on the unpruned stream of the calibration
set by each criterion of ``replaceme/selection.py`` and by the paper's angular distance; the
blocks each criterion chooses get their least-squares maps (alpha from the config default, fitted
on the whole calibration set, later blocks fitted on the stream with the earlier ones replaced,
as ``replaceme run`` does) and are measured by held-out perplexity on ``eval.jsonl``. Also
measured: plain dropping of the distance choice (no map) and the ORACLE (the candidate, or pair of
candidates, with the lowest held-out perplexity of all).

Criteria (lower = remove first):

* ``distance`` — mean angular distance ``arccos(cos(h_{s-1}, h_{e-1}))/π`` (the paper's, today's default);
* ``resid/tokens``, ``resid/target``, ``resid/stream``, ``resid/drop`` — the in-sample least-squares
  residual ``‖Y − X·T‖²`` from the statistics alone, per token, relative to ``‖Y‖²``, to
  ``Σ‖h_{e-1}‖²``, and to the residual of plain dropping;
* ``resid/token_stream`` — each token's residual relative to its own ``‖h_{e-1}‖²``, averaged (from
  statistics weighted by ``1/‖h_{e-1}‖²``, a stats-only stand-in for the cosine distance);
* ``heldout resid/stream`` — the same residual, ``T`` fitted on 3/4 of the calibration batches
  and measured on the statistics of the other 1/4;
* ``heldout cosine`` — mean per-token cosine distance of ``h_{s-1} − X + X·T`` to ``h_{e-1}`` on that
  held-out quarter (rows, not statistics);
* ``cosine (in-sample)`` — the same cosine distance, ``T`` fitted on the whole calibration set and
  measured on all of it (no held-out slice);
* ``heldout NLL top-3`` — next-token loss on the held-out quarter, measured (the rest of the model
  run on the folded stream) for the 3 best candidates by ``resid/stream``, which rank first by it;
  the other candidates follow in the order of ``resid/stream`` (num_A 2 may need them);
* ``heldout NLL all`` — the same loss measured for every candidate (what a criterion based on the
  calibration set's own loss can at best do).

With ``num_A`` 2 each criterion chooses greedily from its per-block scores, as the distance does.
The statistics come from a small layer-major loop over ``LayerwiseModel`` (``trace``), replaceable by
the engine's profile pass.

    python benchmarks/selection_quality.py --model examples/shakespeare-llama-16l --model DIR

Each model takes tens of minutes on 2 busy CPU cores (most of it the num_A 2 oracle: every pair of
blocks fitted and evaluated); ``--cache DIR`` keeps each model's figures there and reuses them, so models
can be measured in separate (or parallel) runs and recorded together; the perplexities measured are
kept there too (``<model>-perplexity.json``), so a run with another criterion measures only its new choices.

The other trained models (not in git; about 20 and 10 minutes on one free core) are rebuilt with

    python examples/build_bundled_model.py --family qwen2 --hidden 96 --steps 500 --warmup-steps 40 \\
        --threads 1 --out-dir DIR/shakespeare-qwen2-16l --data-dir DIR/data --results DIR/RESULTS.md
    python examples/build_bundled_model.py --family mistral --hidden 64 --steps 500 --warmup-steps 40 \\
        --threads 1 --out-dir DIR/shakespeare-mistral-16l --data-dir DIR/data --results DIR/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from _record import machine, record, table
from replaceme import recipe
from replaceme.checkpoint import Checkpoint
from replaceme.config import ReplaceMeConfig, validate_config
from replaceme.data import Batch
from replaceme.layerwise import LayerwiseModel
from replaceme.selection import (
    CosineSums,
    choose,
    distance_scores,
    fit_maps,
    rank_correlation,
    refine,
    residual_scores,
    shortlist,
)
from replaceme.solvers import solve_lstsq
from replaceme.stats import AngleSums, CandidateStats

CALIB, EVAL = "examples/data/calib.jsonl", "examples/data/eval.jsonl"
HELDOUT_EVERY = 4  # every 4th calibration batch is the held-out quarter
SHORTLIST = 3
WINNER = "resid/token_stream"  # compared with the distance, with paired standard errors, in the record
ALPHA = ReplaceMeConfig.model_fields["alpha"].default
Block = tuple[int, int]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the model, run layer by layer with every layer resident (the models here are tiny) -------

class Runner:
    def __init__(self, model: LayerwiseModel, batches: Sequence[Batch], layers: dict[int, torch.nn.Module]) -> None:
        self.model, self.batches, self.layers = model, list(batches), layers
        self._kwargs: dict[tuple[int, int], dict] = {}
        self._head = None

    def layer(self, index: int) -> torch.nn.Module:
        if index not in self.layers:
            self.layers[index] = self.model.load_layer(index)
        return self.layers[index]

    def kwargs(self, index: int, batch: int) -> dict:
        key = (self.model.kwargs_key(index), batch)
        if key not in self._kwargs:
            self._kwargs[key] = self.model.layer_kwargs(index, self.batches[batch].attention_mask)
        return self._kwargs[key]

    @torch.no_grad()
    def run(self, index: int, stream: list[torch.Tensor], tap: bool = False):
        """Layer ``index`` over every batch; with ``tap`` also the MLP output it adds to the residual."""
        layer, taps = self.layer(index), []
        hook = layer.get_submodule(self.model.family.residual_mlp_module).register_forward_hook(
            lambda _m, _i, out: taps.append(out)) if tap else None
        try:
            out = [layer(h, **self.kwargs(index, b)) for b, h in enumerate(stream)]
        finally:
            if hook is not None:
                hook.remove()
        return [o[0] if isinstance(o, tuple) else o for o in out], (taps if tap else None)

    def embed(self) -> list[torch.Tensor]:
        return [self.model.embed(b.input_ids, b.attention_mask) for b in self.batches]

    def mask(self, batch: int) -> torch.Tensor:
        return self.batches[batch].attention_mask.bool()

    @torch.no_grad()
    def token_losses(self, stream: list[torch.Tensor]) -> torch.Tensor:
        """Next-token loss of every non-padding token, from the stream after the last layer (float64)."""
        if self._head is None:
            self._head = self.model.head()
        norm, lm_head = self._head
        losses = []
        for batch, hidden in zip(self.batches, stream, strict=True):
            valid = batch.attention_mask[:, 1:].bool()
            logits = self.model.logits(hidden[:, :-1][valid], norm, lm_head)
            losses.append(torch.nn.functional.cross_entropy(logits, batch.input_ids[:, 1:][valid], reduction="none"))
        return torch.cat(losses).double()

    def nll(self, stream: list[torch.Tensor]) -> tuple[float, int]:
        """Summed next-token loss over non-padding tokens of the stream after the last layer."""
        losses = self.token_losses(stream)
        return float(losses.sum()), losses.numel()


@dataclass
class Trace:
    """The unpruned model's output ``h[k]`` and MLP output ``m[k]`` of every layer k, per batch."""

    h: list[list[torch.Tensor]]
    m: list[list[torch.Tensor]]


def trace(runner: Runner) -> Trace:
    stream, h, m = runner.embed(), [], []
    for index in range(runner.model.num_layers):
        stream, taps = runner.run(index, stream, tap=True)
        h.append(stream)
        m.append(taps)
    return Trace(h, m)


def fold(h: torch.Tensor, x: torch.Tensor, transform: torch.Tensor | None) -> torch.Tensor:
    """The stream after layer s-1 with the map folded in, ``h − X + X·T`` (None: the block dropped)."""
    if transform is None:
        return h
    x64 = x.to(torch.float64)
    return (h.to(torch.float64) - x64 + x64 @ transform).to(h.dtype)


def run_pruned(runner: Runner, t: Trace, folds: Sequence[tuple[Block, torch.Tensor | None]]) -> list[torch.Tensor]:
    """The stream after the last layer of the model with ``folds`` applied (blocks in order)."""
    (s, e), transform = folds[0]
    stream = [fold(h, x, transform) for h, x in zip(t.h[s - 1], t.m[s - 1], strict=True)]
    rest, index = list(folds[1:]), e
    while index < runner.model.num_layers:
        if rest and index == rest[0][0][0] - 1:
            (_, e), transform = rest.pop(0)
            stream, x = runner.run(index, stream, tap=True)
            stream = [fold(h, xb, transform) for h, xb in zip(stream, x, strict=True)]
            index = e
        else:
            stream, _ = runner.run(index, stream)
            index += 1
    return stream


def fit_sequential(runner: Runner, t: Trace, blocks: Sequence[Block]) -> list[tuple[Block, torch.Tensor]]:
    """Least-squares maps of ``blocks`` on the whole calibration set, each later block fitted on the
    stream of the model whose earlier blocks are already replaced (``sequential: true``)."""
    fitted, stream, index = [], None, 0
    for s, e in blocks:
        if stream is None:
            before, x, after = t.h[s - 1], t.m[s - 1], t.h[e - 1]
        else:
            for i in range(index, s - 1):
                stream, _ = runner.run(i, stream)
            before, x = runner.run(s - 1, stream, tap=True)
            after = before
            for i in range(s, e):
                after, _ = runner.run(i, after)
        stats = CandidateStats.zeros(runner.model.hidden_size)
        for b in range(len(runner.batches)):
            mask = runner.mask(b)
            stats.update(x[b][mask], before[b][mask], after[b][mask])
        transform = solve_lstsq(stats.stats, ALPHA)[0]
        fitted.append(((s, e), transform))
        stream, index = [fold(h, xb, transform) for h, xb in zip(before, x, strict=True)], e
    return fitted


# --- statistics of every candidate on the unpruned stream ---------------------------------------

@dataclass
class Profile:
    full: dict[Block, CandidateStats]  # every calibration batch
    fit: dict[Block, CandidateStats]  # the batches the held-out criteria fit on
    heldout: dict[Block, CandidateStats]  # the held-out quarter
    distances: dict[Block, float]


def profile(runner: Runner, t: Trace, size: int, heldout_batches: set[int]) -> Profile:
    num_layers, hidden = runner.model.num_layers, runner.model.hidden_size
    angles = AngleSums(size)
    fit, heldout, full = {}, {}, {}
    for s in range(1, num_layers - size + 1):
        block = (s, s + size)
        fit[block] = CandidateStats.zeros(hidden, weighted=True)
        heldout[block] = CandidateStats.zeros(hidden, weighted=True)
        for b in range(len(runner.batches)):
            mask = runner.mask(b)
            before, x, after = t.h[s - 1][b][mask], t.m[s - 1][b][mask], t.h[s + size - 1][b][mask]
            (heldout if b in heldout_batches else fit)[block].update(x, before, after)
            angles.add(s, before, after)
        full[block] = CandidateStats.zeros(hidden, weighted=True)
        full[block] += fit[block]
        full[block] += heldout[block]
    return Profile(full, fit, heldout, distance_scores(angles.distances()))


def heldout_runner(runner: Runner, t: Trace, heldout_batches: set[int]) -> tuple[Runner, Trace]:
    keep = sorted(heldout_batches)
    sub = Runner(runner.model, [runner.batches[b] for b in keep], runner.layers)
    return sub, Trace([[layer[b] for b in keep] for layer in t.h], [[layer[b] for b in keep] for layer in t.m])


def criteria(runner: Runner, t: Trace, p: Profile, heldout_batches: set[int]) -> dict[str, dict[Block, float]]:
    scores = {"distance": p.distances}
    for normalise in ("tokens", "target", "stream", "drop", "token_stream"):
        scores[f"resid/{normalise}"] = residual_scores(p.full, normalise=normalise, alpha=ALPHA)
    fitted = fit_maps(p.fit, alpha=ALPHA)
    scores["heldout resid/stream"] = residual_scores(p.fit, heldout=p.heldout, transforms=fitted, normalise="stream")
    held, held_trace = heldout_runner(runner, t, heldout_batches)
    cosine = CosineSums()
    for (s, e), transform in fitted.items():
        for b in range(len(held.batches)):
            mask = held.mask(b)
            cosine.add((s, e), held_trace.m[s - 1][b][mask], held_trace.h[s - 1][b][mask],
                       held_trace.h[e - 1][b][mask], transform)
    scores["heldout cosine"] = cosine.scores()
    loss = {}
    for block, transform in fitted.items():
        total, count = held.nll(run_pruned(held, held_trace, [(block, transform)]))
        loss[block] = total / count
    scores["heldout NLL all"] = loss
    top = shortlist(scores["resid/stream"], SHORTLIST)
    scores[f"heldout NLL top-{SHORTLIST}"] = refine(scores["resid/stream"], {b: loss[b] for b in top})
    in_sample, maps = CosineSums(), fit_maps(p.full, alpha=ALPHA)
    for (s, e), transform in maps.items():
        for b in range(len(runner.batches)):
            mask = runner.mask(b)
            in_sample.add((s, e), t.m[s - 1][b][mask], t.h[s - 1][b][mask], t.h[e - 1][b][mask], transform)
    scores["cosine (in-sample)"] = in_sample.scores()
    return scores


# --- measurement ----------------------------------------------------------------------------------

class Measure:
    """Held-out perplexity of a pruned model, cached per (blocks, drop)."""

    def __init__(self, calib: Runner, calib_trace: Trace, evaluation: Runner, eval_trace: Trace,
                 saved: Path | None = None) -> None:
        self.calib, self.calib_trace, self.evaluation, self.eval_trace = calib, calib_trace, evaluation, eval_trace
        self.saved = saved  # measured perplexities kept across runs (same model, data and code)
        self.cache: dict[str, float] = json.loads(saved.read_text()) if saved is not None and saved.exists() else {}

    def __call__(self, blocks: Sequence[Block], drop: bool = False) -> float:
        blocks = sorted(blocks)
        key = ",".join(f"{s}-{e}" for s, e in blocks) + (" drop" if drop else "")
        if key not in self.cache:
            folds = [(b, None) for b in blocks] if drop else fit_sequential(self.calib, self.calib_trace, blocks)
            total, count = self.evaluation.nll(run_pruned(self.evaluation, self.eval_trace, folds))
            self.cache[key] = math.exp(total / count)
        return self.cache[key]

    def save(self) -> None:
        if self.saved is not None:
            self.saved.parent.mkdir(parents=True, exist_ok=True)
            self.saved.write_text(json.dumps(self.cache, indent=0, sort_keys=True))

    def original(self) -> float:
        total, count = self.evaluation.nll(self.eval_trace.h[-1])
        return math.exp(total / count)


def pairs(num_layers: int, size: int) -> list[list[Block]]:
    """Every two non-overlapping blocks of ``size`` layers with a layer between them (merge_consecutive false)."""
    starts = range(1, num_layers - size + 1)
    return [[(a, a + size), (b, b + size)] for a, b in itertools.combinations(starts, 2) if b >= a + size + 1]


@dataclass
class Setting:
    size: int
    num_a: int
    chosen: dict[str, list[Block]]
    perplexity: dict[str, float]
    oracle: list[Block]
    oracle_ppl: float
    drop_ppl: float
    candidates: int
    spearman: dict[str, float] | None  # num_A 1: each criterion's scores vs the perplexity of every candidate


def evaluate_setting(measure: Measure, runner: Runner, t: Trace, size: int, num_a: int,
                     heldout_batches: set[int]) -> Setting:
    num_layers = runner.model.num_layers
    p = profile(runner, t, size, heldout_batches)
    scores = criteria(runner, t, p, heldout_batches)
    merge = num_a == 1
    chosen = {name: choose(s, num_blocks=num_a, merge_consecutive=merge, num_layers=num_layers)
              for name, s in scores.items()}
    perplexity = {name: measure(blocks) for name, blocks in chosen.items()}
    options = [[b] for b in p.full] if num_a == 1 else pairs(num_layers, size)
    measured = {tuple(o): measure(o) for o in options}
    oracle = min(measured, key=measured.get)
    spearman = None
    if num_a == 1:
        truth = {o[0]: v for o, v in measured.items()}
        spearman = {name: rank_correlation({b: v for b, v in s.items() if math.isfinite(v)}, truth)
                    for name, s in scores.items() if not name.startswith("heldout NLL top")}
    return Setting(size, num_a, chosen, perplexity, list(oracle), measured[oracle],
                   measure(chosen["distance"], drop=True), len(options), spearman)


def context(model_path: str) -> recipe.Context:
    config = validate_config(dict(model_path=model_path, dataset=CALIB, eval=EVAL,
                                  output_dir=f"{tempfile.mkdtemp()}/unused", batch_size=16, max_length=128))
    return recipe.Context(config, progress=False)


@dataclass
class Traced:
    """A model opened layer by layer, with its calibration and eval sets run through it unpruned."""

    model: LayerwiseModel
    calib: Runner
    calib_trace: Trace
    evaluation: Runner
    eval_trace: Trace


@contextlib.contextmanager
def traced(model_path: str) -> Iterator[Traced]:
    ctx = context(model_path)
    with Checkpoint(model_path) as checkpoint:
        model = ctx.layerwise(checkpoint)
        layers: dict[int, torch.nn.Module] = {}  # shared: each layer is loaded once for both sets
        calib, evaluation = Runner(model, ctx.batches, layers), Runner(model, ctx.eval_batches, layers)
        yield Traced(model, calib, trace(calib), evaluation, trace(evaluation))


def compare(model_path: str, first: list[Block], second: list[Block]) -> str:
    """Two pruned models (maps fitted as in the benchmark) on the same eval tokens: their perplexities
    and the paired standard error of the difference of their mean losses (how much of a gap is noise)."""
    with traced(model_path) as t:
        a, b = (t.evaluation.token_losses(run_pruned(t.evaluation, t.eval_trace,
                                                     fit_sequential(t.calib, t.calib_trace, blocks)))
                for blocks in (first, second))
    difference = a - b
    error = float(difference.std() / math.sqrt(difference.numel()))
    return (f"{Path(model_path).name}: {fmt_blocks(first)} {math.exp(a.mean()):.3f} vs {fmt_blocks(second)} "
            f"{math.exp(b.mean()):.3f}: {100 * (math.exp(difference.mean()) - 1):+.3f}% (paired standard error "
            f"{100 * error:.3f}% of the perplexity, {float(difference.mean()) / error:+.1f} SE)")


def benchmark_model(model_path: str, sizes: Sequence[int], saved: Path | None = None) -> dict:
    started = time.perf_counter()
    with traced(model_path) as t:
        model, calib, calib_trace, evaluation, eval_trace = t.model, t.calib, t.calib_trace, t.evaluation, t.eval_trace
        heldout_batches = {b for b in range(len(calib.batches)) if b % HELDOUT_EVERY == HELDOUT_EVERY - 1}
        measure = Measure(calib, calib_trace, evaluation, eval_trace, saved)
        num_layers = model.num_layers
        quarter = num_layers // 4
        settings = []
        for size, num_a in [(quarter, 1), (quarter // 2, 2)] + [(s, 1) for s in sizes if s != quarter]:
            log(f"{model_path}: blocks of {size}, num_A {num_a} ({time.perf_counter() - started:.0f}s)")
            settings.append(evaluate_setting(measure, calib, calib_trace, size, num_a, heldout_batches))
            measure.save()
        original = measure.original()
        calib_tokens = sum(int(b.attention_mask.sum()) for b in calib.batches)
        held_tokens = sum(int(calib.batches[b].attention_mask.sum()) for b in heldout_batches)
        eval_tokens = sum(int(b.attention_mask[:, 1:].sum()) for b in evaluation.batches)
    return dict(model=model_path, family=model.hf_config.model_type, layers=num_layers,
                hidden=model.hidden_size, original=original, settings=settings, calib_tokens=calib_tokens,
                heldout_tokens=held_tokens, eval_tokens=eval_tokens, seconds=time.perf_counter() - started)


# --- report ---------------------------------------------------------------------------------------

def fmt_blocks(blocks: Sequence[Block]) -> str:
    return ",".join(f"[{s},{e})" for s, e in blocks)


def shown(model: str) -> str:
    """A model's path as the record shows it: relative to the repository, else DIR/<name> (never a
    path of this machine)."""
    root = Path(__file__).resolve().parents[1]
    path = Path(model).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else f"DIR/{path.name}"


def main_table(results: list[dict]) -> tuple[list[str], list[list]]:
    """criterion × (model, num_A at 25%) → blocks chosen, perplexity."""
    headers, columns = ["criterion"], []
    for r in results:
        for setting in r["settings"][:2]:
            headers.append(f"{model_name(r)} {setting.num_a}×{setting.size}")
            columns.append(setting)
    names = list(columns[0].chosen)
    rows = [["ORACLE (best measured)"] + [f"{fmt_blocks(c.oracle)} **{c.oracle_ppl:.2f}**" for c in columns]]
    for name in names:
        row = [name + (" (paper)" if name == "distance" else "")]
        for c in columns:
            mark = " ✓" if c.perplexity[name] <= c.oracle_ppl + 1e-9 else ""
            row.append(f"{fmt_blocks(c.chosen[name])} {c.perplexity[name]:.2f}{mark}")
        rows.append(row)
    rows.append(["drop the distance choice (no map)"] + [f"{fmt_blocks(c.chosen['distance'])} {c.drop_ppl:.2f}"
                                                         for c in columns])
    return headers, rows


def model_name(result: dict) -> str:
    return f"{result['family']} {result['layers']}L/{result['hidden']}"


def sweep_table(results: list[dict]) -> tuple[list[str], list[list]]:
    """Regret (% above the oracle's perplexity) of each criterion in every setting measured."""
    names = list(results[0]["settings"][0].chosen)
    headers = ["model", "num_A×layers", "oracle"] + names
    rows = []
    for r in results:
        for s in r["settings"]:
            rows.append([model_name(r), f"{s.num_a}×{s.size}", f"{s.oracle_ppl:.2f}"] + [
                f"{100 * (s.perplexity[n] / s.oracle_ppl - 1):.1f}" for n in names])
    return headers, rows


def summary_table(results: list[dict]) -> tuple[list[str], list[list]]:
    """Per criterion: mean regret per model and overall, worst regret, oracle hits, settings where it
    ties or beats the distance (and its worst loss to it), mean rank correlation (num_A 1)."""
    names = list(results[0]["settings"][0].chosen)
    headers = ["criterion"] + [f"mean regret % {model_name(r)}" for r in results] + [
        "mean regret %", "worst %", "oracle hits", "≤ distance", "worst vs distance %", "mean ρ"]
    rows = []
    for name in names:
        regrets, per_model, versus, rhos = [], [], [], []
        for r in results:
            mine = [100 * (s.perplexity[name] / s.oracle_ppl - 1) for s in r["settings"]]
            per_model.append(sum(mine) / len(mine))
            regrets += mine
            versus += [100 * (s.perplexity[name] / s.perplexity["distance"] - 1) for s in r["settings"]]
            rhos += [s.spearman[name] for s in r["settings"] if s.spearman and name in s.spearman]
        rows.append([name] + [f"{m:.2f}" for m in per_model] + [
            f"{sum(regrets) / len(regrets):.2f}", f"{max(regrets):.1f}",
            f"{sum(x <= 1e-7 for x in regrets)}/{len(regrets)}",
            f"{sum(v <= 1e-7 for v in versus)}/{len(versus)}", f"{max(versus):+.1f}",
            f"{sum(rhos) / len(rhos):.2f}" if rhos else "—"])
    return headers, rows


def cached(path: Path) -> dict:
    result = json.loads(path.read_text())
    settings = []
    for raw in result["settings"]:
        raw["chosen"] = {name: [tuple(b) for b in blocks] for name, blocks in raw["chosen"].items()}
        raw["oracle"] = [tuple(b) for b in raw["oracle"]]
        settings.append(Setting(**raw))
    result["settings"] = settings
    return result


def save(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "settings": [s.__dict__ for s in result["settings"]]}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help="a trained checkpoint (repeat for several)")
    parser.add_argument("--sizes", default="2,3,5,6", help="more block sizes (num_A 1) for the regret sweep")
    parser.add_argument("--cache", type=Path, help="keep (and reuse) each model's figures in this folder")
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a shared, busy machine)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--compare", nargs=2, metavar="BLOCKS", help="only compare two choices on each model, "
                        "e.g. --compare '[[4,8]]' '[[7,11]]': perplexities and the paired standard error")
    args = parser.parse_args()
    models = args.model or ["examples/shakespeare-llama-16l"]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        first, second = ([tuple(b) for b in json.loads(c)] for c in args.compare)
        for model in models:
            print(compare(model, first, second))
        return
    results = []
    for model in models:
        path = args.cache / f"{Path(model).name}-sizes{'_'.join(map(str, sizes))}.json" if args.cache else None
        if path is not None and path.exists():
            log(f"{model}: figures reused from {path}")
            results.append(cached(path))
            continue
        results.append(benchmark_model(model, sizes, args.cache / f"{Path(model).name}-perplexity.json"
                                       if args.cache else None))
        if path is not None:
            save(results[-1], path)

    headers, rows = main_table(results)
    sweep_headers, sweep_rows = sweep_table(results)
    summary_headers, summary_rows = summary_table(results)
    print(table(headers, rows))
    print()
    print(table(sweep_headers, sweep_rows))
    print()
    print(table(summary_headers, summary_rows))
    if args.no_record:
        return
    paired = []
    for r in results:
        for setting in r["settings"]:
            mine, theirs = setting.chosen[WINNER], setting.chosen["distance"]
            if setting.perplexity[WINNER] != setting.perplexity["distance"] and (
                    setting is r["settings"][0] or setting is r["settings"][1]
                    or setting.perplexity[WINNER] > setting.perplexity["distance"]):
                log(f"paired comparison: {r['model']} {mine} vs {theirs}")
                paired.append(f"- {model_name(r)} {setting.num_a}×{setting.size}: "
                              + compare(r["model"], mine, theirs).split(": ", 1)[1])
    described = "; ".join(
        f"`{shown(r['model'])}` ({model_name(r)} = {r['family']}, {r['layers']} layers, hidden {r['hidden']}; "
        f"original perplexity {r['original']:.2f}; {r['calib_tokens']} calibration tokens, {r['heldout_tokens']} of "
        f"them held out; {r['eval_tokens']} predicted eval tokens)" for r in results)
    record("Block selection: which criterion picks the block a map replaces best", f"""
`python benchmarks/selection_quality.py {' '.join(f'--model {shown(m)}' for m in models)}` — {described}.
Calibration `{CALIB}` (the held-out criteria fit on 3/4 of its batches and score on every 4th),
perplexity on the held-out `{EVAL}`; batch 16, max_length 128, alpha {ALPHA}, maps least squares
fitted on the whole calibration set, later blocks on the stream with the earlier ones replaced, applied
in the stream in float32. Criteria are described in the script's docstring; ORACLE = the candidate
(or pair of candidates, num_A 2, a layer apart) with the lowest held-out perplexity of all; ✓ = the
oracle's perplexity. Models other than the bundled one are not in git: the script's docstring says
how to rebuild them. Machine: {machine()}.

25% of the layers removed: one block (num_A 1) or two blocks of half the size (num_A 2).

{table(headers, rows)}

Regret = % above the oracle's perplexity, in every setting measured: 25% as above, then one block of
other sizes (num_A×layers).

{table(sweep_headers, sweep_rows)}

Summary over those settings: oracle hits = settings where the criterion chose the oracle's blocks (or
blocks as good); ≤ distance = settings where its perplexity ties or beats the paper's distance choice,
and its worst loss to it; ρ = mean Spearman rank correlation of the criterion's scores with the measured
perplexity of every candidate (num_A 1; none for the shortlist, whose scores are ranks).

{table(summary_headers, summary_rows)}

`{WINNER}` against the distance wherever they differ at 25% and wherever it is behind (the same eval
tokens, so the standard error is that of the per-token loss difference; `--compare` measures one pair):

{chr(10).join(paired) or "- (no difference)"}
""")


if __name__ == "__main__":
    main()
