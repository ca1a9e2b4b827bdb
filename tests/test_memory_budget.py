"""The in-process engine under a memory budget: chunked passes give the same numbers as one chunk.

Every pass adds its per-batch sums in batch order and its per-shard sums in shard order, whatever
the chunking, so the results are equal bit for bit — with the weights resident across chunks, or
streamed (re-read for every chunk). The profile pass's candidate statistics equal calibration's
to float64 round-off (calibration sums per shard first), and a run that selects and fits a block
reads the calibration set through the model once.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from conftest import CALIB, EVAL, build_tiny_model, texts
from replaceme import engine as engine_module
from replaceme import recipe
from replaceme.checkpoint import Checkpoint
from replaceme.config import validate_config
from replaceme.data import make_batches
from replaceme.engine import LocalEngine
from replaceme.errors import ReplaceMeError
from replaceme.layerwise import LayerwiseModel
from replaceme.memory import parse_size
from replaceme.solvers import solve_lstsq

CPU = torch.device("cpu")
LAYERS = 8
HUGE = "1TB"


@pytest.fixture(scope="module")
def model_and_batches(tmp_path_factory, tokenizer_dir):
    folder = build_tiny_model(tmp_path_factory.mktemp("budget"), tokenizer_dir, num_hidden_layers=LAYERS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    samples = [text[: 40 + 13 * i] for i, text in enumerate(texts(limit=28))]
    return folder, make_batches(samples, tokenizer, batch_size=4, max_length=48)  # 7 batches, uneven padding


@pytest.fixture(autouse=True)
def small_fixed_shares(monkeypatch):
    """Budgets below are a few hundred kB: no cached layer arguments, and logits 16 rows at a time
    (their shares of the budget would otherwise change with it)."""
    monkeypatch.setattr(engine_module, "KWARGS_CACHE_BYTES", 0)
    monkeypatch.setattr(engine_module, "LOGITS_BYTES", 4 * 384 * 16)


def engine(folder, batches, budget=HUGE, **options) -> LocalEngine:
    model = LayerwiseModel(Checkpoint(str(folder)), device=CPU, dtype=torch.float32)
    return LocalEngine(model, batches, progress=False, memory_budget=budget, batches_per_shard=3, **options)


def budget_for(folder, batches, pass_plan, *, resident: bool, chunk: int) -> int:
    """A budget that gives ``pass_plan``'s pass chunks of ``chunk`` batches, weights resident or streamed."""
    plan = pass_plan(engine(folder, batches))
    weights = plan.weights_bytes if resident else plan.largest_layer_bytes
    budget = weights + plan.fixed_bytes + chunk * plan.batch_bytes
    if not resident:
        assert budget < plan.weights_bytes + plan.fixed_bytes + plan.batch_bytes, "the weights would fit"
    return budget


def profile_plan(e: LocalEngine):
    e.profile(3, statistics=True, weighted=True)  # as a run with the default selection: residual
    return e.last_plan


def calibrate_plan(e: LocalEngine):
    e.calibrate([(2, 4), (5, 7)], lstsq)
    return e.last_plan


def lstsq(capture):
    return solve_lstsq(capture.stats, alpha=1e-3)[0]


def count_loads(monkeypatch) -> list[int]:
    loads: list[int] = []
    original = LayerwiseModel.load_layer
    monkeypatch.setattr(LayerwiseModel, "load_layer", lambda self, i: loads.append(i) or original(self, i))
    return loads


@pytest.mark.parametrize("resident", [True, False])
def test_profile_in_chunks_equals_one_chunk(model_and_batches, monkeypatch, resident):
    folder, batches = model_and_batches
    whole = engine(folder, batches).profile(3, statistics=True, weighted=True)
    budget = budget_for(folder, batches, profile_plan, resident=resident, chunk=2)
    loads = count_loads(monkeypatch)
    chunked_engine = engine(folder, batches, budget)
    chunked = chunked_engine.profile(3, statistics=True, weighted=True)
    plan = chunked_engine.last_plan
    assert (plan.num_chunks, plan.chunk_batches, plan.resident) == (4, 2, resident)
    assert plan.peak_bytes <= plan.budget
    assert chunked.distances == whole.distances  # bit for bit
    assert chunked.candidates.keys() == whole.candidates.keys() == {(s, s + 3) for s in range(1, LAYERS - 2)}
    for block, stats in whole.candidates.items():
        other = chunked.candidates[block]
        assert torch.equal(other.stats.xtx, stats.stats.xtx) and torch.equal(other.stats.xty, stats.stats.xty)
        assert (other.stats.tokens, other.stream_sq) == (stats.stats.tokens, stats.stream_sq)
        assert torch.equal(other.weighted.xtx, stats.weighted.xtx) and torch.equal(other.weighted.xty, stats.weighted.xty)
        assert other.weighted.yty_trace == stats.weighted.yty_trace
    # resident: each layer read once; streamed: every layer re-read for every chunk
    assert sorted(loads) == sorted(list(range(LAYERS)) * (1 if resident else plan.num_chunks))


def test_candidate_statistics_equal_calibration(model_and_batches):
    folder, batches = model_and_batches
    profiled = engine(folder, batches).profile(3, statistics=True).candidates
    for block in [(1, 4), (4, 7), (5, 8)]:
        ((capture, _),) = engine(folder, batches).calibrate([block], lstsq)
        torch.testing.assert_close(profiled[block].stats.xtx, capture.stats.xtx, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(profiled[block].stats.xty, capture.stats.xty, rtol=1e-12, atol=1e-9)
        assert profiled[block].stats.tokens == capture.stats.tokens
        assert profiled[block].stats.yty_trace == pytest.approx(capture.stats.yty_trace, rel=1e-12)


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("resident", [True, False])
def test_calibration_in_chunks_equals_one_chunk(model_and_batches, monkeypatch, sequential, resident):
    """Chunks of 2 batches split the 3-batch data shards: statistics still sum per shard, in order."""
    folder, batches = model_and_batches
    blocks = [(2, 4), (5, 7)]
    whole = engine(folder, batches).calibrate(blocks, lstsq, sequential=sequential)
    budget = budget_for(folder, batches, calibrate_plan, resident=resident, chunk=2)
    chunked_engine = engine(folder, batches, budget)
    chunked = chunked_engine.calibrate(blocks, lstsq, sequential=sequential)
    assert (chunked_engine.last_plan.num_chunks, chunked_engine.last_plan.resident) == (4, resident)
    for (capture, transform), (expected, expected_transform) in zip(chunked, whole, strict=True):
        assert capture.block == expected.block
        assert torch.equal(capture.stats.xtx, expected.stats.xtx) and torch.equal(capture.stats.xty, expected.stats.xty)
        assert torch.equal(transform, expected_transform)


def test_chunked_calibration_commits_the_same_store(model_and_batches, tmp_path):
    from replaceme.activations import ActivationStore

    folder, batches = model_and_batches
    budget = budget_for(folder, batches, calibrate_plan, resident=False, chunk=2)
    stores = {}
    for name, limit in (("whole", HUGE), ("chunked", budget)):
        store = ActivationStore(f"file://{tmp_path / name}", "run")
        engine(folder, batches, limit, store=store, save_rows=True).calibrate([(2, 4)], lstsq, keep_activations=True)
        stores[name] = store
    for shard in range(3):  # 7 batches, 3 per shard
        assert stores["chunked"].load_stats((2, 4), shard).to_bytes() == stores["whole"].load_stats((2, 4), shard).to_bytes()
    rows = [torch.cat([x for x, _, _ in s.iter_rows((2, 4))]) for s in stores.values()]
    assert torch.equal(*rows)


def test_perplexities_in_chunks_equal_one_chunk(model_and_batches):
    folder, batches = model_and_batches
    whole = engine(folder, batches).perplexities([engine(folder, batches)], shared=2)
    plan_engine = engine(folder, batches)
    plan_engine.perplexities([engine(folder, batches)], shared=2)
    plan = plan_engine.last_plan
    budget = plan.largest_layer_bytes + plan.fixed_bytes + 3 * plan.batch_bytes
    chunked_engine = engine(folder, batches, budget)
    chunked = chunked_engine.perplexities([engine(folder, batches, budget)], shared=2)
    assert chunked_engine.last_plan.num_chunks == 3 and not chunked_engine.last_plan.resident
    assert chunked == whole and whole[0] == whole[1]  # the same checkpoint twice: the same perplexity


def test_budget_too_small_for_one_batch_is_one_clear_error(model_and_batches):
    folder, batches = model_and_batches
    with pytest.raises(ReplaceMeError) as error:
        engine(folder, batches, "10kB").profile(3)
    message = str(error.value)
    assert message.startswith("engine.memory_budget: 9.77 KiB cannot hold one layer") and "raise it to at least" in message


@pytest.mark.parametrize("value, expected", [("64GB", 64 * 10**9), ("512MiB", 512 * 2**20), ("1.5e9", 1_500_000_000),
                                             (2048, 2048), (" 2 gib ", 2 * 2**30)])
def test_sizes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1GB", "0", "12 parsecs"])
def test_bad_budget_is_refused_naming_the_field(tmp_path, value):
    with pytest.raises(ReplaceMeError, match=r"engine.memory_budget: .* (is not a size|must be positive)"):
        validate_config(dict(model_path=str(tmp_path), dataset=str(CALIB), output_dir=str(tmp_path / "out"),
                             engine={"memory_budget": value}))


def run_config(folder, tmp_path, name, **changes):
    values = dict(model_path=str(folder), dataset=str(CALIB), eval=str(EVAL), dataset_size=16, max_length=32,
                  batch_size=4, layers_to_skip=3, output_dir=str(tmp_path / name), mlflow={"enabled": False})
    return validate_config({**values, **changes})


def test_selection_and_fit_read_the_calibration_set_once(model_and_batches, tmp_path, monkeypatch):
    folder, _ = model_and_batches
    config = run_config(folder, tmp_path, "one")
    budget = budget_for(folder, recipe.Context(config, progress=False).batches, profile_plan, resident=True, chunk=2)
    plans = []
    original = LocalEngine.profile
    monkeypatch.setattr(LocalEngine, "profile", lambda self, *a, **k: (original(self, *a, **k), plans.append(
        self.last_plan))[0])
    monkeypatch.setattr(LocalEngine, "calibrate", lambda *a, **k: pytest.fail("a second pass over the calibration set"))
    one_pass = recipe.run(run_config(folder, tmp_path, "one", engine={"memory_budget": budget}), progress=False)
    assert [p.num_chunks for p in plans] == [2]  # one profile pass, in two chunks
    monkeypatch.undo()
    # the same block fitted in a calibration pass of its own: the same map to round-off
    two_pass = recipe.run(run_config(folder, tmp_path, "two", blocks=[one_pass["blocks"][0]]), progress=False)
    assert one_pass["solver"][0]["relative_residual"] == pytest.approx(two_pass["solver"][0]["relative_residual"],
                                                                       rel=1e-9)
    assert one_pass["perplexity_after"] == pytest.approx(two_pass["perplexity_after"], rel=1e-6)


@pytest.mark.parametrize("changes, reason", [
    (dict(method="cosine"), "method: cosine fits on the activation rows"),
    (dict(num_A=2, layers_to_skip=2), "sequential: true fits each block after the first"),
])
def test_settings_that_need_a_second_pass_get_one(model_and_batches, tmp_path, monkeypatch, caplog, changes, reason):
    folder, _ = model_and_batches
    calls = []
    original = LocalEngine.calibrate
    monkeypatch.setattr(LocalEngine, "calibrate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with caplog.at_level("INFO", logger="replaceme"):
        recipe.run(run_config(folder, tmp_path, "out", save_transform_only=True, **changes), progress=False)
    assert calls == [1] and reason in caplog.text


def test_calibrate_never_reads_an_earlier_profiles_statistics(model_and_batches, tmp_path, monkeypatch):
    folder, _ = model_and_batches
    selected = run_config(folder, tmp_path, "out", save_transform_only=True)
    recipe.run_step(selected, "profile", progress=False)
    block = recipe.required_blocks(recipe.OutputDir(str(tmp_path / "out")))[0]
    assert (tmp_path / "out" / "profile" / f"stats-{block[0]}-{block[1]}.safetensors").exists()
    # the same block named, on other data: the profile step is redone and calibrate must run its own pass
    named = run_config(folder, tmp_path, "out", save_transform_only=True, blocks=[list(block)], dataset_size=12)
    recipe.run_step(named, "profile", progress=False, force=True)
    assert not (tmp_path / "out" / "profile").exists()
    calls = []
    original = LocalEngine.calibrate
    monkeypatch.setattr(LocalEngine, "calibrate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    (detail,) = recipe.run_step(named, "calibrate", progress=False).marker["solver"]
    assert calls == [1] and detail["tokens"] < 16 * 32


def test_cosine_rows_over_the_budget_are_refused_before_the_profile_pass(model_and_batches, tmp_path, monkeypatch):
    """method: cosine without a store keeps every token's rows in memory: a budget whose half cannot
    hold them is refused before any layer runs, naming activations.uri."""
    folder, _ = model_and_batches
    batches = recipe.Context(run_config(folder, tmp_path, "cosine"), progress=False).batches
    rows = sum(b.num_tokens for b in batches) * engine(folder, batches).model.hidden_size * 3 * 4 * 2
    config = run_config(folder, tmp_path, "cosine", method="cosine", engine={"memory_budget": 2 * rows - 1})
    monkeypatch.setattr(LocalEngine, "run_layer", lambda *a, **k: pytest.fail("a layer ran"))
    with pytest.raises(ReplaceMeError, match=r"method: cosine keeps the X, Y and residual rows .* set activations.uri"):
        recipe.run(config, progress=False)
    # just enough: the check passes (the run itself is the cosine tests' business)
    engine(folder, batches, 2 * rows).check_rows_fit(1)
