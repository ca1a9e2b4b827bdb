"""Merge memory: peak resident memory of the streamed merge does not grow with the model.

Runs ``merge_checkpoint`` in a fresh interpreter on the bundled model and on random Llamas built
here, 4× and 16× larger by depth and by width. The kernel's peak-RSS mark (VmHWM) is reset just
before the merge, so the figure is what the merge itself added on top of the loaded interpreter:
it should not move with depth, and track the largest tensor (the fold of T into ``down_proj``)
with width.

    python benchmarks/merge_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _record import machine, record, table

CHILD = """
import json, sys, fsspec, torch
from replaceme.checkpoint import Checkpoint
from replaceme.merge import merge_checkpoint

def status_mb(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024

source, out = sys.argv[1], sys.argv[2]
with Checkpoint(source) as checkpoint:
    hidden = checkpoint.config["hidden_size"]
    largest = max(e.nbytes for e in checkpoint.entries.values())
    total = sum(e.nbytes for e in checkpoint.entries.values())
    transform = {(4, 8): torch.eye(hidden, dtype=torch.float64)}
    # Page in the float64 matmul and dtype-cast kernels on a toy fold, so that loading library
    # code is not counted as memory the merge holds.
    torch.eye(64, dtype=torch.float64) @ torch.ones(64, 8, dtype=torch.float64).to(torch.bfloat16).double()
    before = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    merge_checkpoint(checkpoint, transform, fsspec.filesystem("file"), out, progress=False)
print(json.dumps({"before_mb": before, "peak_mb": status_mb("VmHWM"),
                  "largest_mb": largest / 2**20, "total_mb": total / 2**20}))
"""


def measure(source: Path) -> dict:
    out = Path(tempfile.mkdtemp())
    result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_random(source: Path, folder: Path, *, depth: int = 1, width: int = 1) -> Path:
    """A random model of the bundled one's family, ``depth``× its layers and ``width``× its hidden and MLP sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    settings = json.loads((source / "config.json").read_text())
    settings.update(num_hidden_layers=settings["num_hidden_layers"] * depth, hidden_size=settings["hidden_size"] * width,
                    intermediate_size=settings["intermediate_size"] * width)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings)).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="8MB")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="examples/shakespeare-llama-16l")
    args = parser.parse_args()
    source = Path(args.model)
    scratch = Path(tempfile.mkdtemp())
    models = [("bundled (16 layers)", source),
              ("random, 4× deeper (64 layers)", build_random(source, scratch / "deep", depth=4)),
              ("random, 16× deeper (256 layers)", build_random(source, scratch / "deeper", depth=16)),
              ("random, 2× wider (4× parameters)", build_random(source, scratch / "wide", width=2)),
              ("random, 4× wider (16× parameters)", build_random(source, scratch / "wider", width=4))]
    rows = []
    for name, folder in models:
        m = measure(folder)
        rows.append([name, f"{m['total_mb']:.1f}", f"{m['largest_mb']:.2f}", f"{m['before_mb']:.0f}",
                     f"{m['peak_mb']:.0f}", f"{m['peak_mb'] - m['before_mb']:.1f}",
                     f"{(m['peak_mb'] - m['before_mb']) / m['largest_mb']:.1f}"])
    headers = ["model", "weights MB", "largest tensor MB", "RSS before merge MB", "peak RSS during merge MB",
               "added by merge MB", "added / largest tensor"]
    print(table(headers, rows))
    record("Merge memory", f"""
`python benchmarks/merge_memory.py` — a fresh interpreter opens the checkpoint, resets the kernel's
peak-RSS mark (`/proc/self/clear_refs`), merges one block (layers 4..7 removed, map folded into
layer 3) and reads the peak (VmHWM). Machine: {machine()}.

{table(headers, rows)}

The peak comes from the fold of T into layer 3's `down_proj` (source and result in the checkpoint
dtype, the product in float64, in slabs of at most 32 MiB); every other tensor is copied as bytes.
It does not move with depth, and grows with the width of the largest tensor, not the model's size.
""")


if __name__ == "__main__":
    main()
