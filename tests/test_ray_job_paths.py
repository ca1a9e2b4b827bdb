"""Inside a Ray job a relative output_dir or MLflow store lands in the job's temporary working directory,
which Ray removes with the job: the run says so first thing in the job's log (no Ray cluster needed:
the job is recognised by the environment Ray gives its driver)."""

from __future__ import annotations

from conftest import CALIB
from replaceme.config import validate_config
from replaceme.lineage import ray_job_warnings
from user_cli import replaceme_cli

RAY_JOB = {"RAY_JOB_ID": "02000000", "REPLACEME_PROGRESS": "log"}


def job_config(tmp_path, model, output_dir="out", **settings):
    from conftest import write_config

    return write_config(tmp_path / "job.yaml", model_path=str(model), dataset=str(CALIB), max_length=32, dataset_size=8,
                        blocks=[[2, 4]], output_dir=output_dir, **settings)


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("WARNING")]


def test_a_run_in_a_ray_job_warns_of_a_relative_output_and_tracking_store(tmp_path, tiny_llama):
    config = job_config(tmp_path, tiny_llama, save_transform_only=True)
    result = replaceme_cli("run", "--config", str(config), "--quiet", cwd=tmp_path,
                           env={**RAY_JOB, "MLFLOW_TRACKING_URI": ""})  # the default store, sqlite:///mlflow.db
    assert result.returncode == 0, result.stderr
    output, tracking = warnings_in(result.stderr)[:2]
    assert output.startswith("WARNING output_dir: 'out' is a relative path: inside Ray job 02000000")
    assert f"the working directory {tmp_path} is the job's temporary folder" in output and "s3://" in output
    assert tracking.startswith("WARNING mlflow.tracking_uri: the MLflow store sqlite:///mlflow.db is a relative path")
    assert "http://" in tracking
    assert result.stderr.index("WARNING output_dir") < result.stderr.index("step: profile")  # before any work


def test_uris_and_absolute_paths_are_quiet_and_so_is_a_run_outside_a_job(tmp_path, tiny_llama):
    absolute = job_config(tmp_path, tiny_llama, output_dir=str(tmp_path / "out"))
    assert not warnings_in(replaceme_cli("profile", "--config", str(absolute), cwd=tmp_path, env=RAY_JOB).stderr)
    relative = job_config(tmp_path, tiny_llama, output_dir="out2")
    step = replaceme_cli("profile", "--config", str(relative), cwd=tmp_path, env=RAY_JOB)
    assert step.returncode == 0 and [w.split(":")[0] for w in warnings_in(step.stderr)] == ["WARNING output_dir"]
    outside = replaceme_cli("profile", "--config", str(relative), "--overwrite", cwd=tmp_path, env={"RAY_JOB_ID": ""})
    assert outside.returncode == 0 and not warnings_in(outside.stderr)


def test_what_counts_as_relative(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_1"}}')
    config = validate_config({"model_path": "m", "dataset": "d", "output_dir": "s3://bucket/out",
                              "distances_path": "d.csv", "activations": {"uri": "file:///abs/store"}})
    assert [w.split(":")[0] for w in ray_job_warnings(config)] == ["distances_path"]
    assert "inside Ray job raysubmit_1" in ray_job_warnings(config)[0]
    for store, relative in [("sqlite:///mlflow.db", True), ("sqlite:////abs/mlflow.db", False), ("mlruns", True),
                            ("file:./mlruns", True), ("http://mlflow:5000", False), ("databricks", False)]:
        assert len(ray_job_warnings(config, store)) == 1 + relative, store
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert ray_job_warnings(config, "sqlite:///mlflow.db") == []
