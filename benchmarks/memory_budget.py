"""Memory budget: peak RSS of the profile + calibrate passes as the calibration set grows.

The in-process engine takes the calibration set a chunk at a time, sized to
``engine.memory_budget``, so the memory a pass holds should not grow with the data. Each point
runs in a fresh interpreter: it tokenizes 1×, 4× or 16× the calibration tokens, runs the profile
pass with every candidate's statistics, weighted part included, as the default ``selection:
residual`` gathers them (``LocalEngine.profile(L, statistics=True, weighted=True)``), selects a
block and runs a calibrate pass for it, and reads the peak RSS (VmHWM, reset just before the
passes, and again between them). Side by side, three series:

* **fixed**: a budget chosen here so that the 1× data is one chunk of the profile pass (the
  smallest budget, in MiB, for which the engine's own plan says so), then 4× and 16× take more chunks;
* **fixed, no trim (before)**: the same with the engine's ``release_freed_memory`` between chunks
  (glibc's ``malloc_trim``) switched off in the child: what the allocator kept before it;
* **unbounded** (the old behaviour): ``1TB`` with the engine's cap on a resident chunk
  (``replaceme.memory.RESIDENT_CHUNK_BYTES``) lifted in the child, so every pass is one chunk
  holding the hidden states of the whole set.

Models: the bundled one (examples/shakespeare-llama-16l, ``examples/data/calib.jsonl``, repeated
when more texts are needed) and a random wider Llama (``_setup.random_llama``, hidden 1024,
8 layers). Target: the fixed budget's peak RSS at 4× and 16× within +10 % of its 1× run.

    python benchmarks/memory_budget.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _record import machine, record, table
from _setup import random_llama, run_child
from replaceme.errors import ReplaceMeError
from replaceme.stats import CandidateStats

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "calib.jsonl"
FACTORS = (1, 4, 16)
UNBOUNDED = "1TB"
# (label, fixed budget?, trim between chunks?)
SERIES = [("fixed", True, True), ("fixed, no trim (before)", True, False), ("unbounded (old)", False, True)]
ALPHA = 1e-3  # a small ridge term: every point solves by Cholesky (1× has fewer tokens than the wide model's hidden size)


def texts(count: int) -> list[str]:
    """The first ``count`` calibration texts, the file repeated as often as needed."""
    rows = [json.loads(line)["text"] for line in DATA.read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)] for i in range(count)]


def open_engine(model: str, count: int, batch_size: int, max_length: int, budget):
    from transformers import AutoTokenizer

    from replaceme.checkpoint import Checkpoint
    from replaceme.data import make_batches
    from replaceme.engine import LocalEngine
    from replaceme.layerwise import LayerwiseModel

    checkpoint = Checkpoint(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    batches = make_batches(texts(count), tokenizer, batch_size=batch_size, max_length=max_length,
                           context=checkpoint.config.get("max_position_embeddings"))
    layerwise = LayerwiseModel(checkpoint, device=torch.device("cpu"), dtype=torch.float32)
    return LocalEngine(layerwise, batches, progress=False, memory_budget=budget)


def one_chunk_budget(model: str, count: int, batch_size: int, max_length: int, block_size: int) -> int:
    """The smallest budget (whole MiB) at which the engine plans the profile pass (with statistics)
    over ``count`` texts as one chunk: the engine plans for each candidate, stopped before any layer runs."""

    class Planned(Exception):
        pass

    engine = open_engine(model, count, batch_size, max_length, None)

    def stop(plan):
        raise Planned

    engine.chunks = stop  # profile() plans, then asks for its chunks: stop there
    hidden, layers = engine.model.hidden_size, engine.model.num_layers
    need = (layers - block_size) * CandidateStats.nbytes(hidden, weighted=True)  # gathered when <= budget/2

    def one_chunk(mib: int) -> bool:
        engine.memory_budget = mib * 2**20
        try:
            engine.profile(block_size, statistics=True, weighted=True)
        except Planned:
            return engine.last_plan.num_chunks == 1
        except ReplaceMeError as exc:  # a budget too small for one layer and one batch
            if "memory_budget" in str(exc):
                return False
            raise
        raise AssertionError("profile ran past its plan")

    step = 8
    least = mib = -(-2 * need // 2**20)  # below it the statistics are not gathered, and the plan is smaller
    while not one_chunk(mib):
        mib += step
    while mib > least and one_chunk(mib - 1):  # the first MiB of that step that is one chunk
        mib -= 1
    return mib * 2**20


def child(spec: dict) -> dict:
    """One point, in this (fresh) interpreter."""
    torch.set_num_threads(spec["threads"])
    from replaceme import engine as engine_module
    from replaceme import memory, peak_memory
    from replaceme.blocks import select_blocks
    from replaceme.solvers import solve_lstsq

    if spec["unbounded"]:
        memory.RESIDENT_CHUNK_BYTES = 2**62  # no cap on a resident chunk: one chunk, as before chunking
    if not spec["trim"]:
        engine_module.release_freed_memory = lambda: None
    engine = open_engine(spec["model"], spec["texts"], spec["batch_size"], spec["max_length"], spec["budget"])
    tokens = sum(b.num_tokens for b in engine.batches)
    block_size = spec["block_size"]
    rss_before = _status_mib("VmRSS")
    peak_memory.reset_peak()
    started = time.perf_counter()
    profile = engine.profile(block_size, statistics=True, weighted=True)
    profile_plan = engine.last_plan
    profile_peak = _status_mib("VmHWM")
    peak_memory.reset_peak()
    assert profile.candidates is not None, "candidate statistics not gathered"
    distances = profile.distances
    del profile  # the candidates' statistics: the recipe keeps only the selected block's, on disk
    block = select_blocks(distances, num_blocks=1, min_start=1, merge_consecutive=False,
                          num_layers=engine.model.num_layers)[0]
    engine.calibrate([block], lambda capture: solve_lstsq(capture.stats, alpha=ALPHA)[0])
    calibrate_plan = engine.last_plan
    seconds = time.perf_counter() - started
    calibrate_peak = _status_mib("VmHWM")
    engine.close()
    return {"tokens": tokens, "batches": len(engine.batches), "block": list(block), "seconds": seconds,
            "rss_before": rss_before, "peak": max(profile_peak, calibrate_peak), "profile_peak": profile_peak,
            "calibrate_peak": calibrate_peak,
            "profile": _plan(profile_plan), "calibrate": _plan(calibrate_plan)}


def _plan(plan) -> dict:
    return {"chunks": plan.num_chunks, "chunk_batches": plan.chunk_batches, "resident": plan.resident,
            "estimate_mib": plan.peak_bytes / 2**20, "budget": plan.budget}


def _status_mib(key: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny token counts, 1× and 4× only, nothing recorded (smoke test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every point (default 1: on a shared machine two threads spin-wait "
                             "for each other and run several times slower)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp())
    hidden = 256 if args.quick else 1024
    wide = random_llama(scratch / "wide", hidden=hidden, layers=8, vocab=2048, kv_heads=4, shard_size="64MB")
    # (name, model, texts at 1×, batch size, max length, layers per block)
    models = [("bundled (16 layers, hidden 128)", ROOT / "examples" / "shakespeare-llama-16l",
               *((4, 4, 32) if args.quick else (64, 16, 128)), 4),
              (f"random Llama (8 layers, hidden {hidden})", wide, *((2, 2, 32) if args.quick else (2, 2, 128)), 2)]
    factors = FACTORS[:2] if args.quick else FACTORS
    rows, points, budgets = [], {}, {}
    for name, model, count, batch_size, max_length, block_size in models:
        budget = budgets[name] = one_chunk_budget(str(model), count, batch_size, max_length, block_size)
        for factor in factors:
            for label, fixed, trim in SERIES:
                spec = {"model": str(model), "texts": count * factor, "batch_size": batch_size,
                        "max_length": max_length, "block_size": block_size, "threads": args.threads,
                        "unbounded": not fixed, "budget": budget if fixed else UNBOUNDED, "trim": trim}
                point = points[(name, factor, label)] = run_child(__file__, spec)
                print(name, factor, label, json.dumps(point), flush=True)
        for label, fixed, _ in SERIES:
            base = points[(name, 1, label)]
            for factor in factors:
                point = points[(name, factor, label)]
                point["ratio"] = point["peak"] / base["peak"]
                plans = point["profile"], point["calibrate"]
                rows.append([name, f"{factor}× ({point['tokens']:,})", label,
                             f"{budget / 2**20:.0f} MiB" if fixed else UNBOUNDED,
                             " / ".join(str(p["chunks"]) for p in plans),
                             " / ".join("yes" if p["resident"] else "no" for p in plans),
                             " / ".join(f"{p['estimate_mib']:.0f}" for p in plans),
                             f"{point['rss_before']:.0f}",
                             " / ".join(f"{point[k] - point['rss_before']:.0f}" for k in ("profile_peak", "calibrate_peak")),
                             f"{point['peak']:.0f}", f"**{point['ratio']:.3f}**" if label == "fixed" and factor > 1 else f"{point['ratio']:.3f}",
                             f"{point['seconds']:.1f}"])
    headers = ["model", "tokens (1×/4×/16×)", "series", "budget", "chunks (profile / calibrate)",
               "weights resident (profile / calibrate)", "engine's estimate MiB (profile / calibrate)",
               "RSS before the passes MiB", "added by the pass MiB (profile / calibrate)", "peak RSS MiB", "peak RSS ratio to 1×", "seconds"]

    def worst(label: str) -> float:
        return max(p["ratio"] for (_, factor, series), p in points.items() if series == label and factor > 1)

    met = worst("fixed") <= 1.10
    summary = (f"fixed budget: worst peak-RSS ratio to 1× over 4× and 16×, both models: {worst('fixed'):.3f} "
               f"(target ≤ 1.10: **{'met' if met else 'NOT met'}**); the same without the trim between chunks: "
               f"{worst(SERIES[1][0]):.3f}; unbounded (old behaviour): {worst(SERIES[2][0]):.3f}")
    elapsed = time.perf_counter() - started
    print(table(headers, rows))
    print(summary)
    print(f"whole benchmark: {elapsed:.0f} s")
    if args.quick:
        return
    (b_name, _, b_count, *_), (w_name, _, w_count, *_) = models
    record("Memory budget: peak RSS as the calibration set grows", f"""
`python benchmarks/memory_budget.py` — each point in a fresh interpreter ({args.threads} torch thread): tokenize the
texts, reset the peak-RSS mark (`/proc/self/clear_refs`), run `LocalEngine.profile(L, statistics=True,
weighted=True)` (every candidate's statistics, as `selection: residual` gathers them), read
VmHWM, reset it, drop the candidates' statistics (the recipe keeps only the selected block's, on disk), select
one block by distance, `LocalEngine.calibrate` it (lstsq), read VmHWM again. *Peak RSS* is
the larger reading (interpreter, torch, tokenizer and batches included); *added by the pass* is a pass's reading
minus the RSS just before the passes; the engine's estimate is `engine.last_plan.peak_bytes` of each pass.
Models: the bundled one (L = 4; batches of 16 × 128 tokens; 1× = {b_count} texts of `examples/data/calib.jsonl`,
{points[(b_name, 1, "fixed")]['tokens']:,} tokens; 16× repeats the file's 256 texts 4 times) and a random
bf16 Llama built with `_setup.random_llama` (hidden 1024, intermediate 4096, 8 layers, vocabulary 2048, computed in
float32; L = 2; batches of 2 × 128 tokens; 1× = {w_count} texts, {points[(w_name, 1, "fixed")]['tokens']:,} tokens).
Series: *fixed* — the smallest whole number of MiB for which the engine plans the 1× profile pass as one chunk
(asked of the engine itself, stopped before any layer runs): {budgets[b_name] / 2**20:.0f} MiB for the bundled
model, {budgets[w_name] / 2**20:.0f} MiB for the random one; the engine hands freed memory back to the kernel
between chunks (`replaceme.memory.release_freed_memory`, glibc's `malloc_trim`: glibc raises its mmap threshold
each time a large block is freed, after which blocks of that size come from the heap, where freed memory stays
resident); *fixed, no trim (before)* — the same with that call switched off; *unbounded (old)* — `memory_budget="{UNBOUNDED}"` with the cap on a
resident chunk (`replaceme.memory.RESIDENT_CHUNK_BYTES`, 2 GiB) lifted, i.e. one chunk holding the whole set's
hidden states, as before chunking. Machine: {machine()}; 2 cores shared with other jobs while this ran (seconds
are indicative only). Whole benchmark: {elapsed:.0f} s.

{table(headers, rows)}

{summary}.

`replaceme plan` prints the same estimate per pass (the engine's own arithmetic, `memory.plan_pass`) without
running a pass.
""")

if __name__ == "__main__":
    main()
