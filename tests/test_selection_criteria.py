"""Block selection criteria (replaceme/selection.py): the residual from statistics alone equals the
residual from the rows, each normalisation divides by what it says, a block a linear map replaces
exactly ranks first by residual while the angular distance prefers a block that changes the stream
less, and the greedy choice, shortlist and rank correlation behave as documented."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from replaceme.errors import ReplaceMeError
from replaceme.selection import (
    NORMALISATIONS,
    CosineSums,
    choose,
    distance_scores,
    drop_residual_sq,
    fit_maps,
    rank_correlation,
    refine,
    residual_scores,
    shortlist,
)
from replaceme.solvers import solve_lstsq
from replaceme.stats import AngleSums, CandidateStats

D = 16
FLOAT32_PRODUCTS = {"rtol": 1e-5, "atol": 1e-6}  # the weighted statistics: float32 products of unit-scale rows


def rows(n: int, seed: int, *, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` (MLP output of layer s-1), ``h_before`` (h_{s-1}) and ``h_after`` (h_{e-1}), float32, with
    a few large channels (as massive activations) and a non-linear part a map cannot predict."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    x[:, 0] += offset
    before = torch.randn(n, D, generator=g) * 3 + x
    after = before + torch.tanh(x) @ torch.randn(D, D, generator=g) + 0.1 * torch.randn(n, D, generator=g)
    return x, before, after


def accumulate(x, before, after, chunks: int = 1) -> CandidateStats:
    stats = CandidateStats.zeros(D, weighted=True)
    for xs, bs, as_ in zip(x.chunk(chunks), before.chunk(chunks), after.chunk(chunks), strict=True):
        stats.update(xs, bs, as_)
    return stats


def direct_residual(x, before, after, transform) -> float:
    x64, y64 = x.double(), (after - before + x).double()  # Y formed in the compute dtype, as calibration forms it
    return float((y64 - x64 @ transform).square().sum())


def test_candidate_stats_hold_the_block_statistics_and_the_stream_norm_and_add_up():
    x, before, after = rows(300, 0)
    stats = accumulate(x, before, after)
    y = (after - before + x).double()  # formed in the compute dtype, as calibration forms it
    torch.testing.assert_close(stats.stats.xtx, x.double().T @ x.double(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(stats.stats.xty, x.double().T @ y, rtol=1e-12, atol=1e-9)
    assert stats.stats.yty_trace == pytest.approx(float(y.square().sum()), rel=1e-12)
    assert stats.stream_sq == pytest.approx(float(after.double().square().sum()), rel=1e-12)
    assert stats.stats.tokens == 300

    # the weighted part: every token's rows scaled by 1/‖h_{e-1}‖, a batch's products formed in float32
    w = 1 / after.double().square().sum(-1, keepdim=True)
    torch.testing.assert_close(stats.weighted.xtx, (x.double() * w).T @ x.double(), **FLOAT32_PRODUCTS)
    torch.testing.assert_close(stats.weighted.xty, (x.double() * w).T @ y, **FLOAT32_PRODUCTS)
    assert stats.weighted.yty_trace == pytest.approx(float((y.square() * w).sum()), rel=1e-6)
    assert stats.weighted.xtx.dtype == torch.float64  # summed in float64

    chunked = accumulate(x, before, after, chunks=3)
    merged = CandidateStats.zeros(D, weighted=True)
    merged += chunked
    torch.testing.assert_close(merged.stats.xtx, stats.stats.xtx, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.weighted.xty, stats.weighted.xty, **FLOAT32_PRODUCTS)
    with pytest.raises(ValueError, match="weighted"):
        CandidateStats.zeros(D).__iadd__(chunked)
    assert merged.stream_sq == pytest.approx(stats.stream_sq, rel=1e-12)
    assert merged.stats.tokens == 300


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_residual_from_statistics_equals_the_residual_of_the_rows(alpha):
    x, before, after = rows(500, 1, offset=40.0)  # a large channel: cancellation in ‖Y‖² − 2tr + tr
    stats = accumulate(x, before, after)
    transform = solve_lstsq(stats.stats, alpha)[0]
    direct = direct_residual(x, before, after, transform)
    assert direct > 1.0  # the block is not linear: a real residual, not round-off
    assert stats.stats.residual_sq(transform) == pytest.approx(direct, rel=1e-9)
    # and the relative residual BlockStats reports is the same number
    assert stats.stats.residual(transform) == pytest.approx(math.sqrt(direct / stats.stats.yty_trace), rel=1e-9)


def test_heldout_residual_uses_the_map_of_the_fit_and_the_rows_of_the_heldout_slice():
    x, before, after = rows(600, 2)
    fit, held = accumulate(x[:400], before[:400], after[:400]), accumulate(x[400:], before[400:], after[400:])
    transform = solve_lstsq(fit.stats)[0]
    direct = direct_residual(x[400:], before[400:], after[400:], transform)
    scores = residual_scores({(1, 3): fit}, heldout={(1, 3): held}, normalise="tokens")
    assert scores[(1, 3)] == pytest.approx(direct / 200, rel=1e-9)
    in_sample = residual_scores({(1, 3): fit}, normalise="tokens")[(1, 3)]
    assert scores[(1, 3)] > in_sample  # out of sample the fit is worse, as it should be


def test_drop_residual_is_the_change_the_block_makes():
    x, before, after = rows(200, 3)
    stats = accumulate(x, before, after)
    assert drop_residual_sq(stats.stats) == pytest.approx(float((after.double() - before.double()).square().sum()),
                                                          rel=1e-9)
    assert drop_residual_sq(stats.stats) == pytest.approx(stats.stats.residual_sq(torch.eye(D, dtype=torch.float64)),
                                                          rel=1e-9)


def test_each_normalisation_divides_the_residual_by_what_it_names():
    x, before, after = rows(400, 4, offset=10.0)
    stats = accumulate(x, before, after)
    transform = solve_lstsq(stats.stats)[0]
    residual = direct_residual(x, before, after, transform)
    y = (after - before + x).double()
    per_token = (y - x.double() @ transform).square().sum(-1) / after.double().square().sum(-1)
    expected = {"tokens": residual / 400, "target": residual / float(y.square().sum()),
                "stream": residual / float(after.double().square().sum()),
                "drop": residual / float((y - x.double()).square().sum()),
                "token_stream": float(per_token.mean())}
    assert set(expected) == set(NORMALISATIONS)
    for normalise, value in expected.items():
        tolerance = 1e-5 if normalise == "token_stream" else 1e-9  # token_stream: from the weighted statistics
        assert residual_scores({(2, 4): stats}, normalise=normalise)[(2, 4)] == pytest.approx(value, rel=tolerance)
    with pytest.raises(ValueError, match="normalise must be one of"):
        residual_scores({(2, 4): stats}, normalise="per-layer")
    unweighted = CandidateStats.zeros(D)
    unweighted.update(x, before, after)
    with pytest.raises(ValueError, match="weighted statistics"):
        residual_scores({(2, 4): unweighted}, normalise="token_stream")


def test_a_block_a_linear_map_replaces_exactly_ranks_first_by_residual_but_not_by_distance():
    """Block (1, 5) turns the stream a lot, but by a linear function of X: h_{e-1} = h_{s-1} − X + X·R.
    Block (6, 10) barely turns it, by noise no map of X predicts. Distance removes the second;
    every residual criterion removes the first, whose map reproduces the stream exactly."""
    g = torch.Generator().manual_seed(5)
    n = 400
    x = torch.randn(n, D, generator=g) * 2
    before = torch.randn(n, D, generator=g) + 1.0
    rotation, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    linear_after = before - x + x @ (3 * rotation)
    x2 = torch.randn(n, D, generator=g)
    before2 = torch.randn(n, D, generator=g) * 4 + 2.0
    noisy_after = before2 + 0.4 * torch.randn(n, D, generator=g)

    candidates = {(1, 5): accumulate(x, before, linear_after), (6, 10): accumulate(x2, before2, noisy_after)}
    angles = AngleSums(4)
    angles.add(1, before, linear_after)
    angles.add(6, before2, noisy_after)
    distance = distance_scores(angles.distances())
    assert choose(distance, num_layers=16) == [(6, 10)]
    assert distance[(1, 5)] > 2 * distance[(6, 10)]

    for normalise in NORMALISATIONS:
        scores = residual_scores(candidates, normalise=normalise)
        assert choose(scores, num_layers=16) == [(1, 5)], normalise
        floor = 1e-6 if normalise == "token_stream" else 1e-9  # round-off of float32 products, float64 ones
        assert scores[(1, 5)] < floor and scores[(6, 10)] > 1e-3, normalise

    maps = fit_maps(candidates)
    torch.testing.assert_close(maps[(1, 5)], 3 * rotation.double(), rtol=0, atol=1e-6)
    cosine = CosineSums()
    cosine.add((1, 5), x, before, linear_after, maps[(1, 5)])
    cosine.add((6, 10), x2, before2, noisy_after, maps[(6, 10)])
    assert cosine.scores()[(1, 5)] < 1e-9 < cosine.scores()[(6, 10)]


def test_cosine_sums_are_the_mean_cosine_distance_of_the_folded_stream_and_add_up():
    x, before, after = rows(300, 6)
    transform = solve_lstsq(accumulate(x, before, after).stats)[0]
    pruned = before.double() - x.double() + x.double() @ transform
    expected = float((1 - torch.nn.functional.cosine_similarity(pruned, after.double(), dim=-1)).mean())
    whole = CosineSums()
    whole.add((2, 6), x, before, after, transform)
    assert whole.scores()[(2, 6)] == pytest.approx(expected, rel=1e-12)
    parts, other = CosineSums(), CosineSums()
    parts.add((2, 6), x[:100], before[:100], after[:100], transform)
    other.add((2, 6), x[100:], before[100:], after[100:], transform)
    parts += other
    assert parts.tokens[(2, 6)] == 300
    assert parts.scores()[(2, 6)] == pytest.approx(expected, rel=1e-12)
    # the identity map is plain dropping: the cosine distance of h_{s-1} to h_{e-1}
    drop = CosineSums()
    drop.add((2, 6), x, before, after, torch.eye(D, dtype=torch.float64))
    plain = float((1 - torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)).mean())
    assert drop.scores()[(2, 6)] == pytest.approx(plain, rel=1e-9)
    assert whole.scores()[(2, 6)] < drop.scores()[(2, 6)]


def test_choose_is_greedy_over_non_overlapping_blocks_and_shortlist_is_best_first():
    scores = {(1, 3): 0.5, (2, 4): 0.1, (3, 5): 0.2, (4, 6): 0.3, (5, 7): 0.9}
    assert shortlist(scores, 3) == [(2, 4), (3, 5), (4, 6)]
    # (2,4) first; (3,5) overlaps it; (4,6) touches it: merged when allowed ...
    assert choose(scores, num_blocks=2, merge_consecutive=True, num_layers=8) == [(2, 6)]
    # ... and refused when the fold layer must stay, then (5,7) is the next that fits
    assert choose(scores, num_blocks=2, merge_consecutive=False, num_layers=8) == [(2, 4), (5, 7)]
    with pytest.raises(ReplaceMeError, match="num_A"):
        choose(scores, num_blocks=3, merge_consecutive=False, num_layers=8)
    # infinite scores (not shortlisted) come last but still count when nothing else fits
    assert choose({(1, 3): math.inf, (4, 6): 0.2}, num_blocks=2, merge_consecutive=False, num_layers=8) == [
        (1, 3), (4, 6)]


def test_refine_ranks_the_measured_blocks_first_and_the_rest_in_the_base_order():
    base = {(1, 3): 0.4, (2, 4): 0.1, (3, 5): 0.2, (4, 6): 0.3, (5, 7): 0.9, (6, 8): 0.5}
    measured = {(2, 4): 3.1, (3, 5): 3.0, (4, 6): 3.3}  # the loss of the 3 best by base: (3, 5) is best
    refined = refine(base, measured)
    assert sorted(refined, key=refined.get) == [(3, 5), (2, 4), (4, 6), (1, 3), (6, 8), (5, 7)]
    assert choose(refined, num_layers=8) == [(3, 5)]
    # two blocks a layer apart: the shortlist holds only overlapping ones, so the second comes from
    # the base order ((1, 3) touches (3, 5)'s fold layer; (6, 8) is next) rather than from nowhere
    assert choose(refined, num_blocks=2, merge_consecutive=False, num_layers=8) == [(3, 5), (6, 8)]


def test_rank_correlation():
    truth = {(1, 3): 10.0, (2, 4): 20.0, (3, 5): 30.0, (4, 6): 40.0}
    assert rank_correlation({b: v / 7 for b, v in truth.items()}, truth) == pytest.approx(1.0)
    assert rank_correlation({b: -v for b, v in truth.items()}, truth) == pytest.approx(-1.0)
    # one swap of neighbours among four: 1 - 6·2/(4·15) = 0.8
    swapped = {(1, 3): 2.0, (2, 4): 1.0, (3, 5): 3.0, (4, 6): 4.0}
    assert rank_correlation(swapped, truth) == pytest.approx(0.8)
    # only blocks both have count; ties take their mean rank
    assert rank_correlation({(1, 3): 1.0, (2, 4): 1.0, (3, 5): 2.0, (9, 11): 0.0}, truth) == pytest.approx(
        math.sqrt(3) / 2)
    with pytest.raises(ValueError):
        rank_correlation({(1, 3): 1.0}, truth)


def test_statistics_survive_pickling_bit_for_bit_and_stay_addable():
    """Stage actors return partials through Ray's object store, which pickles them (as numpy arrays)."""
    generator = torch.Generator().manual_seed(0)
    original = CandidateStats.zeros(16, weighted=True)
    original.update(*(torch.randn(40, 16, generator=generator) for _ in range(3)))
    buffers: list[pickle.PickleBuffer] = []  # out of band and read-only, as Ray's object store hands them back
    data = pickle.dumps(original, protocol=5, buffer_callback=buffers.append)
    stored = [bytearray(b.raw()) for b in buffers]
    copy = pickle.loads(data, buffers=[memoryview(b).toreadonly() for b in stored])
    assert stored  # the tensors did travel out of band
    for before, after in ((original.stats, copy.stats), (original.weighted, copy.weighted)):
        assert torch.equal(before.xtx, after.xtx) and torch.equal(before.xty, after.xty)
        assert (before.yty_trace, before.tokens) == (after.yty_trace, after.tokens)
    assert copy.stream_sq == original.stream_sq
    snapshot = [bytes(b) for b in stored]
    copy += original  # the rebuilt tensors own their memory: the store's buffers stay as they were
    assert copy.stats.tokens == 80 and torch.equal(copy.stats.xtx, 2 * original.stats.xtx)
    assert [bytes(b) for b in stored] == snapshot
