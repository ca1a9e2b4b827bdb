"""Evaluation: the new paths against the old ones, side by side in one run.

1. Time: ``recipe.evaluate`` runs the layers before the first fold once for both perplexities,
   against the old way (a full pass over the source, then a full pass over the pruned model).
2. Memory: perplexity with logits computed a slice of token rows at a time (``LOGITS_BYTES``)
   against the old way (one batch's whole [tokens × vocab] logits at once), on a model with a
   large vocabulary, as peak RSS above the RSS before the pass.

A random Llama built here (16 layers, hidden 256, vocabulary 64 k, bf16 shards, computed in
float32), block [10, 14) removed. Alternating repeats, medians.

    python benchmarks/evaluation.py [--texts 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _record import machine, record, table
from _setup import random_llama
from replaceme import engine as engine_module
from replaceme import peak_memory, recipe
from replaceme.checkpoint import Checkpoint
from replaceme.config import validate_config
from replaceme.engine import LocalEngine

ROOT = Path(__file__).resolve().parents[1]
BLOCK = (10, 14)


def old_evaluate(ctx: recipe.Context, out: recipe.OutputDir) -> float:
    """Both models from their embeddings, as before."""
    before, _ = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.eval_batches, progress=False).perplexity()
    with Checkpoint(f"{out.uri}/model") as pruned:
        after, _ = LocalEngine(ctx.layerwise(pruned), ctx.eval_batches, progress=False).perplexity()
    return after


def seconds(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def perplexity_peak_mb(ctx: recipe.Context, logits_bytes: int) -> tuple[float, float]:
    """(peak RSS above the start in MiB, perplexity) of one perplexity pass over the source."""
    original = engine_module.LOGITS_BYTES
    engine_module.LOGITS_BYTES = logits_bytes
    try:
        engine = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.eval_batches, progress=False)
        peak_memory.reset_peak()
        start = peak_memory.peak_mb()["host_rss"]
        result, _ = engine.perplexity()
        return peak_memory.peak_mb()["host_rss"] - start, result
    finally:
        engine_module.LOGITS_BYTES = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=65536)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = random_llama(Path(tempfile.mkdtemp()) / "model", hidden=256, layers=16, vocab=args.vocab, kv_heads=2,
                         shard_size="64MB")
    eval_data = str(ROOT / "examples" / "data" / "eval.jsonl")
    config = validate_config(dict(model_path=str(model), dataset=eval_data,  # (no cache: the source is timed too)
                                  eval={"dataset": eval_data, "dataset_size": args.texts, "cache": False},
                                  dataset_size=8, batch_size=8, max_length=256,
                                  blocks=[list(BLOCK)], output_dir=str(Path(tempfile.mkdtemp()) / "out"),
                                  mlflow={"enabled": False}))
    recipe.run(config, progress=False)
    ctx = recipe.Context(config, progress=False)
    out = recipe.OutputDir(config.output_dir)
    tokens = sum(b.num_tokens for b in ctx.eval_batches)

    old_times, new_times = [], []
    for _ in range(args.repeats):
        old_s, old_after = seconds(lambda: old_evaluate(ctx, out))
        new_s, metrics = seconds(lambda: recipe.evaluate(ctx, out))
        assert metrics["perplexity_after"] == old_after  # the same figure, bit for bit
        old_times.append(old_s)
        new_times.append(new_s)
    old_time, new_time = statistics.median(old_times), statistics.median(new_times)

    whole_peak, whole = perplexity_peak_mb(ctx, 2**62)  # one slice per batch: the old behaviour
    sliced_peak, sliced = perplexity_peak_mb(ctx, engine_module.LOGITS_BYTES)
    rows = [
        ["evaluate: both models from their embeddings (old)", f"{old_time:.2f}", "1.00", "—"],
        [f"evaluate: layers 0..{BLOCK[0] - 2} once for both (new)", f"{new_time:.2f}", f"{new_time / old_time:.2f}", "—"],
        ["perplexity pass: a batch's whole logits at once (old)", "—", "—", f"{whole_peak:.0f}"],
        [f"perplexity pass: logits in {engine_module.LOGITS_BYTES // 2**20} MiB slices (new)", "—", "—",
         f"{sliced_peak:.0f}"],
    ]
    headers = ["path", "seconds (median)", "time vs old", "peak RSS above start, MiB"]
    summary = (f"evaluation time {new_time / old_time:.2f}× the old path ({BLOCK[0] - 1} of 28 decoder-layer passes "
               f"saved; the embeddings and the {args.vocab:,}-word LM head still run for both models); "
               f"perplexity pass peak {sliced_peak:.0f} MiB against {whole_peak:.0f} MiB; perplexities equal "
               f"({'yes' if abs(sliced - whole) <= 1e-6 * whole else 'NO'}: {sliced:.4f} vs {whole:.4f})")
    print(table(headers, rows))
    print(summary)
    record("Evaluation: shared first layers, sliced logits", f"""
`python benchmarks/evaluation.py` — random Llama (16 layers, hidden 256, vocabulary {args.vocab:,}, bf16 shards,
computed in float32), block {list(BLOCK)} removed, {args.texts} eval texts of `examples/data/eval.jsonl` in batches of
8 × up to 256 tokens ({tokens:,} tokens). Medians of {args.repeats} alternating runs. Machine: {machine()}.

{table(headers, rows)}

{summary}.
""")


if __name__ == "__main__":
    main()
