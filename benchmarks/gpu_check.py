"""GPU check: the CUDA code paths in one short run on one GPU (a few minutes on a datacenter GPU).

1. The bundled model calibrated in-process on the GPU, in the checkpoint's bfloat16, against the
   same calibration in float32 on the CPU. The tolerance for bfloat16 (8 mantissa bits, about
   0.4 % per activation): evaluated on the float32 statistics, the GPU map's relative residual is
   within 2 % of the float32 map's own.
2. A random 8-layer bfloat16 Llama (hidden 2048) in-process on the GPU: calibration throughput
   (tokens/s) against one Hugging Face forward with ``output_hidden_states`` over the same batches
   on the same GPU, and the CUDA peak memory of each.
3. The same random model on a local Ray cluster, two stage actors sharing the GPU
   (``gpus_per_stage: 0.5``): its map against the in-process GPU map (same tolerance).

Without a GPU it says so and exits 0. ``--device cpu`` runs the same steps on the CPU with a smaller
model (bfloat16 forced on the CPU), to test this script where no GPU is lent.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--hidden 2048] [--texts 256] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from _record import machine, record, table
from _setup import random_llama, start_ray
from replaceme import recipe
from replaceme.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "shakespeare-llama-16l"
CALIB = ROOT / "examples" / "data" / "calib.jsonl"
BUNDLED_BLOCK, RANDOM_BLOCK = (2, 6), (3, 6)
RESIDUAL_TOLERANCE = 0.02  # relative, for maps calibrated in bfloat16


def config(model: Path, device: str, dtype: str, texts: int, **engine) -> recipe.ReplaceMeConfig:
    return validate_config(dict(model_path=str(model), dataset=str(CALIB), dataset_size=texts, batch_size=8,
                                max_length=256, device=device, compute_dtype=dtype, output_dir=tempfile.mkdtemp(),
                                mlflow={"enabled": False}, engine=engine or {}))


def calibrate(settings, block: tuple[int, int]) -> tuple[torch.Tensor, object, float, int]:
    """(map, statistics, seconds, tokens) of one block through the recipe's own engine."""
    ctx = recipe.Context(settings, progress=False)
    engine = recipe.calibration_engine(ctx)
    try:
        _sync(settings.device)
        started = time.perf_counter()
        [(capture, transform)] = engine.calibrate([block], recipe.BlockSolver(settings))
        _sync(settings.device)
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    return transform.double().cpu(), capture.stats, seconds, sum(b.num_tokens for b in ctx.batches)


def hf_forward_seconds(model: Path, device: str, dtype: torch.dtype, settings) -> float:
    """One HF forward with output_hidden_states over the same batches, on the same device."""
    from transformers import AutoModelForCausalLM

    ctx = recipe.Context(settings, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    with torch.no_grad():
        hf(input_ids=ctx.batches[0].input_ids.to(device))  # warm-up (kernels, allocator)
        _sync(device)
        started = time.perf_counter()
        for batch in ctx.batches:
            hf(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
               output_hidden_states=True)
        _sync(device)
    del hf
    return time.perf_counter() - started


def agreement(reference_map: torch.Tensor, reference_stats, other_map: torch.Tensor) -> tuple[float, float, bool]:
    """(relative map difference, relative residual change on the reference statistics, within tolerance)."""
    difference = float((other_map - reference_map).norm() / reference_map.norm())
    own, other = reference_stats.residual(reference_map), reference_stats.residual(other_map)
    change = (other - own) / own
    return difference, change, abs(change) <= RESIDUAL_TOLERANCE


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: str) -> str:
    if device != "cuda":
        return "—"
    peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    return f"{peak:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--hidden", type=int, help="random model width (default 2048 on cuda, 256 on cpu)")
    parser.add_argument("--texts", type=int, help="calibration texts (default 256 on cuda, 32 on cpu)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("gpu_check skipped: no CUDA device is visible (run with --device cpu to test the script)")
        return 0
    hidden, texts = args.hidden or (2048 if gpu else 256), args.texts or (256 if gpu else 32)
    ray_gpus = {"gpus_per_stage": 0.5} if gpu else {}
    rows, verdicts = [], []

    # 1. bundled model: bfloat16 on the device against float32 on the CPU
    reference, reference_stats, _, tokens = calibrate(config(BUNDLED, "cpu", "float32", texts), BUNDLED_BLOCK)
    device_map, _, seconds, _ = calibrate(config(BUNDLED, args.device, "bfloat16", texts), BUNDLED_BLOCK)
    difference, change, ok = agreement(reference, reference_stats, device_map)
    rows.append([f"bundled, in-process, {args.device} bf16 vs cpu fp32", f"{tokens:,}", f"{seconds:.2f}",
                 f"{tokens / seconds:,.0f}", _peak_gb(args.device), f"{difference:.2e}", f"{change:+.3%}"])
    verdicts.append(f"bundled model bf16 map within tolerance: {'yes' if ok else 'NO'}")

    # 2. a wider random model: throughput against the HF forward
    model = random_llama(Path(tempfile.mkdtemp()) / "random-llama", hidden=hidden, layers=8, vocab=4096,
                         kv_heads=max(1, hidden // 256), shard_size="512MB")
    local = config(model, args.device, "bfloat16", texts)
    in_process, _, seconds, tokens = calibrate(local, RANDOM_BLOCK)
    ours_peak = _peak_gb(args.device)
    hf_seconds = hf_forward_seconds(model, args.device, torch.bfloat16, local)
    rows.append([f"random 8-layer h{hidden}, in-process, {args.device} bf16", f"{tokens:,}", f"{seconds:.2f}",
                 f"{tokens / seconds:,.0f}", ours_peak, "—", "—"])
    rows.append([f"  HF forward (output_hidden_states), {args.device} bf16", f"{tokens:,}", f"{hf_seconds:.2f}",
                 f"{tokens / hf_seconds:,.0f}", _peak_gb(args.device), "—", "—"])
    verdicts.append(f"calibration of block {list(RANDOM_BLOCK)} costs {seconds / hf_seconds:.2f}× one HF forward "
                    f"over all 8 layers")

    # 3. the same model on Ray stages sharing the device
    start_ray(2, gpus=1 if gpu else 0)
    on_ray = config(model, args.device, "bfloat16", texts, backend="ray", stages=2, cpus_per_stage=1, **ray_gpus)
    ray_map, _, seconds, _ = calibrate(on_ray, RANDOM_BLOCK)
    _, ray_stats, _, _ = calibrate(config(model, "cpu", "float32", texts), RANDOM_BLOCK)
    difference, change, ok = agreement(in_process, ray_stats, ray_map)
    rows.append([f"random 8-layer h{hidden}, Ray 2 stages (seconds include starting them), {args.device} bf16 "
                 "vs in-process", f"{tokens:,}", f"{seconds:.2f}", f"{tokens / seconds:,.0f}", "—", f"{difference:.2e}",
                 f"{change:+.3%}"])
    verdicts.append(f"Ray map agrees with the in-process map: {'yes' if ok else 'NO'}")

    headers = ["run", "tokens", "seconds", "tokens/s", "CUDA peak GB", "‖ΔT‖/‖T‖", "residual change"]
    print(table(headers, rows))
    print("; ".join(verdicts))
    if not args.no_record:
        record(f"GPU check ({args.device})", f"""
`python benchmarks/gpu_check.py --device {args.device}` — calibration in bfloat16 against float32 on the CPU
(tolerance: the map's relative residual on the float32 statistics within {RESIDUAL_TOLERANCE:.0%} of the float32
map's), {texts} texts of `examples/data/calib.jsonl` at up to 256 tokens. Machine: {machine()}.
{"" if gpu else "A dry run on the CPU with bfloat16 forced: it tests the script where no GPU is lent; no CUDA code ran."}

{table(headers, rows)}

{'; '.join(verdicts)}.
""")
    return 0 if all("NO" not in v for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
