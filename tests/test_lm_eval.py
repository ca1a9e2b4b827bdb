"""lm-eval on the pruned model: a task of the test's own over a local JSON-lines file (nothing is
downloaded), its metrics in report.json, in MLflow (the run and the logged model) and in `compare`."""

from __future__ import annotations

import json

import pytest

from conftest import BUNDLED_MODEL, CALIB, EVAL, ROOT
from replaceme import cli
from replaceme.config import EvalConfig
from replaceme.tracking import lm_eval_metrics

TASK = "bard_completion"
# a two-choice completion task: the bundled model, trained on Shakespeare, should prefer the first
DOCS = [
    {"context": "To be, or not to", "choices": [" be", " qx"], "label": 0},
    {"context": "My good lord, I", "choices": [" will", " zzk"], "label": 0},
    {"context": "Enter the", "choices": [" King", " vqj"], "label": 0},
]


def local_task(folder) -> str:
    """An lm-eval task YAML over a local file, in ``folder`` (passed as eval.lm_eval_include_path)."""
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (folder / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return str(folder)


def run_args(output_dir, *sets: str) -> list[str]:
    base = [f"model_path={BUNDLED_MODEL}", f"dataset={CALIB}", "dataset_size=32", f"output_dir={output_dir}"]
    return ["run", "--config", str(ROOT / "examples" / "quickstart.yaml"), "--quiet",
            *[arg for item in [*base, *sets] for arg in ("--set", item)]]


def test_lm_eval_results_become_mlflow_metric_names():
    results = {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
                            "acc_norm_stderr,none": "N/A", "sample_len": 10},
               "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.3},
               "wikitext": {"word_perplexity,none": 12.5, "bits_per_byte,none": float("nan")}}
    assert lm_eval_metrics(results) == {
        "lm_eval/arc_easy/acc": 0.5, "lm_eval/arc_easy/acc_stderr": 0.1, "lm_eval/arc_easy/acc_norm": 0.6,
        "lm_eval/gsm8k/exact_match/strict-match": 0.25, "lm_eval/gsm8k/exact_match/flexible-extract": 0.3,
        "lm_eval/wikitext/word_perplexity": 12.5}


def test_eval_accepts_a_task_list_or_the_references_mapping_of_few_shot_counts():
    assert EvalConfig(dataset="x", lm_eval_tasks=["arc_easy"]).lm_eval_tasks == ["arc_easy"]
    mapping = EvalConfig(dataset="x", lm_eval_tasks={"arc_easy": 0, "mmlu": 5, "hellaswag": None}, lm_eval_limit=100)
    assert mapping.lm_eval_tasks == {"arc_easy": 0, "mmlu": 5, "hellaswag": None} and mapping.lm_eval_limit == 100
    with pytest.raises(ValueError):
        EvalConfig(dataset="x", lm_eval_tasks={"arc_easy": 0}, lm_eval_limit=0)


@pytest.mark.slow
def test_lm_eval_on_a_local_task_is_reported_tracked_and_compared(tmp_path, mlflow_server, capsys, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    tasks = local_task(tmp_path)
    output = tmp_path / "out"
    assert cli.main(run_args(
        output, f"eval={{dataset: {EVAL}, dataset_size: 16, lm_eval_tasks: {{{TASK}: 0}}, lm_eval_limit: 2, "
                f"lm_eval_include_path: {tasks}}}",
        f"mlflow.tracking_uri={mlflow_server.tracking_uri}", "mlflow.experiment=lm-eval",
        "mlflow.log_model=files")) == 0
    capsys.readouterr()

    report = json.loads((output / "report.json").read_text())
    result = report["lm_eval"][TASK]
    assert result["sample_len"] == 2 and 0.0 <= result["acc,none"] <= 1.0  # lm_eval_limit: 2 of the 3 documents

    client = MlflowClient(mlflow_server.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("lm-eval").experiment_id])
    assert run.data.metrics[f"lm_eval/{TASK}/acc"] == pytest.approx(result["acc,none"])
    [model] = client.search_logged_models([run.info.experiment_id])
    assert f"lm_eval/{TASK}/acc" in {m.key for m in model.metrics}

    assert cli.main(["compare", "--experiment", "lm-eval", "--tracking-uri", mlflow_server.tracking_uri]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[-1] == f"lm_eval/{TASK}/acc" and float(row.split()[-1]) == pytest.approx(result["acc,none"])


def test_lm_eval_refuses_a_model_the_driver_cannot_hold_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("replaceme.recipe.free_bytes", lambda device: 1 << 20)  # 1 MiB free
    output = tmp_path / "out"
    assert cli.main(run_args(output, f"eval={{dataset: {EVAL}, dataset_size: 8, lm_eval_tasks: [{TASK}]}}",
                             "mlflow.enabled=false")) == 2
    error = capsys.readouterr().err
    assert "eval.lm_eval_tasks: lm-eval loads the whole pruned model" in error and "1.00 MiB free" in error
    assert not (output / "calibration").exists()
