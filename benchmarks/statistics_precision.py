"""Statistics precision: what forming a batch's products in float32 (summed in float64) would cost.

On this CPU a float64 product runs at half the float32 rate, and the float64 plain statistics
(``BlockStats``: XᵀX and XᵀY) are most of what the one-pass profile adds to the forward. This
benchmark measures what float32 products would do to the maps and to the block choice:

* **trained models** — every candidate block of a quarter of the layers, its least-squares map
  fitted from float64 products and from float32 ones: the condition number of XᵀX, ‖ΔT‖/‖T‖, the
  relative change of the in-sample residual, and held-out perplexity with either map (the block
  folded in, the rest of the model run, ``examples/data/eval.jsonl``); and the residual criterion of
  ``selection: residual`` from float32 weighted products (as the engine forms them) against float64
  ones: each score's relative change, and whether the ranking of the candidates moves;
* **conditioning sweep** — random float32 rows with XᵀX's condition number set from 1e4 to 1e10
  (a trained 16-layer model already reaches 1e7): ‖ΔT‖/‖T‖ and the residual's relative change,
  in sample and on fresh rows of the same distribution.

    python benchmarks/statistics_precision.py [--model DIR ...]

The other trained models are rebuilt as ``benchmarks/selection_quality.py``'s docstring says.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import torch

from _record import machine, record, table
from replaceme.selection import stream_residuals
from replaceme.solvers import solve_lstsq
from replaceme.stats import BlockStats, CandidateStats
from selection_quality import Runner, Trace, run_pruned, traced

BUNDLED = "examples/shakespeare-llama-16l"
CONDITIONS = (1e4, 1e6, 1e8, 1e10)


def candidate_stats(runner: Runner, t: Trace, block: tuple[int, int], products: torch.dtype) -> CandidateStats:
    """A candidate's plain and weighted statistics over the calibration set, both formed in ``products``."""
    s, e = block
    stats = CandidateStats.zeros(runner.model.hidden_size, weighted=True)
    assert stats.weighted is not None
    for b in range(len(runner.batches)):
        mask = runner.mask(b)
        x, before, after = t.m[s - 1][b][mask], t.h[s - 1][b][mask], t.h[e - 1][b][mask]
        y = after - before + x
        stats.stats.update(x, y, products=products)
        norms_sq = after.to(torch.float64).square().sum(-1, keepdim=True)
        stats.stream_sq += float(norms_sq.sum())
        scale = norms_sq.rsqrt()
        stats.weighted.update(x.double() * scale, y.double() * scale, products=products)
    return stats


def perplexity_change(evaluation: Runner, eval_trace: Trace, block, reference: torch.Tensor,
                      other: torch.Tensor) -> tuple[float, float]:
    """Held-out perplexity with ``reference`` and the change with ``other`` (%), block folded in."""
    a = evaluation.token_losses(run_pruned(evaluation, eval_trace, [(block, reference)]))
    b = evaluation.token_losses(run_pruned(evaluation, eval_trace, [(block, other)]))
    return math.exp(float(a.mean())), 100 * (math.exp(float((b - a).mean())) - 1)


def measure_model(model_path: str) -> dict:
    with traced(model_path) as t:
        model, calib, calib_trace, evaluation, eval_trace = t.model, t.calib, t.calib_trace, t.evaluation, t.eval_trace
        size = model.num_layers // 4
        blocks = [(s, s + size) for s in range(1, model.num_layers - size + 1)]
        wide = {b: candidate_stats(calib, calib_trace, b, torch.float64) for b in blocks}
        narrow = {b: candidate_stats(calib, calib_trace, b, torch.float32) for b in blocks}
        rows = []
        for block in blocks:
            t64, t32 = solve_lstsq(wide[block].stats)[0], solve_lstsq(narrow[block].stats)[0]
            eigen = torch.linalg.eigvalsh(wide[block].stats.xtx)
            r64, r32 = wide[block].stats.residual_sq(t64), wide[block].stats.residual_sq(t32)
            ppl, change = perplexity_change(evaluation, eval_trace, block, t64, t32)
            rows.append(dict(block=block, condition=float(eigen[-1] / eigen[0]),
                             map_change=float((t32 - t64).norm() / t64.norm()), residual_change=(r32 - r64) / r64,
                             perplexity=ppl, perplexity_change=change))
    # The engine's mix: float64 plain statistics (they fit the map the criterion measures), float32 weighted ones.
    engine_mix = {b: CandidateStats(wide[b].stats, wide[b].stream_sq, narrow[b].weighted) for b in blocks}
    scores64, scores32 = stream_residuals(wide), stream_residuals(engine_mix)
    order64, order32 = sorted(blocks, key=scores64.get), sorted(blocks, key=scores32.get)
    return dict(name=f"{model.hf_config.model_type} {model.num_layers}L/{model.hidden_size}", rows=rows,
                score_change=max(abs(scores32[b] / scores64[b] - 1) for b in blocks),
                closest_gap=min(abs(scores64[a] / scores64[b] - 1) for a, b in itertools.pairwise(order64)),
                same_ranking=order64 == order32, chosen=(order64[0], order32[0]),
                tokens=wide[blocks[0]].stats.tokens)


def rows_with_condition(n: int, hidden: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` float32 rows whose Gram matrix has about the given condition number (singular values
    spread log-uniformly, random orientation)."""
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64, generator=generator))
    spread = torch.logspace(0, -0.5 * math.log10(condition), hidden, dtype=torch.float64)
    return (torch.randn(n, hidden, dtype=torch.float64, generator=generator) @ (basis * spread) @ basis.T).float()


def sweep(n: int = 16384, hidden: int = 256) -> list[list]:
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(hidden, hidden, dtype=torch.float64, generator=generator) / math.sqrt(hidden)
    out = []
    for condition in CONDITIONS:
        x, fresh = (rows_with_condition(n, hidden, condition, generator) for _ in range(2))
        noise = 1e-2 * torch.randn(n, hidden, dtype=torch.float64, generator=generator)
        y = (x.double() @ target + noise).float()
        y_fresh = (fresh.double() @ target + noise).float()
        maps = {}
        for products in (torch.float64, torch.float32):
            stats = BlockStats.zeros(hidden)
            for rows in range(0, n, 2048):
                stats.update(x[rows:rows + 2048], y[rows:rows + 2048], products=products)
            maps[products] = solve_lstsq(stats, warn=False)[0]
        measured = BlockStats.zeros(hidden)
        measured.update(x, y)  # the float64 statistics measure both maps
        r64, r32 = measured.residual_sq(maps[torch.float64]), measured.residual_sq(maps[torch.float32])
        f64, f32 = ((fresh.double() @ maps[p] - y_fresh.double()).square().sum() for p in (torch.float64, torch.float32))
        eigen = torch.linalg.eigvalsh(measured.xtx)
        out.append([f"{float(eigen[-1] / eigen[0]):.1e}",
                    f"{float((maps[torch.float32] - maps[torch.float64]).norm() / maps[torch.float64].norm()):.1e}",
                    f"{(r32 - r64) / r64:+.1e}", f"{float(f32 / f64 - 1):+.1e}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help=f"a trained checkpoint (default: {BUNDLED})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    models = [measure_model(m) for m in args.model or [BUNDLED]]
    swept = sweep()
    per_block = [[m["name"], f"[{r['block'][0]},{r['block'][1]})", f"{r['condition']:.1e}", f"{r['map_change']:.1e}",
                  f"{r['residual_change']:+.1e}", f"{r['perplexity']:.3f}", f"{r['perplexity_change']:+.1e}"]
                 for m in models for r in m["rows"]]
    ranking = [[m["name"], f"{m['score_change']:.1e}", f"{m['closest_gap']:.1e}", "yes" if m["same_ranking"] else "**no**",
                "[{},{}) / [{},{})".format(*m["chosen"][0], *m["chosen"][1])] for m in models]
    paths = args.model or [BUNDLED]
    command = " ".join(f"--model {m if m == BUNDLED else 'DIR/' + Path(m).name}" for m in paths)
    body = f"""`python benchmarks/statistics_precision.py {command}` — their calibration and eval sets as
`selection_quality.py` reads them (batch 16, max_length 128, {models[0]['tokens']:,} calibration tokens). *float32
products*: each batch's XᵀX and XᵀY formed in float32 and summed in float64, against float64 products (the engine's
plain statistics). Machine: {machine()}. Whole benchmark: {time.perf_counter() - started:.0f} s.

Plain statistics, every candidate block of a quarter of the layers, its map fitted both ways (α = 0):

{table(["model", "block", "cond(XᵀX)", "‖ΔT‖/‖T‖", "in-sample residual change", "held-out ppl (float64)",
        "ppl change %"], per_block)}

Conditioning sweep (16,384 random float32 rows, hidden 256, Y = X·T + 1 % noise, products over 2,048 rows):

{table(["cond(XᵀX)", "‖ΔT‖/‖T‖", "in-sample residual change", "residual change on fresh rows"], swept)}

The residual criterion (`selection: residual`) as the engine gathers it (the weighted statistics from float32
products, the map it measures from float64 ones) against all float64:

{table(["model", "largest score change", "closest gap between two candidates' scores", "same ranking",
        "chosen (float64 / float32)"], ranking)}
"""
    print(body)
    record("Statistics precision: float32 products against float64", body)


if __name__ == "__main__":
    main()
