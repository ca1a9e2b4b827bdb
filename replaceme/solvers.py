"""Estimators of the map ``T`` that replaces a block: ``X·T ≈ Y``.

* :func:`solve_lstsq` — ridge least squares ``(XᵀX + αI) T = XᵀY`` from float64 statistics
  (the paper's default), full or diagonal;
* :func:`solve_cosine` — the paper's cosine-distance objective between the pruned stream
  ``residual + X·T`` and the original ``residual + Y``, minimised with Adam or L-BFGS over the
  captured activation rows (``loss: mse`` minimises ``‖X·T − Y‖²`` instead);
* :func:`solve_cosine_streaming` — the same objective over rows streamed in chunks from the
  activation store, for row sets larger than memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from replaceme.errors import ReplaceMeError
from replaceme.stats import BlockStats

log = logging.getLogger("replaceme")


@dataclass
class SolveInfo:
    singular: bool = False
    rank: int | None = None


def solve_lstsq(stats: BlockStats, alpha: float = 0.0, diag: bool = False, *,
                warn: bool = True) -> tuple[torch.Tensor, SolveInfo]:
    """Ridge least squares from the statistics.

    A singular ``XᵀX + αI`` (fewer tokens than hidden size, dead channels, α = 0) falls back to
    the minimum-norm solution with a warning (unless ``warn`` is off: the caller reports it from
    the returned :class:`SolveInfo`); set ``alpha > 0`` to regularise instead.
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
    if warn:
        log.warning("XᵀX + αI is singular (rank %d of %d, %d tokens, alpha=%g): using the minimum-norm solution; "
                    "add calibration data or set alpha > 0", rank, hidden, stats.tokens, alpha)
    return solution.solution.to(stats.xtx.device), SolveInfo(singular=True, rank=rank)


def solve_cosine(x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor, *, init: torch.Tensor,
                 loss: str = "cosine", solver: str = "adam", diag: bool = False, steps: int = 300,
                 lr: float = 1e-3, batch_tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """Minimise the mean cosine distance (or MSE) of the pruned stream to the original one."""
    generator = torch.Generator().manual_seed(seed)
    param = _parameter(init, diag)

    def objective(rows: torch.Tensor) -> torch.Tensor:
        return _row_losses(param, diag, loss, x[rows], y[rows], residual[rows]).mean()

    everything = torch.arange(x.shape[0])
    if solver == "lbfgs":
        lbfgs = torch.optim.LBFGS([param], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            value = objective(everything)
            value.backward()
            return value

        lbfgs.step(closure)
    else:
        adam = torch.optim.Adam([param], lr=lr)
        for _ in range(steps):
            rows = torch.randint(0, x.shape[0], (min(batch_tokens, x.shape[0]),), generator=generator)
            adam.zero_grad()
            objective(rows).backward()
            adam.step()
    return _solved(param, diag, solver)


def _parameter(init: torch.Tensor, diag: bool) -> torch.nn.Parameter:
    # A contiguous copy: L-BFGS views the gradient flat, and a solved init may be a transposed view.
    init = init.to(torch.float32).contiguous()
    return torch.nn.Parameter(torch.diagonal(init).clone() if diag else init.clone())


def _row_losses(param: torch.Tensor, diag: bool, loss: str, x: torch.Tensor, y: torch.Tensor,
                residual: torch.Tensor) -> torch.Tensor:
    """Per token row: cosine distance of the pruned stream to the original, or ``‖x·T − y‖²``."""
    t = torch.diag(param) if diag else param
    if loss == "mse":
        return (x @ t - y).square().sum(-1)
    return 1 - torch.nn.functional.cosine_similarity(residual + x @ t, residual + y, dim=-1)


def _solved(param: torch.Tensor, diag: bool, solver: str) -> torch.Tensor:
    result = torch.diag(param.detach()) if diag else param.detach()
    if not torch.isfinite(result).all():
        raise ReplaceMeError(f"the {solver} solver diverged (non-finite map); lower cosine.lr or use solver: lbfgs")
    return result.to(torch.float64)


def mean_cosine_distance(x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor, transform: torch.Tensor) -> float:
    t = transform.to(torch.float32)
    return float((1 - torch.nn.functional.cosine_similarity(residual + x @ t, residual + y, dim=-1)).mean())


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def solve_cosine_streaming(rows: Callable[[], Iterator[Rows]], *, hidden: int, init: torch.Tensor,
                           loss: str = "cosine", solver: str = "adam", diag: bool = False, steps: int = 300,
                           lr: float = 1e-3, batch_tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """:func:`solve_cosine` over rows that do not fit in memory: ``rows()`` starts a fresh pass over
    ``(x, y, residual)`` chunks (e.g. :meth:`replaceme.activations.ActivationStore.iter_rows`).

    * L-BFGS needs the full-batch objective: its closure sums loss and gradient chunk by chunk over
      one pass and divides by the row count, which is exactly the mean :func:`solve_cosine` uses.
    * Adam takes ``batch_tokens``-row minibatches from successive passes, each chunk shuffled with
      the seeded generator (rows are mixed within a chunk, not across chunks), until ``steps``.
    """
    generator = torch.Generator().manual_seed(seed)
    if init.shape != (hidden, hidden):
        raise ValueError(f"init must be [{hidden}, {hidden}], got {tuple(init.shape)}")
    param = _parameter(init, diag)

    def summed(x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return _row_losses(param, diag, loss, x, y, residual).sum()

    def empty() -> ReplaceMeError:
        return ReplaceMeError("dataset: no activation rows reached the cosine solver; the calibration set is empty")

    if solver == "lbfgs":
        lbfgs = torch.optim.LBFGS([param], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            total, count = 0.0, 0
            for x, y, residual in rows():
                value = summed(x.float(), y.float(), residual.float())
                value.backward()
                total += float(value.detach())
                count += x.shape[0]
            if count == 0:
                raise empty()
            assert param.grad is not None  # backward() ran on count > 0 rows
            param.grad /= count
            return torch.tensor(total / count)

        lbfgs.step(closure)
    else:
        adam = torch.optim.Adam([param], lr=lr)

        def step(batch: list[torch.Tensor]) -> None:
            adam.zero_grad()
            (summed(*batch) / batch[0].shape[0]).backward()
            adam.step()

        done = 0
        while done < steps:
            seen = 0
            carry: list[torch.Tensor] | None = None
            for chunk in rows():
                order = torch.randperm(chunk[0].shape[0], generator=generator)
                shuffled = [c.float()[order] for c in chunk]
                carry = shuffled if carry is None else [torch.cat(pair) for pair in zip(carry, shuffled, strict=True)]
                seen += order.numel()
                while carry[0].shape[0] >= batch_tokens and done < steps:
                    step([c[:batch_tokens] for c in carry])
                    carry = [c[batch_tokens:] for c in carry]
                    done += 1
                if done == steps:
                    break
            if seen == 0:
                raise empty()
            if done < steps and carry is not None and carry[0].shape[0]:  # the pass's short last batch
                step(carry)
                done += 1
    return _solved(param, diag, solver)
