"""``replaceme compare``: the runs of an MLflow experiment side by side (MLflow is the database)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from replaceme.config import redact_uri
from replaceme.errors import ReplaceMeError

# column → where MLflow keeps it (``replaceme log`` writes these names)
COLUMNS = {
    "run": ("tag", "mlflow.runName"),
    "method": ("param", "method"),
    "alpha": ("param", "alpha"),
    "blocks": ("tag", "replaceme.blocks"),
    "removed": ("metric", "removed_fraction"),
    "ppl_before": ("metric", "perplexity_before"),
    "ppl_after": ("metric", "perplexity_after"),
    "retention": ("metric", "retention"),
    "seconds": ("metric", "seconds/total"),
}
DROPPING = "_dropping"  # suffix of the residuals of plain dropping (``replaceme log`` writes both)
HIGHER_IS_BETTER = {"retention", "removed"}  # other columns sort lowest first (perplexity, residuals, time)
LM_EVAL = "lm_eval/"  # lm-eval task metrics (``lm_eval/<task>/<metric>``): a column each, after the others
LM_EVAL_LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "stderr")


def higher_is_better(column: str) -> bool:
    if column.startswith(LM_EVAL):  # accuracy, exact match, F1 …; perplexities and errors the other way
        return not any(word in column for word in LM_EVAL_LOWER_IS_BETTER)
    return column in HIGHER_IS_BETTER


def compare_runs(tracking_uri: str, experiment: str, *, metrics: Sequence[str] = (), sort: str = "retention",
                 max_runs: int = 100, field: str = "--tracking-uri"):
    """A pandas DataFrame, one row per finished run of ``experiment``, best ``sort`` first.

    ``field`` names where ``tracking_uri`` came from, for the message when it holds no store."""
    import pandas as pd

    _require_store(tracking_uri, field)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments(max_results=50)]
        raise ReplaceMeError(f"--experiment: no experiment {experiment!r} in {redact_uri(tracking_uri)}; "
                             f"experiments there: {', '.join(names) or 'none'}")
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=max_runs)
    # a solver metric's plain-dropping counterpart comes along: the baseline of its plot
    metrics = [*metrics, *(f"{m}{DROPPING}" for m in metrics
                           if m.startswith("solver/") and not m.endswith(DROPPING) and f"{m}{DROPPING}" not in metrics)]
    lm_eval = sorted({key for run in runs for key in run.data.metrics
                      if key.startswith(LM_EVAL) and "stderr" not in key and key not in metrics})
    shown = [*metrics, *lm_eval]
    table = pd.DataFrame([_row(run, shown) for run in runs], columns=[*COLUMNS, *shown])
    if sort not in table.columns:
        raise ReplaceMeError(f"--sort: {sort!r} is not a column; choose one of {', '.join(table.columns)}")
    return table.sort_values(sort, ascending=not higher_is_better(sort), na_position="last", ignore_index=True)


def _require_store(tracking_uri: str, field: str) -> None:
    """A SQLite store that does not exist holds no runs; opening it would create an empty one."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    database = os.path.abspath(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not os.path.exists(database):
        raise ReplaceMeError(f"{field}: no runs are recorded at {database} (there is no MLflow store there); point "
                             "at the store your runs were recorded in with --tracking-uri URI or $MLFLOW_TRACKING_URI")


def _row(run: Any, metrics: Sequence[str]) -> dict[str, Any]:
    sources = {"tag": run.data.tags, "param": run.data.params, "metric": run.data.metrics}
    row = {column: sources[kind].get(key) for column, (kind, key) in COLUMNS.items()}
    row["alpha"] = float(row["alpha"]) if row["alpha"] is not None else None  # params are strings
    row.update({metric: run.data.metrics.get(metric) for metric in metrics})
    return row


def format_table(table) -> str:
    if table.empty:
        return "no finished runs"
    return table.to_string(index=False, float_format=lambda value: f"{value:.4g}", na_rep="-")


def plot_comparison(table, metric: str) -> bytes:
    from replaceme.plots import plot_runs

    if metric not in table.columns:
        raise ReplaceMeError(f"--plot-metric: {metric!r} is not a column; choose one of {', '.join(table.columns)}")
    shown = table.dropna(subset=["removed", metric])
    column = f"{metric}{DROPPING}"
    baseline = [None if _missing(v) else float(v) for v in shown[column]] if column in shown.columns else None
    return plot_runs(run_labels(shown), list(shown["removed"]), list(shown[metric]), metric, baseline)


def run_labels(table) -> list[str]:
    """A distinct legend label per row: the run name, with what tells runs of the same name apart
    (method, alpha, blocks), and a number when even those agree."""
    rows = table.to_dict("records")
    names = [str(row["run"]) if not _missing(row["run"]) else f"run {i + 1}" for i, row in enumerate(rows)]
    labels = []
    for name, row in zip(names, rows, strict=True):
        if names.count(name) > 1:
            details = [f"{key} {row[key]:g}" if isinstance(row[key], float) else f"{key} {row[key]}"
                       for key in ("method", "alpha", "blocks") if not _missing(row[key])]
            name = f"{name} ({', '.join(details)})" if details else name
        labels.append(name)
    counts = {label: labels.count(label) for label in labels}
    seen: dict[str, int] = {}
    for i, label in enumerate(list(labels)):
        seen[label] = seen.get(label, 0) + 1
        if counts[label] > 1:
            labels[i] = f"{label} #{seen[label]}"
    return labels


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN
