"""``replaceme plan`` on a Llama-3-70B-shaped config.json (no weights), checked against hand counts."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from conftest import write_config
from replaceme.cli import main
from replaceme.config import validate_config
from replaceme.errors import ReplaceMeError
from replaceme.planner import plan, split_stages

# --- Llama 3 70B, counted by hand ------------------------------------------------------------------
H, INTERMEDIATE, VOCAB, LAYERS = 8192, 28672, 128256, 80
KV = H // 8  # 8 KV heads of 128 of 64 heads: k and v project to h/8 (GQA)
ATTENTION = H * H + 2 * H * KV + H * H  # q, k, v, o
MLP = 3 * H * INTERMEDIATE  # gate, up, down
LINEAR = ATTENTION + MLP  # 855,638,016 weights that cost matmul FLOPs
LAYER = LINEAR + 2 * H  # + input and post-attention RMSNorm
EMBEDDINGS = VOCAB * H
BF16 = 2
ACCUMULATOR = 2 * H * H * 8  # float64 XᵀX and XᵀY of one block

LLAMA3_70B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=LAYERS, hidden_size=H,
    intermediate_size=INTERMEDIATE, num_attention_heads=64, num_key_value_heads=8, vocab_size=VOCAB, torch_dtype="bfloat16",
    rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_id=128001,
)


def test_hand_count_is_llama_3_70b():
    assert LAYER == 855_654_400
    assert LAYERS * LAYER + 2 * EMBEDDINGS + H == 70_553_706_496  # + lm_head and final norm: the published 70.6B


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "llama-3-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_70B))
    return folder


def config(model_dir, **values):
    return validate_config({"model_path": str(model_dir), "dataset": "never-read.jsonl", **values})


def test_explicit_block_two_replicas_three_stages(model_dir):
    c = config(model_dir, blocks=[[50, 60]], dataset_size=2048, max_length=512, batch_size=8,
               engine=dict(backend="ray", replicas=2, stages=3, gpus_per_stage=1, in_flight=4, batches_per_shard=4),
               activations=dict(uri="s3://bucket/acts"))
    p = plan(c)
    assert p.model.layer_params == (LAYER,) * LAYERS and p.model.embedding_params == EMBEDDINGS
    assert p.compute_dtype == "bfloat16" and p.needed_layers == 60  # block [50, 60) ends at layer 59

    # 60 layers + embeddings (1.23 layers) in 3 stages: the largest can be no smaller than 21 layers,
    # since below that stage 0 holds at most 19 (embeddings + 20 > 21) and the others 20 each: 59 < 60.
    assert [s.layers for s in p.stages] == [(0, 19), (19, 40), (40, 60)]
    assert [s.params for s in p.stages] == [EMBEDDINGS + 19 * LAYER, 21 * LAYER, 20 * LAYER]
    activations = 4 * 8 * 512 * H * BF16 * 2  # in flight × batch × length × hidden × bytes × (in, out)
    assert activations == 536_870_912
    assert [s.accumulator_blocks for s in p.stages] == [0, 0, 1]
    assert [s.total_bytes for s in p.stages] == [
        (EMBEDDINGS + 19 * LAYER) * BF16 + activations,
        21 * LAYER * BF16 + activations,
        20 * LAYER * BF16 + activations + ACCUMULATOR,
    ]
    assert p.every_stage_fits

    tokens = 2048 * 512
    assert (p.tokens, p.rows, p.batches, p.shards) == (tokens, 2048, 2048 // 8, 2048 // 8 // 4)
    assert (p.gpus, p.cpus, p.nodes) == (6, 6, 1)
    assert p.activation_store.rows_bytes == tokens * 3 * H * 2 == 51_539_607_552
    assert p.activation_store.statistics_bytes == 64 * ACCUMULATOR == 68_719_476_736
    assert p.flops.matmul == 2 * 60 * LINEAR * tokens
    assert p.flops.attention == 2 * 2 * tokens * 512 * H * 60
    assert p.flops.total == p.flops.matmul + p.flops.attention

    tight = plan(c, gpu_memory_gb=36)  # stage 1 needs 36.47 GB
    assert [s.fits_one_gpu for s in tight.stages] == [True, False, True] and not tight.every_stage_fits


def test_selected_blocks_plan_the_worst_case(model_dir):
    c = config(model_dir, num_A=2, layers_to_skip=8, max_length=2048, batch_size=4,
               engine=dict(replicas=4, stages=8, gpus_per_stage=2, cpus_per_stage=4, batches_per_shard=8))
    p = plan(c, tokens=4_000_000, gpus_per_node=8)
    assert p.blocks is None and p.needed_layers == LAYERS and p.num_blocks == 2
    # cap 11 layers: stage 0 takes 9 (+ embeddings = 10.23 layers), the rest 11 each, the last what is left
    assert [s.layers for s in p.stages] == [(0, 9), (9, 20), (20, 31), (31, 42), (42, 53), (53, 64), (64, 75), (75, 80)]
    assert all(s.accumulator_blocks == 2 for s in p.stages)  # either selected block may end in any stage
    # the profile pass sums the statistics of the candidates [68, 76) … [72, 80) on the last stage, for the 2
    # shards in flight, plain and stream-weighted (selection: residual); they outweigh the 2 blocks' accumulators
    last = p.stages[-1]
    assert (last.candidate_blocks, last.candidate_bytes) == (5, 5 * 2 * 2 * ACCUMULATOR)
    assert last.total_bytes == 5 * LAYER * BF16 + 4 * 4 * 2048 * H * BF16 * 2 + 5 * 2 * 2 * ACCUMULATOR
    distance = plan(c.model_copy(update={"selection": "distance"}), tokens=4_000_000, gpus_per_node=8)
    assert distance.stages[-1].candidate_bytes == 0  # num_A 2, sequential: fitted in a second pass, no statistics
    assert (p.tokens, p.tokens_source, p.rows) == (4_000_000, "--tokens", math.ceil(4_000_000 / 2048)) == (4_000_000, "--tokens", 1954)
    assert (p.batches, p.shards) == (489, 62)  # ceil(1954 / 4), ceil(489 / 8)
    assert (p.gpus, p.cpus) == (4 * 8 * 2, 4 * 8 * 4)
    assert p.nodes == 8  # 4 stage actors of 2 GPUs per 8-GPU node
    assert p.activation_store is None
    assert p.flops.total == 2 * 80 * LINEAR * 4_000_000 + 4 * 4_000_000 * 2048 * H * 80


def test_compute_dtype_follows_the_stage_device(model_dir):
    cpu = plan(config(model_dir, blocks=[[2, 4]], dataset_size=16))  # gpus_per_stage 0: float32, as the run would
    assert (cpu.compute_dtype, cpu.nodes, cpu.gpus) == ("float32", 0, 0)
    assert cpu.stages[0].param_bytes == (EMBEDDINGS + 4 * LAYER) * 4
    explicit = plan(config(model_dir, blocks=[[2, 4]], dataset_size=16, compute_dtype="float16",
                           engine=dict(gpus_per_stage=1)))
    assert explicit.compute_dtype == "float16" and explicit.stages[0].param_bytes == (EMBEDDINGS + 4 * LAYER) * 2


def test_nodes_pack_whole_stage_actors(model_dir):
    c = config(model_dir, dataset_size=16, engine=dict(replicas=5, stages=1, gpus_per_stage=3))
    assert plan(c).nodes == 3  # 2 actors of 3 GPUs per 8-GPU node; ceil(15 GPUs / 8) would say 2


def test_split_stages_is_minimax_against_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        weights = [rng.randint(1, 20) for _ in range(rng.randint(1, 9))]
        stages = rng.randint(1, len(weights))
        ranges = split_stages(weights, stages)
        assert len(ranges) == stages and ranges[0][0] == 0 and ranges[-1][1] == len(weights)
        assert all(a < b and b == c for (a, b), (c, _) in zip(ranges, [*ranges[1:], (len(weights), 0)], strict=True))
        best = min(
            max(sum(weights[a:b]) for a, b in zip((0, *cuts), (*cuts, len(weights)), strict=True))
            for cuts in itertools.combinations(range(1, len(weights)), stages - 1)
        )
        assert max(sum(weights[a:b]) for a, b in ranges) == best


def test_cli_plan_json_and_table(model_dir, tmp_path, capsys):
    job = write_config(tmp_path / "job.yaml", model_path=str(model_dir), dataset="never-read.jsonl",
                       blocks=[[50, 60]], engine=dict(replicas=2, stages=3, gpus_per_stage=1))
    assert main(["plan", "-c", str(job), "--tokens", "1048576", "--json", "--set", "activations.uri=file:///acts"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in data["stages"]] == [[0, 19], [19, 40], [40, 60]]
    assert data["stages"][2]["accumulator_bytes"] == ACCUMULATOR
    assert (data["gpus"], data["nodes"], data["tokens"], data["rows"]) == (6, 1, 1048576, 2048)
    assert data["activation_store"]["total_bytes"] == 1048576 * 3 * H * 2 + 64 * ACCUMULATOR
    assert data["flops"]["total"] == 2 * 60 * LINEAR * 1048576 + 4 * 1048576 * 512 * H * 60

    assert main(["plan", "-c", str(job), "--tokens", "1048576", "--gpu-memory-gb", "40"]) == 0
    table = capsys.readouterr().out
    assert "fits one 40 GB GPU" in table and "[19, 40)" in table and "6 GPUs" in table
    assert "2 × linear weights × tokens" in table


@pytest.mark.parametrize("values, args, message", [
    (dict(blocks=[[1, 3]], engine=dict(stages=4)), ["--tokens", "10"],
     "engine.stages: 4 stages but only 3 layers are needed; use at most 3"),
    (dict(blocks=[[1, 3]]), [], "dataset_size is not set, so the number of calibration tokens is unknown; "
     "pass --tokens N or set dataset_size"),
    (dict(dataset_size=8, engine=dict(gpus_per_stage=16)), [], "engine.gpus_per_stage: 16 GPUs do not fit on one "
     "node of 8 GPUs (--gpus-per-node); a stage actor runs on one node"),
    (dict(dataset_size=8, blocks=[[70, 81]]), [], "blocks: [70, 81] ends past the model's last layer (80 layers, 0..79)"),
])
def test_bad_plans_are_one_line_errors(model_dir, tmp_path, capsys, values, args, message):
    job = write_config(tmp_path / "job.yaml", model_path=str(model_dir), dataset="never-read.jsonl", **values)
    assert main(["plan", "-c", str(job), *args]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_missing_config_json_unsupported_family_and_unfoldable_map(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReplaceMeError, match=r"^model_path: .*empty has no config.json"):
        plan(config(empty, dataset_size=8))
    (empty / "config.json").write_text(json.dumps({**LLAMA3_70B, "model_type": "gpt2"}))
    with pytest.raises(ReplaceMeError, match=r"^model_path: model_type 'gpt2' is not supported; supported: gemma2"):
        plan(config(empty, dataset_size=8))
    (empty / "config.json").write_text(json.dumps({**LLAMA3_70B, "model_type": "gemma2"}))
    with pytest.raises(ReplaceMeError, match=r"^diag: gemma2 normalises the MLP output"):  # the run would refuse it
        plan(config(empty, dataset_size=8))


# --- the in-process engine's memory ---------------------------------------------------------------

LLAMA3_8B = {**LLAMA3_70B, "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
             "num_attention_heads": 32}


def test_paper_reproduction_shape_fits_64_gb_in_process(tmp_path):
    """The paper's settings (8,000 texts × 1,024 tokens, 8 of 32 layers) on an 8B-shaped config."""
    folder = tmp_path / "llama-3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    p = plan(config(folder, dataset_size=8000, max_length=1024, batch_size=8, layers_to_skip=8,
                    engine=dict(memory_budget="64GB"))).in_process
    assert p.budget_bytes == 64 * 10**9 and p.fits and p.one_pass
    (profile,) = p.passes
    h = 4096
    # q and o h², k and v h/4 wide (8 KV heads of 128), the MLP, two norms; float32 on CPU
    assert profile.weights_bytes == 32 * (2 * h * h + h * h // 2 + 3 * h * 14336 + 2 * h) * 4
    assert profile.fixed_bytes > 24 * 4 * h * h * 8  # the 24 candidates' XᵀX and XᵀY, plain and weighted
    assert profile.resident and profile.peak_bytes <= 64 * 10**9 < profile.peak_bytes + profile.batch_bytes * 30


def test_too_small_a_budget_names_the_least_that_runs(model_dir, capsys, tmp_path):
    path = write_config(tmp_path / "job.yaml", model_path=str(model_dir), dataset="never-read.jsonl",
                        dataset_size=64, max_length=512, layers_to_skip=8, engine=dict(memory_budget="8GB"))
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "in-process   engine.backend: local in 7.45 GiB (engine.memory_budget)" in out
    assert "does NOT fit: raise it to at least" in out and "profile    cannot run in this budget" in out


def test_plan_uses_the_engines_arithmetic(tmp_path, tiny_llama):
    """The planner's profile pass equals the engine's own plan for the same budget and full batches."""
    import torch

    from conftest import CALIB
    from replaceme import recipe

    values = dict(model_path=str(tiny_llama), dataset=str(CALIB), dataset_size=24, max_length=32, batch_size=4,
                  layers_to_skip=2, output_dir=str(tmp_path / "out"), engine=dict(memory_budget="1.6MB"))
    planned = plan(validate_config(values)).in_process.passes[0]
    ctx = recipe.Context(validate_config(values), progress=False)
    assert all(b.input_ids.shape == (4, 32) for b in ctx.batches)
    engine = recipe.calibration_engine(ctx)
    engine.profile(2, statistics=True, weighted=True)  # as the default selection: residual gathers them
    real = engine.last_plan
    assert real.num_chunks > 1 and not real.resident  # the test covers chunks and streamed weights
    assert (planned.chunks, planned.chunk_batches, planned.resident, planned.weights_bytes, planned.fixed_bytes,
            planned.batch_bytes, planned.peak_bytes) == (real.num_chunks, real.chunk_batches, real.resident,
                                                         real.weights_bytes, real.fixed_bytes, real.batch_bytes,
                                                         real.peak_bytes)
    assert torch.get_default_dtype() == torch.float32


def test_plan_counts_the_rows_cosine_keeps_in_memory(tmp_path, tiny_llama):
    """method: cosine without activations.uri keeps every token's X, Y and residual rows: the
    calibrate pass's fixed memory grows by them (24 bytes per token, hidden unit and block)."""
    from conftest import CALIB

    values = dict(model_path=str(tiny_llama), dataset=str(CALIB), dataset_size=24, max_length=32, batch_size=4,
                  layers_to_skip=2, output_dir=str(tmp_path / "out"), method="cosine")
    cosine = {p.name: p for p in plan(validate_config(values)).in_process.passes}["calibrate"]
    stored = {p.name: p for p in plan(validate_config({**values, "activations": {"uri": str(tmp_path / "store")}})
                                      ).in_process.passes}["calibrate"]
    hidden = json.loads((tiny_llama / "config.json").read_text())["hidden_size"]
    assert cosine.fixed_bytes - stored.fixed_bytes == 24 * 32 * hidden * 3 * 4 * 2  # 24 texts of 32 tokens


def test_wall_time_at_a_stated_mfu_and_the_drivers_evaluation_needs(model_dir):
    from replaceme.planner import find_peak

    c = config(model_dir, blocks=[[50, 60]], dataset_size=2048, max_length=512, batch_size=8,
               engine=dict(backend="ray", replicas=2, stages=3, gpus_per_stage=1),
               eval=dict(dataset="never-read.jsonl", dataset_size=256, lm_eval_tasks=["piqa"]))
    p = plan(c, mfu=0.5, peak=find_peak("NVIDIA H100 80GB HBM3", None))
    ray, local, evaluation = p.wall_time.estimates
    assert (ray.name, ray.devices, ray.peak_tflops) == ("calibration on Ray", 6, 989.0)  # bf16 on the GPU stages
    assert ray.flops == p.flops.total  # explicit blocks: one pass
    assert ray.seconds == pytest.approx(p.flops.total / (6 * 989e12 * 0.5))
    assert (local.devices, local.dtype, local.peak_tflops) == (1, "float32", 67.0)  # in-process auto: float32
    assert local.seconds == pytest.approx(p.flops.total / (67e12 * 0.5))

    tokens = 256 * 512
    e = p.evaluation
    assert e.eval_tokens == tokens
    # the source's 80 layers and the pruned model's 70, then both LM heads
    assert e.flops == 2 * (80 + 70) * LINEAR * tokens + 2 * 2 * tokens * 512 * H * 150 + 2 * 2 * EMBEDDINGS * tokens
    assert evaluation.seconds == pytest.approx(e.flops / (67e12 * 0.5))
    assert e.perplexity_peak_bytes == p.in_process.passes[-1].peak_bytes and p.in_process.passes[-1].name == "evaluate"
    assert e.lm_eval_model_bytes == (2 * EMBEDDINGS + 70 * LAYER) * BF16  # the pruned model whole, in bf16


@pytest.mark.parametrize("name, known", [("H100", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA A100-SXM4-80GB", "A100"),
                                         ("AMD Instinct MI300X", "MI300X"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", None)])
def test_peaks_of_known_gpus(name, known):
    from replaceme.planner import PEAK_TFLOPS, find_peak

    peak = find_peak(name, None)
    assert peak.tflops_16bit == (PEAK_TFLOPS[known][0] if known else None)
    assert find_peak(name, 123.0).tflops_16bit == 123.0  # --peak-tflops wins


def test_plan_prints_the_wall_time_or_says_it_is_unknown(model_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("replaceme.planner.local_gpu", lambda: None)  # plan as on a CPU machine
    path = write_config(tmp_path / "job.yaml", model_path=str(model_dir), dataset="never-read.jsonl",
                        dataset_size=64, max_length=512, blocks=[[50, 60]], eval="never-read.jsonl")
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "wall time    at MFU 0.4 (--mfu, default 0.4); peak: unknown: no GPU here; pass --gpu NAME" in out
    assert "calibration in-process" in out and "unknown" in out
    assert "driver       evaluation runs in the driver for every backend: perplexity over 32,768 eval tokens" in out
    assert main(["plan", "--config", str(path), "--gpu", "a100", "--mfu", "0.25", "--set", "device=cuda"]) == 0
    out = capsys.readouterr().out
    assert "at MFU 0.25" in out and "A100 (a100): 312 TFLOP/s 16-bit dense" in out and "312 TFLOP/s 16-bit)" in out
    assert main(["plan", "--config", str(path), "--mfu", "1.5"]) == 2
    assert "--mfu: 1.5 is a share of the peak" in capsys.readouterr().err


def test_plan_and_engine_agree_when_the_candidates_statistics_exceed_half_the_budget(tmp_path, tiny_llama, caplog):
    """Four candidates of hidden 64 with their weighted part take 512 KiB: over half of a 1 MB budget.
    The engine then measures distances only; the plan says so and adds the calibrate pass."""
    from conftest import CALIB
    from replaceme import recipe

    values = dict(model_path=str(tiny_llama), dataset=str(CALIB), dataset_size=24, max_length=32, batch_size=4,
                  layers_to_skip=2, output_dir=str(tmp_path / "out"), engine=dict(memory_budget="1MB"))
    planned = plan(validate_config(values)).in_process
    assert not planned.one_pass and "4 candidate blocks' statistics (512.00 KiB) exceed half the budget" in \
        planned.second_pass_reason
    assert [p.name for p in planned.passes] == ["profile", "calibrate"]
    engine = recipe.calibration_engine(recipe.Context(validate_config(values), progress=False))
    with caplog.at_level("WARNING", logger="replaceme"):
        profile = engine.profile(2, statistics=True, weighted=True)
    assert profile.candidates is None and "not gathering the 4 candidate blocks' statistics" in caplog.text
    assert planned.passes[0].fixed_bytes == engine.last_plan.fixed_bytes  # no statistics planned in, none held
