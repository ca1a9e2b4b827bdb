"""Merge memory: peak resident memory of the streamed merge does not grow with the model.

Runs ``merge_checkpoint`` in a fresh interpreter on the bundled model and on a random Llama with
4× its parameters (built here), and compares each peak RSS with that of the same interpreter
after the same imports but no merge. The difference should stay near the largest tensor.

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
import json, resource, sys, fsspec, torch
from replaceme.checkpoint import Checkpoint
from replaceme.merge import merge_checkpoint
source, out, merge = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
with Checkpoint(source) as checkpoint:
    hidden = checkpoint.config["hidden_size"]
    largest = max(e.nbytes for e in checkpoint.entries.values())
    total = sum(e.nbytes for e in checkpoint.entries.values())
    if merge:
        merge_checkpoint(checkpoint, {(4, 8): torch.eye(hidden, dtype=torch.float64)}, fsspec.filesystem("file"), out, progress=False)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "largest_mb": largest / 2**20, "total_mb": total / 2**20}))
"""


def measure(source: Path, merge: bool) -> dict:
    out = Path(tempfile.mkdtemp())
    result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), "1" if merge else "0"],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_large(source: Path, folder: Path, factor: int = 4) -> Path:
    """A random model of the same family with ``factor``× the parameters (hidden and MLP ×2)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    settings = json.loads((source / "config.json").read_text())
    scale = int(factor ** 0.5)
    settings.update(hidden_size=settings["hidden_size"] * scale, intermediate_size=settings["intermediate_size"] * scale)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings)).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="8MB")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="examples/shakespeare-llama-16l")
    args = parser.parse_args()
    source = Path(args.model)
    large = build_large(source, Path(tempfile.mkdtemp()) / "large")
    rows = []
    for name, folder in [("bundled", source), ("4× larger random", large)]:
        idle, merged = measure(folder, merge=False), measure(folder, merge=True)
        extra = merged["peak_mb"] - idle["peak_mb"]
        rows.append([name, f"{merged['total_mb']:.1f}", f"{merged['largest_mb']:.2f}", f"{idle['peak_mb']:.0f}",
                     f"{merged['peak_mb']:.0f}", f"{extra:.1f}"])
    headers = ["model", "weights MB", "largest tensor MB", "interpreter peak MB", "merge peak MB", "merge − interpreter MB"]
    print(table(headers, rows))
    record("Merge memory", f"""
`python benchmarks/merge_memory.py` — peak RSS (ru_maxrss) of a fresh interpreter that merges one block
(layers 4..7 removed, map folded into layer 3), against the same interpreter with the same imports
that does not merge. Machine: {machine()}.

{table(headers, rows)}
""")


if __name__ == "__main__":
    main()
