"""Sufficient statistics of the least-squares problem ``X·T ≈ Y`` for one block.

Accumulated in float64 over every non-padding calibration token; partial statistics from
different batches or workers merge by addition, so the solve happens once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes


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

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add token rows ``x`` and ``y`` ([n, d]) to the statistics."""
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        self.xtx.addmm_(x64.T, x64)
        self.xty.addmm_(x64.T, y64)
        self.yty_trace += float(y64.square().sum())
        self.tokens += x.shape[0]

    def __iadd__(self, other: BlockStats) -> BlockStats:
        self.xtx += other.xtx.to(self.xtx.device)
        self.xty += other.xty.to(self.xty.device)
        self.yty_trace += other.yty_trace
        self.tokens += other.tokens
        return self

    def residual(self, transform: torch.Tensor) -> float:
        """Relative residual ``‖X·T − Y‖_F / ‖Y‖_F`` computed from the statistics alone."""
        t = transform.to(self.xtx)
        squared = (t * (self.xtx @ t)).sum() - 2 * (t * self.xty).sum() + self.yty_trace
        return float(squared.clamp_min(0).sqrt() / max(self.yty_trace, 1e-300) ** 0.5)

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
