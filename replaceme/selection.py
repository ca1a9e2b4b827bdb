"""Rank candidate blocks by how well a linear map replaces them (lower score = better to remove).

Angular distance ranks a block by how much it changes the stream; what matters is how much of
that change the map ``T`` cannot undo. Every criterion here is a pure function of per-candidate
statistics gathered on the unpruned stream, for every candidate block ``[s, e)``:

* :class:`~replaceme.stats.CandidateStats` — the least-squares statistics of the block
  (``XᵀX``, ``XᵀY``, ``‖Y‖²``, tokens), ``stream_sq = Σ‖h_{e-1}‖²`` over the same tokens and,
  optionally, the same statistics weighted token by token by ``1/‖h_{e-1}‖²``;
* :func:`residual_scores` — ``‖Y − X·T‖²`` from the statistics alone
  (``‖Y‖² − 2·tr(TᵀXᵀY) + tr(TᵀXᵀX·T)``), normalised per token, by ``‖Y‖²``, by the stream's
  norm after the block, by the residual of plain dropping, or token by token by the stream's
  norm (from statistics weighted by ``1/‖h_{e-1}‖²``); evaluated on the statistics ``T``
  was fitted on (in-sample) or on the statistics of a held-out slice;
* :class:`CosineSums` — mean cosine distance, per token, between the stream with the fitted map
  folded in (``h_{s-1} − X + X·T``) and the original stream after the block (``h_{e-1}``) on a
  held-out slice; it needs token rows, not only statistics, and sums over batches by addition;
* :class:`Ranking` — what a run ranked the candidates by (``selection: residual`` ranks them by
  :func:`stream_residuals`, ``token_stream`` below, the winner of ``benchmarks/selection_quality.py``;
  ``distance`` by the paper's angular distance) and the blocks each criterion would remove;
* :func:`shortlist` / :func:`refine` / :func:`choose` — the few best candidates of a criterion (to
  measure their next-token loss), those measured ranked first, and the ``num_blocks``
  non-overlapping blocks a criterion selects (greedy, lowest first, exactly as
  :func:`replaceme.blocks.select_blocks` selects by distance).

Notation as in the design: ``X`` = MLP output of layer ``s-1``, ``Y = h_{e-1} − h_{s-1} + X``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from replaceme.blocks import Block, select_blocks
from replaceme.solvers import solve_lstsq
from replaceme.stats import BlockStats, CandidateStats

log = logging.getLogger("replaceme")
Scores = dict[Block, float]

# How a residual is made comparable across blocks (see residual_scores).
NORMALISATIONS = ("tokens", "target", "stream", "drop", "token_stream")


def drop_residual_sq(stats: BlockStats) -> float:
    """``‖Y − X‖² = Σ‖h_{e-1} − h_{s-1}‖²``: the residual of plain dropping (T = identity), from the statistics."""
    return max(stats.yty_trace - 2 * float(torch.diagonal(stats.xty).sum()) + float(torch.diagonal(stats.xtx).sum()),
               0.0)


def fit_maps(candidates: Mapping[Block, CandidateStats], *, alpha: float = 0.0) -> dict[Block, torch.Tensor]:
    """The ridge least-squares map of every candidate, ``T = (XᵀX + αI)⁻¹XᵀY`` (a singular system
    takes the minimum-norm solution, with one warning for all candidates)."""
    maps, singular = {}, []
    for block, candidate in candidates.items():
        maps[block], info = solve_lstsq(candidate.stats, alpha, warn=False)
        singular += [block] if info.singular else []
    if singular:
        log.warning("XᵀX + αI is singular for candidate blocks %s: their residuals use the minimum-norm maps; add "
                    "calibration data", [list(b) for b in singular])
    return maps


def residual_scores(candidates: Mapping[Block, CandidateStats], *, normalise: str = "stream", alpha: float = 0.0,
                    heldout: Mapping[Block, CandidateStats] | None = None,
                    transforms: Mapping[Block, torch.Tensor] | None = None) -> Scores:
    """Per block, the residual ``‖Y − X·T‖²`` of its least-squares map, divided by

    * ``tokens`` — the token count (mean squared error per token);
    * ``target`` — ``‖Y‖²`` (dominated by tokens with massive activations in ``X``);
    * ``stream`` — ``Σ‖h_{e-1}‖²``, the norm of the stream after the block;
    * ``drop`` — the residual of plain dropping, ``‖h_{e-1} − h_{s-1}‖²`` (the fraction of the
      block's change that the map leaves undone);
    * ``token_stream`` — each token's residual relative to its own ``‖h_{e-1}‖²``, averaged over
      tokens (needs the ``weighted`` statistics): ``mean_t ‖y_t − x_t·T‖² / ‖h_{e-1,t}‖²``.

    ``T`` is fitted on ``candidates`` (or taken from ``transforms``); the residual and its
    normaliser are measured on ``heldout`` when given (statistics of tokens not fitted on), else
    on ``candidates`` themselves.
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {', '.join(NORMALISATIONS)}, not {normalise!r}")
    maps = transforms if transforms is not None else fit_maps(candidates, alpha=alpha)
    measured = heldout if heldout is not None else candidates
    scores = {}
    for block in candidates:
        target = measured[block]
        if normalise == "token_stream":
            if target.weighted is None:
                raise ValueError(f"normalise='token_stream' needs the weighted statistics of block {block}")
            residual = target.weighted.residual_sq(maps[block])
        else:
            residual = target.stats.residual_sq(maps[block])
        denominator = _normaliser(target, normalise)
        scores[block] = residual / denominator if denominator > 0 else math.inf
    return scores


def _normaliser(candidate: CandidateStats, normalise: str) -> float:
    if normalise in ("tokens", "token_stream"):
        return float(candidate.stats.tokens)
    if normalise == "target":
        return candidate.stats.yty_trace
    if normalise == "stream":
        return candidate.stream_sq
    return drop_residual_sq(candidate.stats)


def stream_residuals(candidates: Mapping[Block, CandidateStats]) -> Scores:
    """``selection: residual``: per block, ``mean_t ‖y_t − x_t·T‖² / ‖h_{e-1,t}‖²`` with ``T`` the
    plain least-squares map (α = 0, so the choice does not depend on the solver settings, which
    ``replaceme solve`` may change afterwards)."""
    return residual_scores(candidates, normalise="token_stream")


@dataclass
class Ranking:
    """How a profile ranked the candidate blocks: ``criterion`` chose them (``requested`` unless
    ``reason`` says why not); ``residuals`` is None where they were not measured."""

    requested: str
    distances: list[tuple[int, int, float]]
    residuals: Scores | None = None
    reason: str | None = None

    @property
    def criterion(self) -> str:
        return "residual" if self.requested == "residual" and self.residuals is not None else "distance"

    def scores(self) -> dict[str, list[tuple[int, int, float]]]:
        """``[(s, e, score), …]`` of every criterion measured, by name."""
        measured = {"distance": self.distances}
        if self.residuals is not None:
            measured["residual"] = [(s, e, self.residuals[(s, e)]) for s, e, _ in self.distances]
        return measured

    def summary(self, choices: Mapping[str, list[Block]]) -> dict:
        """selection.json: the criterion used, why not the one requested, each criterion's blocks."""
        return {"criterion": self.criterion, "requested": self.requested, "reason": self.reason,
                "blocks_by_criterion": {name: [list(b) for b in blocks] for name, blocks in choices.items()}}


@dataclass
class CosineSums:
    """Per candidate block: the sum over held-out tokens of ``1 − cos(h_{s-1} − X + X·T, h_{e-1})``
    (the stream with the fitted map folded in vs the original stream after the block) and the
    token count. Sums over batches, stages or workers merge by addition; the score is their mean."""

    sums: dict[Block, float] = field(default_factory=dict)
    tokens: dict[Block, int] = field(default_factory=dict)

    def add(self, block: Block, x: torch.Tensor, h_before: torch.Tensor, h_after: torch.Tensor,
            transform: torch.Tensor) -> None:
        """Add token rows ([n, d], padding dropped) of ``X``, ``h_{s-1}`` and ``h_{e-1}``; the
        fold is computed in float64."""
        x64 = x.to(torch.float64)
        pruned = h_before.to(torch.float64) - x64 + x64 @ transform.to(device=x.device, dtype=torch.float64)
        cos = torch.nn.functional.cosine_similarity(pruned, h_after.to(torch.float64), dim=-1)
        self.sums[block] = self.sums.get(block, 0.0) + float((1 - cos).sum())
        self.tokens[block] = self.tokens.get(block, 0) + x.shape[0]

    def __iadd__(self, other: CosineSums) -> CosineSums:
        for block, total in other.sums.items():
            self.sums[block] = self.sums.get(block, 0.0) + total
            self.tokens[block] = self.tokens.get(block, 0) + other.tokens[block]
        return self

    def scores(self) -> Scores:
        return {block: self.sums[block] / self.tokens[block] for block in self.sums}


def distance_scores(distances: Iterable[tuple[int, int, float]]) -> Scores:
    """The paper's criterion in the same shape: ``[(s, e, angular distance), …]`` → scores."""
    return {(s, e): d for s, e, d in distances}


def shortlist(scores: Mapping[Block, float], k: int) -> list[Block]:
    """The ``k`` lowest-scoring blocks, best first (ties broken by start), e.g. the candidates
    whose next-token loss is worth measuring."""
    return [block for _, block in sorted((score, block) for block, score in scores.items())[:k]]


def refine(base: Mapping[Block, float], measured: Mapping[Block, float]) -> Scores:
    """Scores that rank the blocks in ``measured`` (e.g. the next-token loss of a shortlist) first,
    by their measured value, and every other block after them in the order of ``base``: so that
    several blocks (``num_A`` > 1) can still be chosen when the shortlisted ones overlap. The
    scores are ranks (0, 1, …), not the measured values."""
    first = sorted(measured, key=lambda b: (measured[b], b))
    rest = sorted((b for b in base if b not in measured), key=lambda b: (base[b], b))
    return {block: float(rank) for rank, block in enumerate(first + rest)}


def choose(scores: Mapping[Block, float], *, num_blocks: int = 1, min_start: int = 1, merge_consecutive: bool = True,
           num_layers: int) -> list[Block]:
    """The blocks a criterion removes: the ``num_blocks`` lowest-scoring non-overlapping ones, as
    :func:`replaceme.blocks.select_blocks` chooses by distance (touching blocks merged when allowed)."""
    return select_blocks([(s, e, score) for (s, e), score in scores.items()], num_blocks=num_blocks,
                         min_start=min_start, merge_consecutive=merge_consecutive, num_layers=num_layers)


def rank_correlation(scores: Mapping[Block, float], truth: Mapping[Block, float]) -> float:
    """Spearman's rank correlation of a criterion's scores with a measured quantity (e.g. the
    perplexity after removing each block) over the blocks both have; ties get their mean rank."""
    blocks = sorted(set(scores) & set(truth))
    if len(blocks) < 2:
        raise ValueError("a rank correlation needs at least two blocks")
    a = _ranks([scores[b] for b in blocks])
    b = _ranks([truth[b] for b in blocks])
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _ranks(values: list[float]) -> torch.Tensor:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return torch.tensor(ranks, dtype=torch.float64)
