"""Calibration statistics and maps equal those computed from the model's own forward."""

from __future__ import annotations

import fsspec
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny_model, texts
from replaceme.checkpoint import Checkpoint
from replaceme.data import make_batches
from replaceme.engine import LocalEngine
from replaceme.layerwise import LayerwiseModel
from replaceme.merge import merge_checkpoint
from replaceme.solvers import solve_cosine, solve_lstsq
from replaceme.stats import GRAM_MIN_WIDTH, BlockStats, add_gram_

CPU = torch.device("cpu")


def reference_stats(folder, batches, block):
    """XᵀX, XᵀY of a block from a plain HF forward, with raw layer outputs taken by hooks."""
    start, end = block
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    captured = {}
    model.model.layers[start - 1].mlp.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    model.model.layers[start - 1].register_forward_hook(lambda m, i, o: captured.__setitem__("before", o))
    model.model.layers[end - 1].register_forward_hook(lambda m, i, o: captured.__setitem__("after", o))
    stats = BlockStats.zeros(model.config.hidden_size)
    for batch in batches:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        real = batch.attention_mask.bool()
        x = captured["x"][real]
        stats.update(x, captured["after"][real] - captured["before"][real] + x)
    return stats


def engine_for(folder, batches):
    return LocalEngine(LayerwiseModel(Checkpoint(str(folder)), device=CPU, dtype=torch.float32), batches, progress=False)


@pytest.fixture(scope="module")
def model_and_batches(tmp_path_factory, tokenizer_dir):
    folder = build_tiny_model(tmp_path_factory.mktemp("calib"), tokenizer_dir, num_hidden_layers=8)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    samples = [text[: 40 + 17 * i] for i, text in enumerate(texts(limit=24))]
    return folder, make_batches(samples, tokenizer, batch_size=4, max_length=48)


def lstsq(capture):
    return solve_lstsq(capture.stats, alpha=1e-3)[0]


@pytest.mark.parametrize("block", [(2, 5), (6, 8)])  # (6, 8) ends at the last layer: raw output, not normed
def test_statistics_match_hf_forward(model_and_batches, block):
    folder, batches = model_and_batches
    ((capture, transform),) = engine_for(folder, batches).calibrate([block], lstsq)
    expected = reference_stats(folder, batches, block)
    assert capture.stats.tokens == expected.tokens == sum(b.num_tokens for b in batches)
    torch.testing.assert_close(capture.stats.xtx, expected.xtx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(capture.stats.xty, expected.xty, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(transform, solve_lstsq(expected, alpha=1e-3)[0], rtol=1e-4, atol=1e-6)


def test_sequential_fit_sees_the_earlier_block_replaced(model_and_batches, tmp_path):
    folder, batches = model_and_batches
    blocks = [(2, 4), (5, 7)]
    (first, t1), (second, _) = engine_for(folder, batches).calibrate(blocks, lstsq, sequential=True)
    # The second block's data must equal what a model pruned with the first map produces.
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    with Checkpoint(str(folder)) as checkpoint:
        merge_checkpoint(checkpoint, {(2, 4): t1}, fsspec.filesystem("file"), str(pruned), progress=False)
    expected = reference_stats(pruned, batches, (3, 5))  # (5, 7) renumbered after removing 2 layers
    torch.testing.assert_close(second.stats.xty, expected.xty, rtol=1e-4, atol=1e-5)
    # and the non-sequential fit sees the original model instead
    _, (original, _) = engine_for(folder, batches).calibrate(blocks, lstsq, sequential=False)
    torch.testing.assert_close(original.stats.xty, reference_stats(folder, batches, (5, 7)).xty, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(original.stats.xty, second.stats.xty, rtol=1e-3)


def test_padding_is_excluded(model_and_batches):
    folder, batches = model_and_batches
    padded = [b for b in batches if b.attention_mask.min() == 0]
    assert padded, "fixture must produce padded batches"
    ((capture, _),) = engine_for(folder, padded).calibrate([(2, 4)], lstsq)
    assert capture.stats.tokens == sum(b.num_tokens for b in padded) < sum(b.input_ids.numel() for b in padded)


@pytest.mark.parametrize("width", [GRAM_MIN_WIDTH, 2 * GRAM_MIN_WIDTH, 4 * GRAM_MIN_WIDTH + 3])
@pytest.mark.parametrize("products", [torch.float64, torch.float32])
def test_gram_is_added_exactly_symmetric_and_equal_to_the_full_product(width, products):
    """Widths with no split, one, and two levels with odd halves; float32 products into float64 sums."""
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(257, width, dtype=torch.float64, generator=generator)
    start = torch.randn(width, width, dtype=torch.float64, generator=generator)
    start = start + start.T
    acc = start.clone()
    add_gram_(acc, x.to(products))
    tolerance = {"rtol": 1e-12, "atol": 1e-9} if products == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(acc, start + x.T @ x, **tolerance)
    assert torch.equal(acc, acc.T)
    assert acc.dtype == torch.float64


def test_lstsq_is_the_ridge_solution_and_handles_singular_systems(caplog):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=generator, dtype=torch.float64)
    true = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    stats = BlockStats.zeros(16)
    stats.update(x, x @ true)
    torch.testing.assert_close(solve_lstsq(stats)[0], true)
    ridge = torch.linalg.solve(x.T @ x + 3.0 * torch.eye(16, dtype=torch.float64), x.T @ (x @ true))
    torch.testing.assert_close(solve_lstsq(stats, alpha=3.0)[0], ridge)
    assert stats.residual(solve_lstsq(stats)[0]) < 1e-6
    diag, _ = solve_lstsq(stats, diag=True)
    assert torch.count_nonzero(diag - torch.diag(torch.diagonal(diag))) == 0

    few = BlockStats.zeros(16)
    few.update(x[:5], x[:5] @ true)  # 5 tokens, 16 unknowns per column: singular
    transform, info = solve_lstsq(few)
    assert info.singular and info.rank == 5 and torch.isfinite(transform).all()
    assert "singular" in caplog.text


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
@pytest.mark.parametrize("transposed_init", [False, True])
def test_cosine_solver_lowers_the_cosine_distance(solver, transposed_init):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=generator)
    residual = torch.randn(2000, 8, generator=generator)
    y = x @ (torch.eye(8) + 0.5 * torch.randn(8, 8, generator=generator))
    identity = torch.eye(8, dtype=torch.float64)
    start = identity.clone().mT if transposed_init else identity  # a least-squares init can be a strided view

    def distance(t):
        return float((1 - torch.nn.functional.cosine_similarity(residual + x @ t.float(), residual + y, dim=-1)).mean())

    fitted = solve_cosine(x, y, residual, init=start, solver=solver, steps=200, lr=1e-2)
    assert distance(fitted) < 0.1 * distance(identity)
