"""PNG figures: the block-distance profile of one run, and a comparison of runs.

Each figure says in plain words what it plots; the ``*_figure`` functions build the matplotlib figure
(tests read its titles, labels and marks), the ``plot_*`` functions render it as PNG bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

ZOOM_NOTE_BELOW = 0.05  # a spread under 5% of the values' size is called out as a zoomed axis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on clusters or CI
    from matplotlib import pyplot as plt

    return plt


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")  # legends placed outside the axes included
    _pyplot().close(figure)
    return buffer.getvalue()


def chosen_starts(blocks: Sequence[tuple[int, int]], layers_to_skip: int) -> list[int]:
    """First layers of the candidate blocks that were chosen: a removed block ``[s, e)`` is the union of
    the touching candidates starting at ``s, s + layers_to_skip, …`` (merged when consecutive)."""
    return sorted({start for s, e in blocks for start in range(s, e - layers_to_skip + 1, layers_to_skip)} |
                  {s for s, _ in blocks})


def distances_figure(distances: Sequence[tuple[int, int, float]], blocks: Sequence[tuple[int, int]],
                     layers_to_skip: int):
    """The distance of every candidate block against its first layer, the chosen candidates shaded and
    the minimum marked."""
    from matplotlib.ticker import MaxNLocator

    starts = [s for s, _, _ in distances]
    values = [d for _, _, d in distances]
    figure, axes = _pyplot().subplots(figsize=(8, 4), dpi=100)
    axes.plot(starts, values, marker="o", markersize=4, linewidth=1, color="tab:blue", label="candidate block")
    for number, start in enumerate(chosen_starts(blocks, layers_to_skip)):
        axes.axvspan(start - 0.4, start + 0.4, alpha=0.25, color="tab:red", linewidth=0,
                     label="chosen (removed)" if number == 0 else None)
    if values:
        best = min(range(len(values)), key=values.__getitem__)
        axes.plot([starts[best]], [values[best]], marker="*", markersize=14, color="tab:orange", linestyle="none",
                  label=f"minimum: s = {starts[best]}, distance {values[best]:.3g}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("s: first layer of the block (0-based)")
    axes.set_ylabel("angular distance (0: same direction)")
    axes.set_title(f"Angular distance between the input and the output of the {layers_to_skip}-layer block "
                   "starting at layer s\n(lower: the block changes the hidden state less; shaded: removed)",
                   fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return figure


def plot_distances(distances: Sequence[tuple[int, int, float]], blocks: Sequence[tuple[int, int]],
                   layers_to_skip: int) -> bytes:
    return _png(distances_figure(distances, blocks, layers_to_skip))


MARKERS = "osD^v<>phX*"


def runs_figure(labels: Sequence[str], removed: Sequence[float], values: Sequence[float], metric: str,
                baseline: Sequence[float | None] | None = None):
    """One point per run, each with its own colour, marker and legend entry: the fraction of layers
    removed against ``metric``. ``baseline``: the same metric for plain dropping of each run's blocks
    (hollow grey points joined to the run's), when the runs recorded it. A y axis that a tiny spread
    would zoom to full height says so on the figure."""
    figure, axes = _pyplot().subplots(figsize=(8, 4.5), dpi=100)  # legend below, one line per run
    colours = _pyplot().get_cmap("tab10")
    shown = list(values)
    for i, (label, x, y) in enumerate(zip(labels, removed, values, strict=True)):
        axes.scatter([x], [y], color=colours(i % 10), marker=MARKERS[i % len(MARKERS)], s=50, label=label, zorder=3)
        drop = baseline[i] if baseline is not None else None
        if drop is not None and not math.isnan(drop):
            axes.plot([x, x], [y, drop], color="grey", linestyle=":", linewidth=1, zorder=1)
            axes.scatter([x], [drop], facecolors="none", edgecolors="grey", marker=MARKERS[i % len(MARKERS)], s=50,
                         zorder=2, label="plain dropping (same blocks, no map)" if len(shown) == len(values) else None)
            shown.append(drop)
    axes.ticklabel_format(axis="y", useOffset=False)  # no "+9.99e-1" offset that hides the scale
    axes.set_xlabel("fraction of decoder layers removed")
    axes.set_ylabel(metric)
    notes = []
    zoom = zoom_note(shown)
    if zoom:
        notes.append(zoom)
    if baseline is None or all(b is None or math.isnan(b) for b in baseline):
        notes.append(f"plain dropping: not recorded for {metric}")
    axes.set_title("\n".join([f"{metric} of each run against the fraction of layers removed", *notes]), fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), borderaxespad=0)
    return figure


def zoom_note(values: Sequence[float]) -> str | None:
    """What the reader must be told when the y axis will be stretched over a tiny spread, else None."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if len(finite) < 2:
        return None
    spread, size = max(finite) - min(finite), max(abs(v) for v in finite)
    if spread == 0:
        return "all values are equal"
    if size > 0 and spread < ZOOM_NOTE_BELOW * size:
        return f"y axis zoomed in: the values differ by at most {spread:.2g} ({100 * spread / size:.2g}% of their size)"
    return None


def plot_runs(labels: Sequence[str], removed: Sequence[float], values: Sequence[float], metric: str,
              baseline: Sequence[float | None] | None = None) -> bytes:
    return _png(runs_figure(labels, removed, values, metric, baseline))
