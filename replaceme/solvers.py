"""Estimators of the map ``T`` that replaces a block: ``X·T ≈ Y``.

* :func:`solve_lstsq` — ridge least squares ``(XᵀX + αI) T = XᵀY`` from float64 statistics
  (the paper's default), full or diagonal;
* :func:`solve_cosine` — the paper's cosine-distance objective between the pruned stream
  ``residual + X·T`` and the original ``residual + Y``, minimised with Adam or L-BFGS over the
  captured activation rows (``loss: mse`` minimises ``‖X·T − Y‖²`` instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from replaceme.errors import ReplaceMeError
from replaceme.stats import BlockStats

log = logging.getLogger("replaceme")


@dataclass
class SolveInfo:
    singular: bool = False
    rank: int | None = None


def solve_lstsq(stats: BlockStats, alpha: float = 0.0, diag: bool = False) -> tuple[torch.Tensor, SolveInfo]:
    """Ridge least squares from the statistics.

    A singular ``XᵀX + αI`` (fewer tokens than hidden size, dead channels, α = 0) falls back to
    the minimum-norm solution with a warning; set ``alpha > 0`` to regularise instead.
    """
    if stats.tokens == 0:
        raise ReplaceMeError("dataset: no calibration tokens reached the solver; the calibration set is empty")
    if diag:
        denominator = torch.diagonal(stats.xtx) + alpha
        safe = denominator > 0
        t = torch.where(safe, torch.diagonal(stats.xty) / denominator.where(safe, 1.0), 1.0)
        return torch.diag(t), SolveInfo(singular=not bool(safe.all()))
    hidden = stats.xtx.shape[0]
    system = stats.xtx + alpha * torch.eye(hidden, dtype=stats.xtx.dtype, device=stats.xtx.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(stats.xty, factor), SolveInfo()
    solution = torch.linalg.lstsq(system.cpu(), stats.xty.cpu(), driver="gelsd")
    rank = int(solution.rank)
    log.warning("XᵀX + αI is singular (rank %d of %d, %d tokens, alpha=%g): using the minimum-norm solution; "
                "add calibration data or set alpha > 0", rank, hidden, stats.tokens, alpha)
    return solution.solution.to(stats.xtx.device), SolveInfo(singular=True, rank=rank)


def solve_cosine(x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor, *, init: torch.Tensor,
                 loss: str = "cosine", solver: str = "adam", diag: bool = False, steps: int = 300,
                 lr: float = 1e-3, batch_tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """Minimise the mean cosine distance (or MSE) of the pruned stream to the original one."""
    generator = torch.Generator().manual_seed(seed)
    # A contiguous copy: L-BFGS views the gradient flat, and a solved init may be a transposed view.
    init = init.to(torch.float32).contiguous()
    param = torch.nn.Parameter(torch.diagonal(init).clone() if diag else init.clone())

    def objective(rows: torch.Tensor) -> torch.Tensor:
        t = torch.diag(param) if diag else param
        xb, yb, rb = x[rows], y[rows], residual[rows]
        if loss == "mse":
            return (xb @ t - yb).square().sum(-1).mean()
        return (1 - torch.nn.functional.cosine_similarity(rb + xb @ t, rb + yb, dim=-1)).mean()

    everything = torch.arange(x.shape[0])
    if solver == "lbfgs":
        optimizer = torch.optim.LBFGS([param], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = objective(everything)
            value.backward()
            return value

        optimizer.step(closure)
    else:
        optimizer = torch.optim.Adam([param], lr=lr)
        for _ in range(steps):
            rows = torch.randint(0, x.shape[0], (min(batch_tokens, x.shape[0]),), generator=generator)
            optimizer.zero_grad()
            objective(rows).backward()
            optimizer.step()
    result = torch.diag(param.detach()) if diag else param.detach()
    if not torch.isfinite(result).all():
        raise ReplaceMeError(f"the {solver} solver diverged (non-finite map); lower cosine.lr or use solver: lbfgs")
    return result.to(torch.float64)


def mean_cosine_distance(x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor, transform: torch.Tensor) -> float:
    t = transform.to(torch.float32)
    return float((1 - torch.nn.functional.cosine_similarity(residual + x @ t, residual + y, dim=-1)).mean())
