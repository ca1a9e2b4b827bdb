"""``replaceme plan``: what a distributed calibration will need, from the model's config.json alone.

Reserving a Ray cluster for a 70B model is slow and expensive, so a user should know before
submitting how many GPUs and nodes a config asks for, whether each pipeline stage fits on one
GPU, how much the activation store will receive and how many FLOPs the calibration costs. The
model is built on the meta device (shapes only, no weights are read) and the numbers follow from
the config. Every formula is a deliberate, documented estimate:

- Needed layers: ``0 .. max(e) - 1`` of the explicit ``blocks``; without blocks, the worst case
  of selection, all ``num_hidden_layers`` layers. Final norm and LM head are never needed.
- Stages: the needed layers cut into ``engine.stages`` contiguous ranges, the largest
  parameter bytes as small as possible; stage 0 also holds the embeddings.
- Memory of a stage = parameter bytes in the compute dtype
  + activations ``in_flight × batch_size × max_length × hidden × dtype bytes × 2`` (input, output)
  + accumulators ``2 × hidden² × 8`` (float64 XᵀX, XᵀY) per block whose last layer ``e-1`` is in the
  stage (without explicit blocks: ``min(num_A, layers in the stage)``, the worst case).
  The transient working memory of one layer's forward is not counted.
- Compute dtype: ``compute_dtype`` when set; otherwise what the run resolves on the stage's device:
  the checkpoint dtype (config ``dtype``/``torch_dtype``) on GPU stages, float32 on CPU stages
  (``engine.gpus_per_stage: 0`` or ``device: cpu``). The planning machine's own devices are ignored.
- GPUs = replicas × stages × gpus_per_stage, CPUs = replicas × stages × cpus_per_stage. A stage
  actor runs on one node, so nodes = ceil(replicas × stages / floor(gpus_per_node / gpus_per_stage)),
  which is ceil(GPUs / gpus_per_node) whenever gpus_per_stage divides gpus_per_node.
- Tokens = ``--tokens`` when given, else dataset_size × max_length (an upper bound: padding is not
  counted by the run). Rows = dataset_size, else ceil(tokens / max_length); batches =
  ceil(rows / batch_size); shards = ceil(batches / engine.batches_per_shard).
- Activation store (``activations.uri`` set): rows ``blocks × tokens × 3 × hidden × 2`` (x, y,
  residual as 16-bit floats; only with ``activations.save_rows``) + statistics
  ``blocks × shards × 2 × hidden² × 8`` (per-shard float64 partials; their few bytes of metadata
  are not counted).
- Forward FLOPs (the Chinchilla convention, Hoffmann et al. 2022, app. F): matmul
  ``2 × (weights of the linear layers in the needed layers) × tokens`` + attention
  ``2 × 2 × tokens × max_length × d_attn`` per needed layer (scores QKᵀ and the weighted sum of
  values; d_attn = heads × head_dim, the hidden size for Llama; causal masking not discounted;
  norms, softmax, activations and biases not counted). The calibration costs that once per pass
  over the calibration set (one, or two when the fit needs a second pass). Evaluation: the source's
  layers and the pruned model's kept layers over the eval tokens (``eval.dataset_size``, else the
  calibration rows, × the eval max_length), plus both LM heads ``2 × 2 × vocab × hidden × tokens``.
- Wall time = FLOPs / (devices × peak FLOP/s × MFU). The peak is one device's dense 16-bit tensor
  peak (its FP32 peak when the pass computes in float32) from ``PEAK_TFLOPS``, for ``--gpu`` or the
  GPU of the planning machine, or ``--peak-tflops``; MFU (``--mfu``, default 0.4) is the share of
  that peak the run reaches. Ray: replicas × stages GPUs, the pipelines full; in-process and
  evaluation: one device. Without a known peak (a CPU) the time is not estimated.
- The driver's evaluation memory: the evaluate pass above (in the driver for every backend, under
  ``engine.memory_budget``); lm-eval tasks load the pruned model whole in its checkpoint dtype.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from replaceme.blocks import check_blocks
from replaceme.checkpoint import Checkpoint
from replaceme.config import ReplaceMeConfig
from replaceme.errors import ReplaceMeError
from replaceme.families import check_estimator, family_for
from replaceme.memory import (
    AUTO_SHARE,
    CALIBRATION_STATES,
    EVALUATION_STATES,
    LOGITS_BYTES,
    BatchShape,
    gib,
    held_fits,
    parse_size,
    plan_pass,
    profile_states,
    resolve_budget,
)
from replaceme.stats import BlockStats, CandidateStats

Block = tuple[int, int]
GB = 10**9
STORE_COLUMNS, STORE_BYTES = 3, 2  # x, y, residual as 16-bit floats
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a model, read off its meta-device build."""

    model_type: str
    num_layers: int
    hidden_size: int
    attention_width: int  # heads × head_dim: the width of QKᵀ and of the attention-weighted values
    num_heads: int
    intermediate_size: int
    checkpoint_dtype: str
    embedding_params: int
    layer_params: tuple[int, ...]
    layer_matmul_params: tuple[int, ...]  # weights of nn.Linear modules (what costs FLOPs)


@dataclass(frozen=True)
class StagePlan:
    index: int
    layers: Block  # half-open [first, last + 1)
    params: int
    param_bytes: int
    activation_bytes: int
    accumulator_blocks: int
    accumulator_bytes: int
    candidate_blocks: int  # candidates ending here whose statistics the profile pass sums here
    candidate_bytes: int  # … for the shards in flight; freed before the calibrate pass
    total_bytes: int
    fits_one_gpu: bool


@dataclass(frozen=True)
class StorePlan:
    uri: str
    rows_bytes: int
    statistics_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class FlopsPlan:
    matmul: int
    attention: int
    total: int


# One device's peak in TFLOP/s: (dense 16-bit tensor cores, FP32 without tensor cores), from the
# vendors' data sheets (SXM/OAM parts unless named). Sparsity is not counted.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "MI300X": (1307.0, 163.4),
}
DEFAULT_MFU = 0.4


@dataclass(frozen=True)
class Peak:
    """The device the wall time is estimated for."""

    tflops_16bit: float | None  # None: unknown (a CPU, a GPU not in PEAK_TFLOPS, nothing given)
    tflops_float32: float | None
    source: str  # where the figure comes from, for the output


@dataclass(frozen=True)
class Duration:
    name: str
    flops: float
    devices: int
    dtype: str
    peak_tflops: float | None
    seconds: float | None


@dataclass(frozen=True)
class WallTime:
    mfu: float
    peak: Peak
    estimates: list[Duration]


@dataclass(frozen=True)
class EvaluationPlan:
    """What the driver needs to evaluate: perplexity (the evaluate pass, under the budget) and lm-eval."""

    eval_tokens: int
    flops: float
    perplexity_peak_bytes: int | None  # None: no eval.dataset
    lm_eval_tasks: list[str]
    lm_eval_model_bytes: int  # the pruned model whole in its checkpoint dtype (0 without tasks)


def find_peak(gpu: str | None, peak_tflops: float | None) -> Peak:
    """The peak of ``--peak-tflops``, else of ``gpu`` (a name from PEAK_TFLOPS, or a device name such as
    "NVIDIA H100 80GB HBM3"), else unknown."""
    if peak_tflops is not None:
        return Peak(peak_tflops, peak_tflops, f"--peak-tflops {peak_tflops:g}")
    if gpu:
        words = set(re.split(r"[\s_-]+", gpu.upper()))  # "NVIDIA A100-SXM4-80GB": A100, SXM4, …
        for known, (half, single) in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
            if set(known.upper().split()) <= words:
                return Peak(half, single, f"{known} ({gpu}): {half:g} TFLOP/s 16-bit dense, {single:g} FP32")
        return Peak(None, None, f"{gpu!r} is not in the table ({', '.join(PEAK_TFLOPS)}); pass --peak-tflops")
    return Peak(None, None, f"unknown: no GPU here; pass --gpu NAME ({', '.join(PEAK_TFLOPS)}) or --peak-tflops N")


def local_gpu() -> str | None:
    """The planning machine's first CUDA device, by name (None without one)."""
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except (RuntimeError, AssertionError):
        return None


@dataclass(frozen=True)
class PassPlan:
    """One pass of the in-process engine under the budget (see :mod:`replaceme.memory`)."""

    name: str
    layers: int
    batches: int
    chunks: int
    chunk_batches: int
    resident: bool
    weights_bytes: int
    fixed_bytes: int
    batch_bytes: int
    peak_bytes: int
    least_bytes: int  # weights streamed, one batch per chunk


@dataclass(frozen=True)
class InProcessPlan:
    budget_bytes: int
    budget_source: str
    compute_dtype: str
    compute_dtype_reason: str
    one_pass: bool  # the profile pass gathers the statistics the fit needs
    second_pass_reason: str | None
    passes: list[PassPlan]
    fits: bool
    least_bytes: int  # the budget below which some pass cannot run at all


@dataclass(frozen=True)
class Plan:
    model_path: str
    model: ModelShape
    compute_dtype: str
    compute_dtype_reason: str
    blocks: list[Block] | None  # None: selected by distance, planned for the worst case
    num_blocks: int
    needed_layers: int
    tokens: int
    tokens_source: str
    rows: int
    batches: int
    shards: int
    replicas: int
    stages: list[StagePlan]
    gpus: float
    cpus: float
    gpus_per_node: int
    nodes: int
    gpu_memory_gb: float
    every_stage_fits: bool
    activation_store: StorePlan | None
    flops: FlopsPlan
    in_process: InProcessPlan
    evaluation: EvaluationPlan | None = None
    wall_time: WallTime | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- model -------------------------------------------------------------------------------------


def model_shape(model_config: dict[str, Any], field: str = "model_path") -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and count its parameters."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf = AutoConfig.for_model(**model_config)
        with init_empty_weights(include_buffers=True):
            decoder = AutoModelForCausalLM.from_config(hf).get_decoder()
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ReplaceMeError(f"{field}: config.json does not describe a buildable {model_config.get('model_type')} model ({exc})") from None
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelShape(
        model_type=model_config["model_type"],
        num_layers=len(decoder.layers),
        hidden_size=hf.hidden_size,
        attention_width=hf.num_attention_heads * head_dim,
        num_heads=hf.num_attention_heads,
        intermediate_size=getattr(hf, "intermediate_size", None) or 4 * hf.hidden_size,
        checkpoint_dtype=_checkpoint_dtype(model_config, field),
        embedding_params=decoder.embed_tokens.weight.numel(),
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in decoder.layers),
        layer_matmul_params=tuple(
            sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear)) for layer in decoder.layers
        ),
    )


def _checkpoint_dtype(model_config: dict[str, Any], field: str) -> str:
    name = model_config.get("dtype") or model_config.get("torch_dtype") or "float32"
    if name not in FLOAT_DTYPES:
        raise ReplaceMeError(f"{field}: config.json gives dtype {name!r}, not a float dtype the planner knows "
                             f"({', '.join(FLOAT_DTYPES)}); set compute_dtype explicitly")
    return name


def compute_dtype(config: ReplaceMeConfig, checkpoint_dtype: str) -> tuple[str, str]:
    """The dtype the stages will compute in, and why (mirrors ``layerwise.resolve_dtype`` on the
    stage's device, not on the machine that plans)."""
    if config.compute_dtype != "auto":
        return config.compute_dtype, "compute_dtype"
    if config.device == "cpu" or config.engine.gpus_per_stage == 0:
        return "float32", "auto on CPU stages"
    return checkpoint_dtype, "checkpoint dtype on GPU stages"


# --- stages ------------------------------------------------------------------------------------


def split_stages(weights: list[int], stages: int) -> list[Block]:
    """Cut ``weights`` (one per layer) into ``stages`` contiguous non-empty ranges whose largest
    sum is as small as possible: binary search on that largest sum, then a greedy packing."""
    if not 1 <= stages <= len(weights):
        raise ValueError(f"cannot cut {len(weights)} layers into {stages} stages")
    low, high = max(weights), sum(weights)
    while low < high:
        cap = (low + high) // 2
        if len(_pack(weights, cap, stages)) <= stages:
            high = cap
        else:
            low = cap + 1
    return _pack(weights, low, stages)


def _pack(weights: list[int], cap: int, stages: int) -> list[Block]:
    """Fill each range up to ``cap``, closing early only to leave one layer per remaining stage.

    Gives exactly ``stages`` ranges when ``cap`` is achievable, more when it is too small."""
    ranges: list[Block] = []
    start, load = 0, 0
    for i, weight in enumerate(weights):
        stages_after = stages - len(ranges) - 1
        if i > start and (load + weight > cap or len(weights) - i == stages_after):
            ranges.append((start, i))
            start, load = i, 0
        load += weight
    return [*ranges, (start, len(weights))]


def layer_weights(shape: ModelShape, needed: int) -> list[int]:
    """Parameters of each needed layer, the embeddings counted with layer 0 (stage 0 holds them)."""
    params = list(shape.layer_params[:needed])
    params[0] += shape.embedding_params
    return params


def _stage_plans(shape: ModelShape, config: ReplaceMeConfig, blocks: list[Block] | None, needed: int,
                 dtype_bytes: int, gpu_memory_gb: float) -> list[StagePlan]:
    params = layer_weights(shape, needed)
    e = config.engine
    activation = e.in_flight * config.batch_size * config.max_length * shape.hidden_size * dtype_bytes * 2
    accumulator = BlockStats.nbytes(shape.hidden_size)
    size = config.layers_to_skip
    gathers = blocks is None and config.profile_gathers_statistics
    candidate = CandidateStats.nbytes(shape.hidden_size, weighted=config.selection == "residual") * e.shards_in_flight
    plans = []
    for index, (first, end) in enumerate(split_stages(params, e.stages)):
        if blocks is None:
            ending = min(config.num_A, end - first)
        else:
            ending = sum(first <= block_end - 1 < end for _, block_end in blocks)
        candidates = sum(first <= s + size - 1 < end for s in range(1, needed - size + 1)) if gathers else 0
        stage_params = sum(params[first:end])
        total = stage_params * dtype_bytes + activation + max(ending * accumulator, candidates * candidate)
        plans.append(StagePlan(index, (first, end), stage_params, stage_params * dtype_bytes, activation,
                               ending, ending * accumulator, candidates, candidates * candidate, total,
                               total <= gpu_memory_gb * GB))
    return plans


# --- the plan ----------------------------------------------------------------------------------


def plan(config: ReplaceMeConfig, *, tokens: int | None = None, gpus_per_node: int = 8,
         gpu_memory_gb: float = 80.0, mfu: float = DEFAULT_MFU, peak: Peak | None = None) -> Plan:
    """Plan from the config.json at ``config.model_path`` (local folder or fsspec URI)."""
    checkpoint = Checkpoint(config.model_path, storage_options=config.storage_options(config.model_path),
                            allow_pickle=config.allow_pickle)
    return build_plan(checkpoint.config, config, tokens=tokens, gpus_per_node=gpus_per_node,
                      gpu_memory_gb=gpu_memory_gb, mfu=mfu, peak=peak)


def build_plan(model_config: dict[str, Any], config: ReplaceMeConfig, *, tokens: int | None = None,
               gpus_per_node: int = 8, gpu_memory_gb: float = 80.0, mfu: float = DEFAULT_MFU,
               peak: Peak | None = None) -> Plan:
    """Plan from an already read config.json (see the module docstring for every formula)."""
    check_estimator(family_for(model_config), config.diag)
    shape = model_shape(model_config)
    blocks, needed, num_blocks = _blocks(config, shape.num_layers)
    e = config.engine
    if e.stages > needed:
        raise ReplaceMeError(f"engine.stages: {e.stages} stages but only {needed} layers are needed; use at most {needed}")
    dtype, reason = compute_dtype(config, shape.checkpoint_dtype)
    total_tokens, source = _tokens(config, tokens)
    rows = config.dataset_size or math.ceil(total_tokens / config.max_length)
    batches = math.ceil(rows / config.batch_size)
    shards = math.ceil(batches / e.batches_per_shard)
    stages = _stage_plans(shape, config, blocks, needed, FLOAT_DTYPES[dtype].itemsize, gpu_memory_gb)
    flops = _flops(shape, needed, total_tokens, config.max_length)
    in_process = _in_process(shape, config, blocks, needed, batches)
    evaluation = _evaluation(shape, config, blocks, rows, in_process)
    wall_time = _wall_time(config, dtype, flops, in_process, evaluation, mfu, peak or find_peak(None, None))
    return Plan(
        model_path=config.model_path, model=shape, compute_dtype=dtype, compute_dtype_reason=reason,
        blocks=blocks, num_blocks=num_blocks, needed_layers=needed, tokens=total_tokens, tokens_source=source,
        rows=rows, batches=batches, shards=shards, replicas=e.replicas, stages=stages,
        gpus=e.replicas * e.stages * e.gpus_per_stage, cpus=e.replicas * e.stages * e.cpus_per_stage,
        gpus_per_node=gpus_per_node, nodes=_nodes(e.replicas * e.stages, e.gpus_per_stage, gpus_per_node),
        gpu_memory_gb=gpu_memory_gb, every_stage_fits=all(s.fits_one_gpu for s in stages),
        activation_store=_store(config, shape.hidden_size, num_blocks, total_tokens, shards),
        flops=flops, in_process=in_process, evaluation=evaluation, wall_time=wall_time,
    )


def _evaluation(shape: ModelShape, config: ReplaceMeConfig, blocks: list[Block] | None, rows: int,
                in_process: InProcessPlan) -> EvaluationPlan | None:
    e = config.eval
    if e is None:
        return None
    removed = sum(end - start for start, end in blocks) if blocks else config.num_A * config.layers_to_skip
    kept = shape.num_layers - removed
    length = e.max_length or config.max_length
    tokens = (e.dataset_size or rows) * length if e.dataset is not None else 0
    matmul = 2 * (sum(shape.layer_matmul_params) + sum(sorted(shape.layer_matmul_params)[:kept])) * tokens
    attention = 2 * 2 * tokens * length * shape.attention_width * (shape.num_layers + kept)
    heads = 2 * 2 * shape.embedding_params * tokens  # source and pruned LM heads, vocab × hidden each
    peak = next((p.peak_bytes for p in in_process.passes if p.name == "evaluate"), None)
    itemsize = FLOAT_DTYPES[shape.checkpoint_dtype].itemsize if shape.checkpoint_dtype in FLOAT_DTYPES else 2
    model_bytes = (2 * shape.embedding_params + sum(sorted(shape.layer_params)[:kept])) * itemsize
    return EvaluationPlan(tokens, matmul + attention + heads, peak, list(e.lm_eval_tasks),
                          model_bytes if e.lm_eval_tasks else 0)


def _wall_time(config: ReplaceMeConfig, ray_dtype: str, flops: FlopsPlan, in_process: InProcessPlan,
               evaluation: EvaluationPlan | None, mfu: float, peak: Peak) -> WallTime:
    passes = sum(1 for p in in_process.passes if p.name != "evaluate")
    e = config.engine
    runs: list[tuple[str, float, int, str]] = []
    if e.backend == "ray" and e.gpus_per_stage > 0:
        runs.append(("calibration on Ray", passes * flops.total, e.replicas * e.stages, ray_dtype))
    runs.append(("calibration in-process", passes * flops.total, 1, in_process.compute_dtype))
    if evaluation is not None and evaluation.flops:
        runs.append(("evaluation in the driver", evaluation.flops, 1, in_process.compute_dtype))
    estimates = []
    for name, total, devices, dtype in runs:
        tflops = peak.tflops_float32 if dtype == "float32" else peak.tflops_16bit
        seconds = total / (devices * tflops * 1e12 * mfu) if tflops else None
        estimates.append(Duration(name, total, devices, dtype, tflops, seconds))
    return WallTime(mfu, peak, estimates)


def _blocks(config: ReplaceMeConfig, num_layers: int) -> tuple[list[Block] | None, int, int]:
    """(explicit blocks or None, layers needed, number of blocks): the worst case without blocks."""
    if config.blocks:
        blocks = check_blocks(config.blocks, num_layers, config.merge_consecutive)
        return blocks, max(end for _, end in blocks), len(blocks)
    if config.layers_to_skip >= num_layers:
        raise ReplaceMeError(f"layers_to_skip: {config.layers_to_skip} must be smaller than the model's {num_layers} layers")
    return None, num_layers, config.num_A


def _tokens(config: ReplaceMeConfig, tokens: int | None) -> tuple[int, str]:
    if tokens is not None:
        return tokens, "--tokens"
    if config.dataset_size is not None:
        return config.dataset_size * config.max_length, f"dataset_size {config.dataset_size} × max_length {config.max_length}"
    raise ReplaceMeError("dataset_size is not set, so the number of calibration tokens is unknown; "
                         "pass --tokens N or set dataset_size")


def _nodes(actors: int, gpus_per_stage: float, gpus_per_node: int) -> int:
    """Nodes for ``actors`` stage actors; an actor's GPUs are on one node."""
    if gpus_per_stage == 0:
        return 0
    if gpus_per_stage > gpus_per_node:
        raise ReplaceMeError(f"engine.gpus_per_stage: {gpus_per_stage:g} GPUs do not fit on one node of "
                             f"{gpus_per_node} GPUs (--gpus-per-node); a stage actor runs on one node")
    per_node = math.floor(gpus_per_node / gpus_per_stage + 1e-9)
    return math.ceil(actors / per_node)


def _store(config: ReplaceMeConfig, hidden: int, blocks: int, tokens: int, shards: int) -> StorePlan | None:
    if config.activations.uri is None:
        return None
    rows = blocks * tokens * STORE_COLUMNS * hidden * STORE_BYTES if config.activations.save_rows else 0
    statistics = blocks * shards * BlockStats.nbytes(hidden)
    return StorePlan(config.activations.uri, rows, statistics, rows + statistics)


def _in_process(shape: ModelShape, config: ReplaceMeConfig, blocks: list[Block] | None, needed: int,
                batches: int) -> InProcessPlan:
    """The in-process engine's passes under ``engine.memory_budget``, with the engine's own arithmetic."""
    dtype, reason = _local_dtype(config, shape.checkpoint_dtype)
    itemsize = FLOAT_DTYPES[dtype].itemsize
    if config.engine.memory_budget == "auto":
        budget = resolve_budget("auto", torch.device("cpu"))
        source = f"auto: {AUTO_SHARE:.0%} of the memory free on this machine now (a run resolves it where it runs)"
    else:
        budget, source = parse_size(config.engine.memory_budget), "engine.memory_budget"
    h, n = shape.hidden_size, shape.num_layers
    layer_bytes = [p * itemsize for p in shape.layer_params]
    embedding = shape.embedding_params * itemsize
    accumulators = BlockStats.nbytes(h)
    second_pass_reason = None if blocks else config.second_pass_reason
    passes = []
    if blocks is None:  # profile
        count = n - config.layers_to_skip
        candidates = count * CandidateStats.nbytes(h, weighted=config.selection == "residual")
        gathers = config.profile_gathers_statistics
        if gathers and not held_fits(candidates, budget):  # as LocalEngine._candidate_sums decides
            gathers, second_pass_reason = False, (
                f"the {count} candidate blocks' statistics ({gib(candidates)}) exceed half the budget: the profile "
                "measures distances only, selects by distance and the blocks are fitted in a second pass")
        passes.append(("profile", layer_bytes, batches, config.batch_size, config.max_length,
                       profile_states(config.layers_to_skip, gathers), (candidates if gathers else 0) + embedding, 0))
    one_pass = blocks is None and second_pass_reason is None
    if not one_pass:
        fitted = len(blocks or range(config.num_A))
        rows = 0  # method: cosine without a store keeps X, Y, residual rows (float32), joined for the solver
        if config.method == "cosine" and config.activations.uri is None:
            rows = fitted * batches * config.batch_size * config.max_length * h * 3 * 4 * 2
        passes.append(("calibrate", layer_bytes[:needed], batches, config.batch_size, config.max_length,
                       CALIBRATION_STATES, fitted * accumulators + rows + embedding, 0))
    if config.eval is not None and config.eval.dataset is not None:
        e = config.eval
        removed = sum(end - start for start, end in blocks) if blocks else config.num_A * config.layers_to_skip
        eval_batches = math.ceil((e.dataset_size or batches * config.batch_size) / (e.batch_size or config.batch_size))
        heads = 2 * (shape.embedding_params * itemsize + h * itemsize)  # source and pruned LM heads (as wide as the embeddings)
        passes.append(("evaluate", layer_bytes + layer_bytes[:n - removed], eval_batches,
                       e.batch_size or config.batch_size, e.max_length or config.max_length, EVALUATION_STATES,
                       heads + embedding, LOGITS_BYTES))
    plans = [_pass_plan(shape, itemsize, budget, *p, config.engine.batches_per_shard) for p in passes]
    return InProcessPlan(budget, source, dtype, reason, one_pass, second_pass_reason,
                         plans, all(p.peak_bytes <= budget for p in plans), max((p.least_bytes for p in plans), default=0))


def _pass_plan(shape: ModelShape, itemsize: int, budget: int, name: str, layer_bytes: list[int], batches: int,
               batch_size: int, length: int, states: int, fixed: int, logits: int, batches_per_shard: int) -> PassPlan:
    batch = BatchShape(batch_size, length, shape.hidden_size, shape.intermediate_size, shape.num_heads, itemsize)
    least = plan_pass(batch, budget=2**62, layer_bytes=[max(layer_bytes)], states=states, fixed_bytes=fixed,
                      num_batches=1, what=name, logits=logits)
    least_bytes = least.peak_bytes - least.kwargs_bytes - 2 * least.logits_bytes  # those shrink with the budget
    try:
        p = plan_pass(batch, budget=budget, layer_bytes=layer_bytes, states=states, fixed_bytes=fixed,
                      num_batches=batches, batches_per_shard=batches_per_shard, what=name, logits=logits)
    except ReplaceMeError:  # the budget cannot hold one batch: shown as not fitting
        return PassPlan(name, len(layer_bytes), batches, 0, 0, False, sum(layer_bytes), least.fixed_bytes,
                        least.batch_bytes, least_bytes, least_bytes)
    return PassPlan(name, len(layer_bytes), batches, p.num_chunks, p.chunk_batches, p.resident, p.weights_bytes,
                    p.fixed_bytes, p.batch_bytes, p.peak_bytes, least_bytes)


def _local_dtype(config: ReplaceMeConfig, checkpoint_dtype: str) -> tuple[str, str]:
    """The in-process engine's compute dtype (``layerwise.resolve_dtype`` on ``device``)."""
    if config.compute_dtype != "auto":
        return config.compute_dtype, "compute_dtype"
    if config.device == "cuda":
        return checkpoint_dtype, "checkpoint dtype on device: cuda"
    return "float32", "auto: float32 on CPU; set device: cuda for the checkpoint dtype on a GPU"


def _flops(shape: ModelShape, needed: int, tokens: int, max_length: int) -> FlopsPlan:
    matmul = 2 * sum(shape.layer_matmul_params[:needed]) * tokens
    attention = 2 * 2 * tokens * max_length * shape.attention_width * needed
    return FlopsPlan(matmul, attention, matmul + attention)


# --- output ------------------------------------------------------------------------------------


def to_json(result: Plan) -> str:
    return json.dumps(result.to_dict(), indent=2)


def format_plan(result: Plan) -> str:
    """The plan as a plain-text table, each estimate with the formula behind it."""
    p, m = result, result.model
    if p.blocks is None:
        blocks = f"selected by distance: planned for the worst case, {p.num_blocks} block(s) and all {m.num_layers} layers"
    else:
        blocks = f"{[list(b) for b in p.blocks]}: layers [0, {p.needed_layers}) of {m.num_layers} needed"
    lines = [
        f"plan for {p.model_path}",
        f"model        {m.model_type}, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"compute dtype {p.compute_dtype} ({p.compute_dtype_reason})",
        f"blocks       {blocks}",
        f"calibration  {p.tokens:,} tokens ({p.tokens_source}); {p.rows:,} rows, {p.batches:,} batches, {p.shards:,} shards",
        f"pipeline     {p.replicas} replica(s) × {len(p.stages)} stage(s)",
        "",
        f"{'stage':>5}  {'layers':<10} {'params':>14} {'weights':>12} {'activations':>12} "
        f"{'blocks':>6} {'accumulators':>12} {'candidates':>10} {'statistics':>12} {'total':>12}  "
        f"fits one {p.gpu_memory_gb:g} GB GPU",
    ]
    for s in p.stages:
        lines.append(
            f"{s.index:>5}  {f'[{s.layers[0]}, {s.layers[1]})':<10} {s.params:>14,} {_gb(s.param_bytes):>12} "
            f"{_gb(s.activation_bytes):>12} {s.accumulator_blocks:>6} {_gb(s.accumulator_bytes):>12} "
            f"{s.candidate_blocks:>10} {_gb(s.candidate_bytes):>12} {_gb(s.total_bytes):>12}  "
            f"{'yes' if s.fits_one_gpu else 'NO'}"
        )
    lines += [
        "       stage 0 includes the embeddings; total = weights + activations (in_flight × batch_size × "
        "max_length × hidden × dtype bytes × 2) + the larger of accumulators (blocks ending in the stage × 2 × "
        "hidden² × 8, calibrate pass) and statistics (candidate blocks ending in the stage × shards in flight × "
        "2 × hidden² × 8, twice with selection: residual, profile pass)",
        "",
        f"resources    {p.gpus:g} GPUs, {p.cpus:g} CPUs (replicas × stages × per stage), "
        + (f"{p.nodes} node(s) of {p.gpus_per_node} GPUs" if p.gpus else "no GPU nodes (engine.gpus_per_stage is 0)"),
        f"store        {_format_store(p.activation_store)}",
        f"flops        {p.flops.total:.3e} forward = matmul {p.flops.matmul:.3e} (2 × linear weights × tokens) "
        f"+ attention {p.flops.attention:.3e} (4 × tokens × max_length × d_attn {m.attention_width} × {p.needed_layers} layers)",
        "",
        *_format_in_process(p.in_process),
        *_format_evaluation(p.evaluation),
        *_format_wall_time(p.wall_time),
    ]
    return "\n".join(lines)


def _format_evaluation(e: EvaluationPlan | None) -> list[str]:
    if e is None:
        return ["driver       no evaluation (no eval section)"]
    perplexity = (f"perplexity over {e.eval_tokens:,} eval tokens, peak ≈ {gib(e.perplexity_peak_bytes)} (the evaluate "
                  "pass above, under engine.memory_budget)" if e.perplexity_peak_bytes is not None else "no perplexity")
    lines = [f"driver       evaluation runs in the driver for every backend: {perplexity}"]
    if e.lm_eval_tasks:
        lines.append(f"             lm-eval ({', '.join(e.lm_eval_tasks)}) loads the pruned model whole: "
                     f"{gib(e.lm_eval_model_bytes)} of weights in the checkpoint dtype, plus lm-eval's batches")
    return lines


def _format_wall_time(w: WallTime | None) -> list[str]:
    if w is None:
        return []
    lines = [f"wall time    at MFU {w.mfu:g} (--mfu, default {DEFAULT_MFU:g}); peak: {w.peak.source}"]
    for d in w.estimates:
        time = _duration(d.seconds) if d.seconds is not None else "unknown"
        per = f"{d.peak_tflops:g} TFLOP/s {'FP32' if d.dtype == 'float32' else '16-bit'}" if d.peak_tflops else "no peak"
        lines.append(f"  {d.name:<26} {time:>10}  ({d.flops:.3e} FLOPs on {d.devices} device(s), {per})")
    lines.append("             = FLOPs / (devices × peak × MFU); reading weights and data, Ray's transfers and the "
                 "solve are not counted")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _format_in_process(plan: InProcessPlan) -> list[str]:
    """The in-process engine (engine.backend: local) under its budget, pass by pass."""
    fit = "fits" if plan.fits else f"does NOT fit: raise it to at least {gib(max(p.least_bytes for p in plan.passes))}"
    lines = [f"in-process   engine.backend: local in {gib(plan.budget_bytes)} ({plan.budget_source}), "
             f"compute dtype {plan.compute_dtype} ({plan.compute_dtype_reason}): {fit}"]
    if plan.one_pass:
        lines.append("             one pass: the profile pass gathers every candidate block's statistics, no calibrate pass")
    elif plan.second_pass_reason:
        lines.append(f"             two passes: {plan.second_pass_reason}")
    for p in plan.passes:
        if p.chunks == 0:
            lines.append(f"  {p.name:<10} cannot run in this budget: needs at least {gib(p.least_bytes)} "
                         f"(weights streamed, one batch per chunk)")
            continue
        weights = "resident" if p.resident else "streamed (re-read per chunk)"
        lines.append(f"  {p.name:<10} {p.layers} layers, weights {gib(p.weights_bytes)} {weights}; {p.chunks:,} chunk(s) "
                     f"of {p.chunk_batches:,} batch(es) of {gib(p.batch_bytes)}; fixed {gib(p.fixed_bytes)}; "
                     f"peak ≈ {gib(p.peak_bytes)} (least {gib(p.least_bytes)})")
    lines.append("             fixed = accumulators (2 × hidden² × 8 per block; per candidate when the profile gathers "
                 "statistics, 4 × hidden² × 8 with selection: residual; with method: cosine and no activations.uri "
                 "every token's rows, 24 × hidden bytes per token and block) + embeddings "
                 "(+ LM heads) + one layer's temporaries + cached arguments; a batch = hidden states alive × "
                 "batch_size × max_length × hidden × dtype bytes")
    return lines


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:,.2f} GB"


def _format_store(store: StorePlan | None) -> str:
    if store is None:
        return "none (activations.uri is not set)"
    return (f"{_gb(store.total_bytes)} to {store.uri} = rows {_gb(store.rows_bytes)} (blocks × tokens × 3 × hidden × 2) "
            f"+ statistics {_gb(store.statistics_bytes)} (blocks × shards × 2 × hidden² × 8)")
