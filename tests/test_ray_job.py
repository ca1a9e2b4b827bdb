"""The quickstart submitted with `ray job submit` to a real Ray head on loopback, as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from mlflow import MlflowClient

from conftest import ROOT
from ray_cluster import ray_cli

pytest.importorskip("ray")


@pytest.mark.slow
def test_quickstart_as_a_ray_job(tmp_path, ray_head):
    out = tmp_path / "job-out"
    entrypoint = [sys.executable, "-m", "replaceme", "run", "--config", "examples/quickstart.yaml",  # progress on
                  "--set", "engine.backend=ray", "--set", "engine.replicas=2", "--set", f"output_dir={out}",
                  "--set", "dataset_size=64"]
    deadline = time.monotonic() + 240
    while True:  # a fresh head's job agent may not have registered yet (slow on a loaded 2-core runner)
        job_id = f"replaceme-test-{uuid.uuid4().hex[:8]}"
        submit = [ray_cli(), "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(ROOT),
                  "--submission-id", job_id, "--", *entrypoint]
        result = subprocess.run(submit, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        if "No available agent" not in result.stderr + result.stdout or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout
    assert "removed blocks" in result.stdout  # the job's own summary, streamed back by `ray job submit`
    # the job's stderr is no terminal: progress comes as log lines (percent, rate, ETA), not tqdm bars
    assert "%|" not in result.stdout + result.stderr
    assert any(line.startswith("INFO profile:") and "shard/s" in line and "ETA" in line
               for line in result.stdout.splitlines()), result.stdout[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["removed_fraction"] == 0.25 and report["retention"] > 0.9
    assert report["config"]["engine"]["backend"] == "ray"
    assert (out / "model" / "config.json").exists() and (out / "transforms.safetensors").exists()

    # lineage: the job's MLflow run (the session's store, through the head's environment) names the job
    assert report["lineage"]["ray_job_id"] == job_id
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("replaceme").experiment_id],
                               f"tags.ray_job_id = '{job_id}'")
    assert run.data.params["engine.backend"] == "ray"
