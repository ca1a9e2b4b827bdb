"""Calibration speed: ours (layer by layer, only the layers a block needs) vs a plain HF forward.

The published ReplaceMe code calibrates by loading the full model and running every batch
through ``model(..., output_hidden_states=True)``. Ours loads and runs only layers 0..e-1 for a
block [s, e), accumulates the float64 statistics and solves. Both start from the checkpoint on
disk and see the same batches; each is timed several times, alternating, and the medians are
compared. Target: ours ≤ 1.15 × (e / L) × baseline.

    python benchmarks/calibration_speed.py [--block 5 9] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from _record import machine, record, table
from replaceme import recipe
from replaceme.checkpoint import Checkpoint
from replaceme.config import validate_config
from replaceme.engine import LocalEngine
from replaceme.solvers import solve_lstsq


def hf_forward(model_path: str, batches) -> float:
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return time.perf_counter() - started


def ours(ctx: recipe.Context, model_path: str, block: tuple[int, int]) -> float:
    started = time.perf_counter()
    with Checkpoint(model_path) as checkpoint:
        engine = LocalEngine(ctx.layerwise(checkpoint), ctx.batches, progress=False)
        engine.calibrate([block], lambda capture: solve_lstsq(capture.stats)[0])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="examples/shakespeare-llama-16l")
    parser.add_argument("--data", default="examples/data/calib.jsonl")
    parser.add_argument("--block", type=int, nargs=2, default=[5, 9])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = validate_config(dict(model_path=args.model, dataset=args.data, batch_size=16, max_length=128,
                                  output_dir="/tmp/unused", blocks=[args.block]))
    ctx = recipe.Context(config, progress=False)
    batches = ctx.batches
    block = tuple(args.block)
    ours(ctx, args.model, block), hf_forward(args.model, batches)  # warm-up: file cache, lazy imports
    times = {"hf": [], "ours": []}
    for _ in range(args.repeats):
        times["hf"].append(hf_forward(args.model, batches))
        times["ours"].append(ours(ctx, args.model, block))
    hf, mine = statistics.median(times["hf"]), statistics.median(times["ours"])
    layers = ctx.num_layers
    fraction = block[1] / layers
    ratio, target = mine / hf, 1.15 * fraction
    tokens = sum(b.num_tokens for b in batches)
    rows = [["HF forward, output_hidden_states (full model)", f"{hf:.2f}", "1.000"],
            [f"replaceme calibrate, block {list(block)} (layers 0..{block[1] - 1})", f"{mine:.2f}", f"{ratio:.3f}"]]
    verdict = "met" if ratio <= target else "NOT met"
    print(table(["calibration", "median s", "ratio"], rows))
    print(f"fraction of layers needed {fraction:.3f}; target ratio <= {target:.3f}: {verdict}")
    record("Calibration speed (bundled model)", f"""
`python benchmarks/calibration_speed.py` — {args.model}, {len(batches)} batches, {tokens} tokens
(batch 16, up to 128 tokens), median of {args.repeats} alternating runs each, both starting from the
checkpoint on disk. Machine: {machine()}.

{table(["calibration", "median s", "ratio"], rows)}

Layers needed: {block[1]} of {layers} ({fraction:.3f}); target ratio ≤ 1.15 × {fraction:.3f} = {target:.3f}: **{verdict}**.
Raw seconds: HF {[round(t, 2) for t in times['hf']]}, ours {[round(t, 2) for t in times['ours']]}.
""")


if __name__ == "__main__":
    main()
