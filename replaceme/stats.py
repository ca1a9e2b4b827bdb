"""Statistics accumulated over the calibration set, mergeable by addition.

* :class:`BlockStats` — sufficient statistics of the least-squares problem ``X·T ≈ Y`` for one block;
* :class:`AngleSums` — sums of the angular distance of every candidate block (block selection).

Both are accumulated in float64 over every non-padding calibration token; partials from different
batches, stages or workers merge by addition, so the solve (or the mean) happens once at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

# Below this width a symmetric block is one product: narrower products run too far below the BLAS's speed.
GRAM_MIN_WIDTH = 192


def add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a·b``, the product formed in ``a``'s dtype (in place when it is ``acc``'s)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc += a @ b


def add_gram_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += xᵀx`` forming each off-diagonal block once, the mirror one by transposing it.

    xᵀx is symmetric: splitting the columns in halves recursively needs about 60 % of one
    product's multiplications at hidden 768 and approaches half for wider ones, and the sum is
    exactly symmetric. Products are formed in ``x``'s dtype and added into ``acc``'s."""
    width = x.shape[1]
    if width < 2 * GRAM_MIN_WIDTH:
        add_product_(acc, x.T, x)
        return
    half = width // 2
    left, right = x[:, :half], x[:, half:]
    add_gram_(acc[:half, :half], left)
    cross = left.T @ right
    acc[:half, half:] += cross
    acc[half:, :half] += cross.T
    add_gram_(acc[half:, half:], right)


def squared_norm(t: torch.Tensor) -> float:
    """``Σ t²`` in float64, without a float64 copy of ``t``."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


@dataclass
class BlockStats:
    xtx: torch.Tensor  # [d, d] float64
    xty: torch.Tensor  # [d, d] float64
    yty_trace: float = 0.0  # sum of squared entries of Y, for residual norms
    tokens: int = 0

    @classmethod
    def zeros(cls, hidden: int, device: torch.device | str = "cpu") -> BlockStats:
        shape = (hidden, hidden)
        return cls(torch.zeros(shape, dtype=torch.float64, device=device),
                   torch.zeros(shape, dtype=torch.float64, device=device))

    @staticmethod
    def nbytes(hidden: int) -> int:
        """Memory of one block's statistics: XᵀX and XᵀY in float64."""
        return 2 * hidden * hidden * 8

    def __reduce__(self):
        # Host tensors pickle as numpy arrays, which Ray's object store takes out of band (one copy):
        # torch's own pickling of a stage's partials ran about 6x slower (0.37 s against 0.06 s for 113 MB).
        return _rebuild_block_stats, (_portable(self.xtx), _portable(self.xty), self.yty_trace, self.tokens)

    def update(self, x: torch.Tensor, y: torch.Tensor, *, products: torch.dtype = torch.float64) -> None:
        """Add token rows ``x`` and ``y`` ([n, d]) to the statistics. A batch's products are formed
        in ``products`` and always summed in float64; float32 halves their cost on CPUs (GPUs
        run float64 at a fraction of float32's rate), for sums that rank blocks and fit no map."""
        xp, yp = x.to(products), y.to(products)
        add_gram_(self.xtx, xp)
        add_product_(self.xty, xp.T, yp)
        self.yty_trace += squared_norm(yp)
        self.tokens += x.shape[0]

    def __iadd__(self, other: BlockStats) -> BlockStats:
        self.xtx += other.xtx.to(self.xtx.device)
        self.xty += other.xty.to(self.xty.device)
        self.yty_trace += other.yty_trace
        self.tokens += other.tokens
        return self

    def residual_sq(self, transform: torch.Tensor) -> float:
        """``‖X·T − Y‖_F²`` from the statistics alone: ``tr(TᵀXᵀX·T) − 2·tr(TᵀXᵀY) + ‖Y‖²``, clamped
        at 0 against round-off."""
        t = transform.to(self.xtx)
        return float(((t * (self.xtx @ t)).sum() - 2 * (t * self.xty).sum() + self.yty_trace).clamp_min(0))

    def residual(self, transform: torch.Tensor) -> float:
        """Relative residual ``‖X·T − Y‖_F / ‖Y‖_F`` computed from the statistics alone."""
        return self.residual_sq(transform) ** 0.5 / max(self.yty_trace, 1e-300) ** 0.5

    def to_bytes(self) -> bytes:
        return save_bytes({
            "xtx": self.xtx.cpu().contiguous(),
            "xty": self.xty.cpu().contiguous(),
            "yty_trace": torch.tensor(self.yty_trace, dtype=torch.float64),
            "tokens": torch.tensor(self.tokens, dtype=torch.int64),
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> BlockStats:
        tensors = load_bytes(raw)
        return cls(tensors["xtx"], tensors["xty"], float(tensors["yty_trace"]), int(tensors["tokens"]))


@dataclass
class CandidateStats:
    """A candidate block's least-squares statistics on the unpruned stream, gathered while the
    blocks are profiled, plus ``stream_sq`` = Σ‖h_{e-1}‖² over tokens (the norm of the stream the
    fitted map must reproduce).

    ``weighted`` (for residual-based selection): the same statistics with every token's rows scaled
    by ``1/‖h_{e-1}‖``, so that a map's residual can be measured token by token relative to the
    stream it lands in (:func:`replaceme.selection.residual_scores`). Its rows are unit-scale, so a
    batch's products are formed in float32 (summed in float64): they rank blocks, they fit no map."""

    stats: BlockStats
    stream_sq: float = 0.0
    weighted: BlockStats | None = None

    @classmethod
    def zeros(cls, hidden: int, device: torch.device | str = "cpu", *, weighted: bool = False) -> CandidateStats:
        return cls(BlockStats.zeros(hidden, device), weighted=BlockStats.zeros(hidden, device) if weighted else None)

    @staticmethod
    def nbytes(hidden: int, *, weighted: bool = False) -> int:
        """Memory of one candidate's statistics: its block's, twice with ``weighted``."""
        return (2 if weighted else 1) * BlockStats.nbytes(hidden)

    def update(self, x: torch.Tensor, h_before: torch.Tensor, h_after: torch.Tensor) -> None:
        """Token rows of X, h_{s-1} and h_{e-1}; Y is formed exactly as calibration forms it."""
        # In-place and fused forms: each full-size temporary costs as much as a small product here.
        y = torch.sub(h_after, h_before).add_(x)
        self.stats.update(x, y)
        norms_sq = torch.linalg.vector_norm(h_after, dim=-1, keepdim=True, dtype=torch.float64).square_()
        self.stream_sq += float(norms_sq.sum())
        if self.weighted is not None:
            scale = norms_sq.clamp_min(1e-300).rsqrt().float()
            self.weighted.update(x.float() * scale, y.float().mul_(scale), products=torch.float32)  # y is spent

    def __iadd__(self, other: CandidateStats) -> CandidateStats:
        if (self.weighted is None) != (other.weighted is None):
            raise ValueError("candidate statistics with and without their weighted part cannot be added")
        self.stats += other.stats
        self.stream_sq += other.stream_sq
        if self.weighted is not None and other.weighted is not None:
            self.weighted += other.weighted
        return self

    def cpu(self) -> CandidateStats:
        """A copy in host memory (what a stage actor returns to the driver)."""
        return CandidateStats(_cpu(self.stats), self.stream_sq, _cpu(self.weighted) if self.weighted else None)


def _portable(tensor: torch.Tensor) -> torch.Tensor | np.ndarray:
    return tensor.numpy() if tensor.device.type == "cpu" else tensor


def _owned(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    # An array read from the object store is read-only, and sums are added into: copy it.
    return torch.from_numpy(value.copy()) if isinstance(value, np.ndarray) else value


def _rebuild_block_stats(xtx, xty, yty_trace: float, tokens: int) -> BlockStats:
    return BlockStats(_owned(xtx), _owned(xty), yty_trace, tokens)


def _cpu(stats: BlockStats) -> BlockStats:
    return BlockStats(stats.xtx.cpu(), stats.xty.cpu(), stats.yty_trace, stats.tokens)


@dataclass
class AngleSums:
    """Per candidate block ``[s, s+L)``: the sum over tokens of ``arccos(cos(h_{s-1}, h_{s+L-1}))``
    and the token count. The distance of a block is a mean over tokens, so it decomposes into
    per-batch sums: an engine never needs more than the hidden states of the window it slides."""

    block_size: int  # L
    sums: dict[int, float] = field(default_factory=dict)  # start s → float64 sum of angles (radians)
    tokens: dict[int, int] = field(default_factory=dict)  # start s → non-padding tokens added

    def start_of_block_ending_at(self, index: int) -> int | None:
        """The start of the candidate block whose last layer is ``index`` (none before layer 1:
        the map of a block is folded into the layer before it)."""
        start = index - self.block_size + 1
        return start if start >= 1 else None

    def add(self, start: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """Add token rows ([n, d], padding dropped) of ``h_{s-1}`` and ``h_{s+L-1}``. Cosines stay in
        float32, as they always were computed (arccos near 1 amplifies any change of precision, and
        would move published profiles); only the sums of their angles are float64."""
        cos = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1).clamp(-1.0, 1.0)
        self.sums[start] = self.sums.get(start, 0.0) + float(torch.arccos(cos).sum(dtype=torch.float64))
        self.tokens[start] = self.tokens.get(start, 0) + before.shape[0]

    def __iadd__(self, other: AngleSums) -> AngleSums:
        if other.block_size != self.block_size:
            raise ValueError(f"angle sums of {other.block_size}-layer blocks added to {self.block_size}-layer ones")
        for start, total in other.sums.items():
            self.sums[start] = self.sums.get(start, 0.0) + total
            self.tokens[start] = self.tokens.get(start, 0) + other.tokens[start]
        return self

    def distances(self) -> list[tuple[int, int, float]]:
        """``[(s, e, mean angular distance / π), …]`` ordered by start."""
        return [(s, s + self.block_size, self.sums[s] / self.tokens[s] / math.pi) for s in sorted(self.sums)]
