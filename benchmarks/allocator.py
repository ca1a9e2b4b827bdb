"""The allocator: glibc's adaptive thresholds against fixed ones, for the HF forward and for our pass.

A pass frees and re-allocates the same activations layer after layer. With glibc's adaptive
defaults some of those blocks come from fresh ``mmap`` calls or from heap pages just handed back
to the kernel, and each 4 kB of them costs a page fault when first touched. Fixing the thresholds
(``MALLOC_MMAP_THRESHOLD_`` 32 MiB, ``MALLOC_TRIM_THRESHOLD_`` 1 GiB, ``MALLOC_TOP_PAD_`` 64 MiB)
keeps them in the heap instead. Does that speed our pass up more than the HF forward, and what
does it cost in peak memory?

Side by side, each point a fresh interpreter (glibc reads the variables at start) running one
side under one setting: (a) the plain HF forward with ``output_hidden_states``, its load
included, or (d) the one-pass profile of ``selection: residual``
(``LocalEngine.profile(L, statistics=True, weighted=True)``, opening the checkpoint included);
its seconds, minor page faults and peak RSS (VmHWM, from the interpreter's start). Repetitions
alternate the settings; the model is ``one_pass.py``'s small-vocabulary one (``_setup.random_llama``,
hidden 768, 8 layers, L = 2).

    python benchmarks/allocator.py [--quick] [--repeats 3] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _record import machine, record, table
from _setup import random_llama, run_child

BLOCK_SIZE, BATCH_SIZE, MAX_LENGTH = 2, 16, 128
FIXED = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30),
         "MALLOC_TOP_PAD_": str(64 * 2**20)}
SETTINGS = {"glibc default": {}, "fixed thresholds": FIXED}
SIDES = {"hf": "(a) HF forward, output_hidden_states", "ours": "(d) one-pass profile, selection: residual"}


def child(spec: dict) -> dict:
    """One side, in this (fresh) interpreter."""
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from one_pass import texts
    from replaceme.checkpoint import Checkpoint
    from replaceme.data import make_batches
    from replaceme.engine import LocalEngine
    from replaceme.layerwise import LayerwiseModel

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    batches = make_batches(texts(spec["tokens"] // MAX_LENGTH), tokenizer, batch_size=BATCH_SIZE, max_length=MAX_LENGTH)
    faults, started = _faults(), time.perf_counter()
    with torch.no_grad():
        if spec["side"] == "hf":
            model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
            for batch in batches:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        else:
            with Checkpoint(spec["model"]) as checkpoint:
                layerwise = LayerwiseModel(checkpoint, device=torch.device("cpu"), dtype=torch.float32)
                engine = LocalEngine(layerwise, batches, progress=False, memory_budget="auto")
                engine.profile(BLOCK_SIZE, statistics=True, weighted=True)
    return {"seconds": time.perf_counter() - started, "faults": _faults() - faults,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(spec: dict, env: dict[str, str]) -> dict:
    """One point under ``env``'s thresholds (none of this process's own MALLOC_*_ settings)."""
    clean = {k: v for k, v in os.environ.items() if k not in FIXED}
    return run_child(__file__, spec, {**clean, **env})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, one repetition, nothing recorded")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    torch.set_num_threads(1)  # as in every child (and so in machine())
    started = time.perf_counter()
    hidden, layers = (256, 4) if args.quick else (768, 8)
    tokens, repeats = (2048, 1) if args.quick else (args.tokens, args.repeats)
    model = random_llama(Path(tempfile.mkdtemp()) / "model", hidden=hidden, layers=layers, vocab=2048, kv_heads=4,
                         shard_size="64MB")
    runs: dict[str, dict[str, list[dict]]] = {s: {side: [] for side in SIDES} for s in SETTINGS}
    names = list(SETTINGS)
    for repeat in range(repeats):
        for setting in names if repeat % 2 == 0 else names[::-1]:
            for side in SIDES:
                point = measure({"side": side, "model": str(model), "tokens": tokens}, SETTINGS[setting])
                runs[setting][side].append(point)
                print(setting, side, json.dumps(point), flush=True)
    rows = []
    for setting, sides in runs.items():
        for side, points in sides.items():
            rows.append([setting, SIDES[side], ", ".join(f"{p['seconds']:.1f}" for p in points),
                         f"{statistics.median(p['faults'] for p in points):,.0f}",
                         f"{statistics.median(p['peak_mib'] for p in points):.0f}"])
        ratios = [o["seconds"] / h["seconds"] for h, o in zip(sides["hf"], sides["ours"], strict=True)]
        rows.append([setting, "ratio (d) / (a), each repetition", ", ".join(f"{r:.2f}" for r in ratios), "", ""])
    headers = ["glibc thresholds", "series", "seconds, each repetition", "minor page faults (median)",
               "peak RSS MiB (median)"]

    def median(setting: str, side: str, key: str) -> float:
        return statistics.median(p[key] for p in runs[setting][side])

    default, fixed = names
    summary = "; ".join(
        f"{SIDES[side][:3]} {median(fixed, side, 'seconds') / median(default, side, 'seconds'):.2f}× the seconds, "
        f"{median(fixed, side, 'peak_mib') / median(default, side, 'peak_mib'):.2f}× the peak RSS"
        for side in SIDES)
    summary = f"Fixed thresholds against glibc's default (medians): {summary}."
    elapsed = time.perf_counter() - started
    print(table(headers, rows))
    print(summary)
    print(f"whole benchmark: {elapsed:.0f} s")
    if args.quick:
        return
    record("Allocator: glibc's adaptive thresholds against fixed ones", f"""
`python benchmarks/allocator.py` — {tokens:,} calibration tokens (batches of {BATCH_SIZE} × {MAX_LENGTH}) through
`one_pass.py`'s small-vocabulary model (random Llama, hidden {hidden}, {layers} layers, bf16 shards computed in
float32). Each point is a fresh interpreter running one side under one setting: (a) the HF forward with
`output_hidden_states`, its load included, or (d) the one-pass profile of `selection: residual`, opening the
checkpoint included. *glibc default*: its adaptive mmap and trim thresholds; *fixed thresholds*:
`MALLOC_MMAP_THRESHOLD_` 32 MiB, `MALLOC_TRIM_THRESHOLD_` 1 GiB, `MALLOC_TOP_PAD_` 64 MiB in the child's
environment. {repeats} repetitions, the settings alternating. Peak RSS: the process's (`ru_maxrss`). Machine:
{machine()}; 2 cores of a shared virtual machine. Whole benchmark: {elapsed:.0f} s.

{table(headers, rows)}

{summary}
""")


if __name__ == "__main__":
    main()
