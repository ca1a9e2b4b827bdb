"""Plots people can read: what is plotted said in plain words, the chosen blocks and the minimum
marked, runs told apart, plain dropping shown as the baseline, and a zoomed axis called out."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from replaceme import plots
from replaceme.compare import plot_comparison, run_labels

# 12 layers, blocks of 2: the lowest distances start at 6 and 8, merged into [6, 10)
DISTANCES = [(s, s + 2, d) for s, d in zip(range(1, 11), [.5, .45, .4, .35, .3, .12, .2, .1, .3, .4], strict=True)]


def test_distances_plot_says_what_it_shows_and_marks_the_choice_and_the_minimum():
    figure = plots.distances_figure(DISTANCES, [(6, 10)], layers_to_skip=2)
    axes = figure.axes[0]
    assert "angular distance between the input and the output of the 2-layer block starting at layer s" in \
        axes.get_title().lower()
    assert axes.get_xlabel().startswith("s: first layer of the block")
    shaded = sorted((p.get_x() + p.get_width() / 2) for p in axes.patches)  # one band per chosen candidate start
    assert shaded == pytest.approx([6, 8])
    labels = axes.get_legend_handles_labels()[1]
    assert "minimum: s = 8, distance 0.1" in labels and "chosen (removed)" in labels
    assert plots.plot_distances(DISTANCES, [(6, 10)], 2).startswith(b"\x89PNG")


def test_chosen_starts_are_the_candidates_a_merged_block_is_made_of():
    assert plots.chosen_starts([(6, 10), (2, 4)], 2) == [2, 6, 8]
    assert plots.chosen_starts([(3, 6)], 3) == [3]


def table(**columns) -> pd.DataFrame:
    base = {"run": ["llama-lstsq-minus4"] * 3, "method": ["lstsq"] * 3, "alpha": [0.0, 0.1, 0.1],
            "blocks": ["[[2, 6]]"] * 3, "removed": [0.25] * 3, "retention": [0.91234, 0.91236, 0.91238]}
    return pd.DataFrame({**base, **columns})


def test_runs_of_the_same_name_get_distinct_labels():
    labels = run_labels(table())
    assert len(set(labels)) == 3
    assert labels[0] == "llama-lstsq-minus4 (method lstsq, alpha 0, blocks [[2, 6]])"
    assert labels[1:] == ["llama-lstsq-minus4 (method lstsq, alpha 0.1, blocks [[2, 6]]) #1",
                          "llama-lstsq-minus4 (method lstsq, alpha 0.1, blocks [[2, 6]]) #2"]
    assert run_labels(table(run=["a", None, "b"])) == ["a", "run 2", "b"]


def _figure(monkeypatch, frame, metric):
    made = {}
    real = plots.runs_figure

    def keep(*args, **kwargs):
        made["figure"] = real(*args, **kwargs)
        return made["figure"]

    monkeypatch.setattr(plots, "runs_figure", keep)
    assert plot_comparison(frame, metric).startswith(b"\x89PNG")
    return made["figure"].axes[0]


def _texts(axes) -> str:
    return axes.get_title()


def test_a_tiny_spread_is_called_out_and_each_run_has_its_own_colour(monkeypatch):
    axes = _figure(monkeypatch, table(), "retention")
    assert "y axis zoomed in: the values differ by at most 4e-05" in _texts(axes)
    assert "plain dropping: not recorded for retention" in _texts(axes)
    colours = {to_rgba(c.get_facecolor()[0]) for c in axes.collections}
    assert len(colours) == 3 and len(axes.get_legend().get_texts()) == 3
    assert not axes.yaxis.get_major_formatter().get_useOffset()


def test_plain_dropping_is_the_baseline_of_a_solver_metric(monkeypatch):
    frame = table(**{"solver/relative_residual": [0.41, 0.40, 0.39],
                     "solver/relative_residual_dropping": [0.91, 0.91, math.nan]})
    axes = _figure(monkeypatch, frame, "solver/relative_residual")
    labels = [t.get_text() for t in axes.get_legend().get_texts()]
    assert labels.count("plain dropping (same blocks, no map)") == 1
    hollow = [c for c in axes.collections if len(c.get_facecolor()) == 0]  # facecolors="none"
    assert len(hollow) == 2  # the third run recorded no baseline
    assert "zoomed" not in _texts(axes) and "not recorded" not in _texts(axes)
