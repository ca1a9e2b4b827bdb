"""The pipeline steps in ops/: run one by one, skipped when done, re-run when a setting changes,
refused without their inputs; configs and outputs at URIs; the report and the MLflow record."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import fsspec
import pytest
import yaml
from safetensors.torch import load_file

from conftest import CALIB, EVAL, ROOT, write_config
from ops.calibrate import calibrate
from ops.common import current_marker, load_step_config, output_dir
from ops.evaluate import evaluate
from ops.merge import merge
from ops.profile import profile
from ops.register import register
from ops.solve import solve
from replaceme import recipe
from replaceme.errors import ReplaceMeError
from replaceme.lineage import PIPELINE_RUN_ENV


def job(tmp_path, model, **values) -> dict:
    settings = dict(model_path=str(model), dataset=str(CALIB), max_length=32, dataset_size=24, layers_to_skip=2,
                    eval={"dataset": str(EVAL), "dataset_size": 8}, output_dir=str(tmp_path / "out"))
    return {**settings, **values}


@pytest.fixture
def config(tmp_path, tiny_llama):
    return str(write_config(tmp_path / "job.yaml", **job(tmp_path, tiny_llama)))


@pytest.fixture(autouse=True)
def no_leaked_run_id(monkeypatch):
    monkeypatch.delenv(PIPELINE_RUN_ENV, raising=False)  # --pipeline-run-id sets it for the process


def test_a_step_that_is_done_is_skipped(config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="replaceme")
    assert not profile(config).skipped
    first = calibrate(config)
    assert not first.skipped and os.path.exists(tmp_path / "out" / "transforms.safetensors")
    again = calibrate(config)
    assert again.skipped and again.marker["run"] == first.marker["run"]
    assert "calibrate: already done" in caplog.text
    marker = json.loads((tmp_path / "out" / "steps" / "calibrate.json").read_text())
    assert marker["digest"] == first.marker["digest"] and marker["timings"]["calibrate"] > 0
    assert marker["artefacts"]["transforms.safetensors"] == f"{tmp_path}/out/transforms.safetensors"


def test_a_changed_alpha_re_solves_without_recalibrating(config, tmp_path):
    for step in (profile, calibrate, solve):
        step(config)
    before = load_file(tmp_path / "out" / "transforms.safetensors")
    alpha = ["alpha=1000"]
    assert calibrate(config, overrides=alpha).skipped  # the statistics do not depend on alpha
    assert not solve(config, overrides=alpha).skipped
    after = load_file(tmp_path / "out" / "transforms.safetensors")
    (key,) = before
    assert not (before[key] == after[key]).all()
    assert solve(config, overrides=alpha).skipped
    with pytest.raises(ReplaceMeError, match="the solve step in .* was run with other settings.*ops.solve"):
        merge(config)  # alpha 0 again: the maps on disk are not the ones asked for


def test_forcing_a_step_re_runs_it_and_every_step_after_it(config):
    for step in (profile, calibrate, solve):
        step(config)
    forced = calibrate(config, force=True)
    assert not forced.skipped
    solved = solve(config)  # calibrate solved the new maps with these settings, and recorded it
    assert solved.skipped and solved.marker["upstream_run"] == forced.marker["run"]
    assert not solve(config, force=True).skipped


def test_merge_without_maps_names_the_missing_file_and_the_step_to_run(config, tmp_path):
    profile(config)
    with pytest.raises(ReplaceMeError) as error:
        merge(config)
    assert str(error.value) == (f"merge: {tmp_path}/out/transforms.safetensors is missing; "
                                "run `python -m ops.solve` with this config first")
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(ReplaceMeError, match=r"calibrate: .*/elsewhere/blocks\.json is missing; run `python -m ops\.profile"):
        calibrate(config, output=str(elsewhere))
    assert not elsewhere.exists()  # a refused step leaves nothing behind
    elsewhere.mkdir()  # blocks made some other way: replaceme does not adopt the folder
    (elsewhere / "blocks.json").write_text("[[2, 4]]")
    with pytest.raises(ReplaceMeError, match=r"output_dir: .*/elsewhere holds files that replaceme did not write"):
        calibrate(config, output=str(elsewhere))
    (elsewhere / ".replaceme").write_text("{}")  # a replaceme folder whose blocks no marker vouches for
    with pytest.raises(ReplaceMeError, match=r"calibrate: .*/elsewhere/steps/profile\.json is missing.*ops\.profile"):
        calibrate(config, output=str(elsewhere))


def test_a_step_runs_alone_from_the_command_line(config, tmp_path):
    done = subprocess.run([sys.executable, "-m", "ops.merge", "--config", config, "--quiet"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: merge: {tmp_path}/out/transforms.safetensors is missing; run `python -m ops.solve` with this config first")
    other = tmp_path / "other"
    done = subprocess.run([sys.executable, "-m", "ops.profile", "--config", config, "--output", str(other),
                           "--set", "blocks=[[2,4]]", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"step": "profile", "status": "done", "marker": f"{other}/steps/profile.json"}
    assert json.loads((other / "blocks.json").read_text()) == [[2, 4]]


def test_the_whole_chain_on_uris_ends_with_the_report_of_a_run(tmp_path, tiny_llama):
    """Config and outputs at fsspec URIs; report.json has every key `replaceme run` writes."""
    fs = fsspec.filesystem("memory")
    config_uri, output_uri = "memory://ops-test/job.yaml", "memory://ops-test/out"
    fs.pipe(config_uri, yaml.safe_dump(job(tmp_path, tiny_llama, output_dir="unused")).encode())
    try:
        for step in (profile, calibrate, solve, merge, evaluate):
            step(config_uri, output=output_uri, pipeline_run_id="kfp-run-1")
        report = json.loads(fs.cat(f"{output_uri}/report.json"))
        markers = [f"{output_uri}/steps/{s}.json" for s in ("profile", "calibrate", "solve", "merge", "evaluate")]
        assert all(fs.exists(m) for m in markers) and fs.exists(f"{output_uri}/model/config.json")
    finally:
        fs.rm("memory://ops-test", recursive=True)
    reference = recipe.run(load_step_config(None, [f"{k}={json.dumps(v)}" for k, v in
                                                    job(tmp_path, tiny_llama, output_dir=str(tmp_path / "run")).items()]),
                           progress=False)
    assert set(report) == set(reference)
    assert report["blocks"] == reference["blocks"]
    assert report["perplexity_after"] == pytest.approx(reference["perplexity_after"])
    assert set(report["seconds"]) == {"profile", "calibrate", "merge", "evaluate"}  # calibrate solved the maps
    assert report["lineage"]["pipeline_run_id"] == "kfp-run-1"


def test_register_records_one_mlflow_run_tagged_with_the_pipeline_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    settings = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "mlflow.experiment=ops-test"]
    for step in (profile, calibrate, solve, merge, evaluate):
        step(config, pipeline_run_id="kfp-run-2")
    recorded = register(config, overrides=settings)
    run_id = recorded.marker["mlflow_run_id"]
    assert register(config, overrides=settings).skipped  # no second MLflow run
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.data.tags["pipeline_run_id"] == "kfp-run-2"
    assert run.data.metrics["perplexity_after"] > 1
    assert current_marker("register", load_step_config(config, settings), output_dir(load_step_config(config)))
