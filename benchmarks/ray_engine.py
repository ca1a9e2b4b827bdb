"""Ray engine: overhead against the in-process engine, and throughput of 2 replicas against 1.

Side by side in one run, on the same random Llama (built here) and the same calibration batches:

1. in-process ``LocalEngine`` (2 torch threads) against the Ray engine with 1 replica × 1 stage
   (one actor with 2 CPUs, so also 2 threads) — the overhead of actors, the object store and
   micro-batch pipelining;
2. the Ray engine with 1 replica against 2 replicas, 1-CPU actors — data-parallel throughput.

The pass time excludes starting the actors (worker processes import torch and load their layers,
a fixed cost that a long calibration amortises); it is reported separately.

    python benchmarks/ray_engine.py [--rows 384] [--hidden 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _record import machine, record, table
from _setup import random_llama, start_ray
from replaceme import recipe
from replaceme.config import EngineConfig, validate_config
from replaceme.engine import LocalEngine

BLOCK = (4, 8)  # needs layers 0..7
CALIB = "examples/data/calib.jsonl"


def in_process(ctx: recipe.Context) -> float:
    engine = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.batches, progress=False)
    started = time.perf_counter()
    engine.calibrate([BLOCK], recipe.BlockSolver(ctx.config))
    return time.perf_counter() - started


def on_ray(ctx: recipe.Context, **engine) -> tuple[float, float]:
    """(pass seconds, actor start seconds)."""
    from replaceme.distributed.engine import RayEngine, StageSettings

    settings = StageSettings(ctx.model_uri, ctx.checkpoint.config, "cpu", "float32")
    ray_engine = RayEngine(settings, ctx.batches, EngineConfig(backend="ray", batches_per_shard=1, **engine),
                           progress=False)
    try:
        ray_engine.calibrate([BLOCK], recipe.BlockSolver(ctx.config))
    finally:
        ray_engine.close()
    return ray_engine.seconds["passes"], ray_engine.seconds["start_workers"]


def median_of(repeats: int, measure) -> tuple[float, ...]:
    runs = [measure() for _ in range(repeats)]
    return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=384, help="calibration rows (batches of 8 × 128 tokens)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = random_llama(Path(tempfile.mkdtemp()) / "model", hidden=args.hidden, layers=12, vocab=2048,
                         kv_heads=args.hidden // 128, shard_size="16MB")
    config = validate_config(dict(model_path=str(model), dataset=CALIB, dataset_size=args.rows, batch_size=8,
                                  max_length=128, output_dir=tempfile.mkdtemp()))
    ctx = recipe.Context(config, progress=False)
    tokens = sum(b.num_tokens for b in ctx.batches)
    start_ray(2)

    local = median_of(args.repeats, lambda: (in_process(ctx),))[0]
    one_stage, one_start = median_of(args.repeats, lambda: on_ray(ctx, cpus_per_stage=2))
    one_replica, _ = median_of(args.repeats, lambda: on_ray(ctx, replicas=1, cpus_per_stage=1))
    two_replicas, two_start = median_of(args.repeats, lambda: on_ray(ctx, replicas=2, cpus_per_stage=1))

    overhead = one_stage / local - 1
    speedup = one_replica / two_replicas
    rows = [
        ["in-process engine (2 threads)", f"{local:.2f}", "—", f"{tokens / local:,.0f}", "1.00"],
        ["Ray 1 replica × 1 stage (2-CPU actor)", f"{one_stage:.2f}", f"{one_start:.1f}", f"{tokens / one_stage:,.0f}",
         f"{one_stage / local:.2f}"],
        ["Ray 1 replica × 1 stage (1-CPU actor)", f"{one_replica:.2f}", "—", f"{tokens / one_replica:,.0f}",
         f"{one_replica / local:.2f}"],
        ["Ray 2 replicas × 1 stage (1-CPU actors)", f"{two_replicas:.2f}", f"{two_start:.1f}",
         f"{tokens / two_replicas:,.0f}", f"{two_replicas / local:.2f}"],
    ]
    headers = ["engine", "pass s (median)", "actor start s", "tokens/s", "time vs in-process"]
    verdicts = (f"overhead of 1×1 against in-process: {overhead:+.1%} (target ≤ +15%: "
                f"{'met' if overhead <= 0.15 else 'missed'}); 2 replicas against 1: {speedup:.2f}× "
                f"(target ≥ 1.6×: {'met' if speedup >= 1.6 else 'missed'})")
    print(table(headers, rows))
    print(verdicts)
    record("Ray engine: overhead and replicas", f"""
`python benchmarks/ray_engine.py` — random Llama (12 layers, hidden {args.hidden}, intermediate {4 * args.hidden},
bf16 shards, computed in float32), block {list(BLOCK)} (layers 0..{BLOCK[1] - 1} run), {args.rows} calibration rows
of `{CALIB}` in batches of 8 × 128 tokens ({tokens:,} tokens), one data shard per batch, local
`ray.init(num_cpus=2)`. Medians of {args.repeats} runs. Pass time excludes starting the actors (a fixed
cost: a worker process imports torch and loads its layers), shown separately. Machine: {machine()}.

{table(headers, rows)}

{verdicts}.
""")


if __name__ == "__main__":
    main()
