"""The block-distance profile as a PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence


def plot_distances(distances: Sequence[tuple[int, int, float]], chosen: Sequence[tuple[int, int]], block_size: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on clusters or CI
    from matplotlib import pyplot as plt

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
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
