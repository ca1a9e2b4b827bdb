"""PNG figures: the block-distance profile of one run, and a comparison of runs."""

from __future__ import annotations

import io
from collections.abc import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on clusters or CI
    from matplotlib import pyplot as plt

    return plt


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _pyplot().close(figure)
    return buffer.getvalue()


def plot_distances(distances: Sequence[tuple[int, int, float]], chosen: Sequence[tuple[int, int]], block_size: int) -> bytes:
    plt = _pyplot()
    starts = [s for s, _, _ in distances]
    values = [d for _, _, d in distances]
    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    axes.plot(starts, values, marker="o", linewidth=1)
    for start, end in chosen:
        axes.axvspan(start - 0.5, end - 0.5, alpha=0.2, color="tab:red")
    axes.set_xlabel("first removed layer s")
    axes.set_ylabel("angular distance")
    axes.set_title(f"Distance between h[s-1] and h[s+{block_size}-1] (shaded: removed)")
    axes.grid(alpha=0.3)
    return _png(figure)


def plot_runs(names: Sequence[str], removed: Sequence[float], values: Sequence[float], metric: str) -> bytes:
    """One point per run: the fraction of layers removed against ``metric``, labelled by run name."""
    figure, axes = _pyplot().subplots(figsize=(7, 4), dpi=100)
    axes.scatter(removed, values)
    for name, x, y in zip(names, removed, values, strict=True):
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("fraction of layers removed")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} by run")
    axes.grid(alpha=0.3)
    return _png(figure)
