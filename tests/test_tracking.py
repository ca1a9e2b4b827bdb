"""MLflow tracking: the embedded local store, a real `mlflow server` (artifacts on the S3 test
server), re-logging after an outage, registered model versions, redaction, and `replaceme compare`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import BUNDLED_MODEL, CALIB, EVAL, ROOT
from replaceme import cli
from replaceme.config import load_config
from replaceme.tracking import _digest, default_run_name, log_output

pytestmark = pytest.mark.slow
SECRET = "hf_do-not-log-me-7d2c"
SMALL = [f"model_path={BUNDLED_MODEL}", f"dataset={CALIB}", "dataset_size=64",
         f"eval={{dataset: {EVAL}, dataset_size: 32}}", f"token={SECRET}"]
ARTIFACTS = {"report.json", "blocks.json", "distances.csv", "distances.png", "transforms.safetensors"}


def quickstart_args(output_dir, *extra: str) -> list[str]:
    sets = [*SMALL, f"output_dir={output_dir}", *extra]
    return ["run", "--config", str(ROOT / "examples" / "quickstart.yaml"), "--quiet",
            *[arg for item in sets for arg in ("--set", item)]]


@pytest.fixture(scope="module")
def finished_output(tmp_path_factory):
    """One pruned run, not yet tracked."""
    output = tmp_path_factory.mktemp("tracked") / "out"
    assert cli.main(quickstart_args(output, "mlflow.enabled=false")) == 0
    return output


def config_for(output, **mlflow_settings):
    sets = [*SMALL, f"output_dir={output}"] + [f"mlflow.{k}={v}" for k, v in mlflow_settings.items()]
    return load_config(ROOT / "examples" / "quickstart.yaml", sets)


def everything_logged(client: MlflowClient, run_id: str) -> str:
    """All text MLflow holds about a run (params, tags, inputs), to search for secrets."""
    run = client.get_run(run_id)
    return json.dumps([run.data.params, run.data.tags, [d.dataset.source for d in run.inputs.dataset_inputs]])


def test_quickstart_records_a_run_in_the_local_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(quickstart_args(tmp_path / "out", "mlflow.register_as=shakespeare-pruned")) == 0

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # the default store, in the working directory
    experiment = client.get_experiment_by_name("replaceme")
    [run] = client.search_runs([experiment.experiment_id])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["method"] == "lstsq" and params["layers_to_skip"] == "4" and params["engine.backend"] == "local"
    assert params["token"] == "***" and SECRET not in everything_logged(client, run.info.run_id)

    tags = run.data.tags
    assert tags["source_model_digest"] == report["lineage"]["source_model"]["digest"]
    assert tags["source_model"].endswith("examples/shakespeare-llama-16l")
    assert tags["replaceme.version"] and tags["statistics_uri"].endswith("out/calibration")
    assert json.loads(tags["replaceme.blocks"]) == report["blocks"]

    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"calibration", "evaluation"}
    assert inputs["calibration"].digest == report["lineage"]["datasets"]["calibration"]["digest"]
    assert json.loads(inputs["calibration"].source)["uri"] == str(CALIB)

    metrics = run.data.metrics
    assert metrics["perplexity_before"] == pytest.approx(report["perplexity_before"])
    assert metrics["retention"] == pytest.approx(report["retention"])
    assert metrics["seconds/calibrate"] == pytest.approx(report["seconds"]["calibrate"])
    assert metrics["peak_memory_mb/calibrate/host_rss"] > 0
    profile = client.get_metric_history(run.info.run_id, "distance")
    assert len(profile) == report["num_layers"] - 4  # one point per candidate block, stepped by first layer
    [block] = report["blocks"]
    [residual] = client.get_metric_history(run.info.run_id, "solver/relative_residual")
    assert residual.step == block[0] and residual.value == pytest.approx(report["solver"][0]["relative_residual"])

    assert {a.path for a in client.list_artifacts(run.info.run_id)} == ARTIFACTS
    [version] = client.search_model_versions("name = 'shakespeare-pruned'")
    assert version.run_id == run.info.run_id and json.loads(version.tags["blocks"]) == report["blocks"]
    [model] = client.search_logged_models([experiment.experiment_id])
    assert model.source_run_id == run.info.run_id and version.source == model.artifact_location
    files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert {"MLmodel", "model", "components", "requirements.txt"} <= files  # MLflow's transformers flavour
    linked = {m.key: m for m in model.metrics}  # the Logged Models view ranks models by these
    assert linked["perplexity_after"].value == pytest.approx(report["perplexity_after"])
    assert linked["perplexity_after"].dataset_digest == report["lineage"]["datasets"]["evaluation"]["digest"]
    assert linked["perplexity_after"].dataset_name == "evaluation" and "removed_fraction" in linked
    assert "seconds/total" not in linked  # a property of the run, not of the model


def test_server_run_has_artifacts_on_s3_and_register_adds_versions(finished_output, mlflow_server, s3_server):
    first = log_output(str(finished_output), config_for(finished_output, tracking_uri=mlflow_server.tracking_uri,
                                                         experiment="lineage", register_as="pruned"))
    client = MlflowClient(mlflow_server.tracking_uri)
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.metrics["retention"] > 0.5
    assert {a.path for a in client.list_artifacts(first)} == ARTIFACTS
    stored = s3_server.client().list_objects_v2(Bucket=mlflow_server.artifact_bucket)["Contents"]
    assert any(o["Key"].endswith("/report.json") for o in stored)  # through the server's proxy, onto S3

    again = log_output(str(finished_output), config_for(finished_output, tracking_uri=mlflow_server.tracking_uri,
                                                         experiment="lineage", register_as="pruned"))
    assert again == first  # the same output logged twice is one run

    other = log_output(str(finished_output), config_for(finished_output, tracking_uri=mlflow_server.tracking_uri,
                                                         experiment="lineage-copy", register_as="pruned"))
    versions = {int(v.version): v for v in client.search_model_versions("name = 'pruned'")}
    assert sorted(versions) == [1, 2]  # a name clash adds a version, never overwrites
    assert versions[1].run_id == first and versions[2].run_id == other


def test_registered_model_loads_with_pyfunc_and_matches_transformers(finished_output, mlflow_server, monkeypatch):
    """models:/name/version through the server (artifacts on S3) is a text-generation pipeline of
    the pruned model: the same logits and greedy tokens as model/ loaded with transformers."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_id = log_output(str(finished_output), config_for(finished_output, tracking_uri=mlflow_server.tracking_uri,
                                                          experiment="loadable", register_as="loadable"))
    client = MlflowClient(mlflow_server.tracking_uri)
    report_text = (finished_output / "report.json").read_text()
    assert client.get_run(run_id).info.run_name == default_run_name(json.loads(report_text), _digest(report_text))
    [model] = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert {m.key for m in model.metrics} >= {"perplexity_before", "perplexity_after", "retention"}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)  # models:/ resolves through it
    prompt = "To be, or not to be"
    served = mlflow.pyfunc.load_model("models:/loadable/1")
    [generated] = served.predict([prompt], params={"max_new_tokens": 6})

    tokenizer = AutoTokenizer.from_pretrained(finished_output / "model")
    direct = AutoModelForCausalLM.from_pretrained(finished_output / "model")
    inputs = tokenizer(prompt, return_tensors="pt")
    greedy = direct.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = greedy[0, inputs["input_ids"].shape[1]:]
    assert generated == prompt + tokenizer.decode(new_tokens, skip_special_tokens=True)

    pipeline = mlflow.transformers.load_model("models:/loadable/1")
    assert pipeline.task == "text-generation" and pipeline.model.config.num_hidden_layers == 12
    with torch.no_grad():
        assert torch.equal(pipeline.model(**inputs).logits, direct(**inputs).logits)


def test_default_run_names_tell_compressions_apart():
    report = {"source_model": "org/Llama-3-8B", "method": "lstsq", "blocks": [[20, 28]], "config": {"alpha": 0.0}}
    ridge = {**report, "config": {"alpha": 2.0}}
    assert default_run_name(report, "0123456789") == "Llama-3-8B-lstsq-drop20-28-alpha0-012345"
    assert default_run_name(ridge, "0123456789") != default_run_name(report, "0123456789")
    assert default_run_name(report, "abcdef0123") != default_run_name(report, "0123456789")  # a rerun
    cosine = {**report, "method": "cosine", "blocks": [[4, 8], [20, 24]]}
    assert default_run_name(cosine, "0123456789") == "Llama-3-8B-cosine-drop4-8+20-24-012345"


def test_unreachable_server_keeps_outputs_and_relog_works(tmp_path, mlflow_server, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    output = tmp_path / "out"
    assert cli.main(quickstart_args(output, f"mlflow.tracking_uri={dead}")) == cli.TRACKING_FAILED
    error = capsys.readouterr().err
    assert "tracking failed" in error and f"replaceme log {output}" in error
    assert (output / "report.json").exists() and (output / "model" / "config.json").exists()

    experiment = "relogged-after-outage"
    assert MlflowClient(mlflow_server.tracking_uri).get_experiment_by_name(experiment) is None
    assert cli.main(["log", str(output), "--set", f"mlflow.tracking_uri={mlflow_server.tracking_uri}",
                     "--set", f"mlflow.experiment={experiment}"]) == 0
    client = MlflowClient(mlflow_server.tracking_uri)
    created = client.get_experiment_by_name(experiment)  # a missing experiment is created
    [run] = client.search_runs([created.experiment_id])
    assert run.data.params["mlflow.tracking_uri"] == dead and run.data.params["token"] == "***"


def test_password_in_tracking_uri_is_never_shown_or_recorded(tmp_path, mlflow_server, capsys):
    with_password = mlflow_server.tracking_uri.replace("http://", "http://alice:pa55word-secret@")
    assert cli.main(quickstart_args(tmp_path / "out", f"mlflow.tracking_uri={with_password}",
                                    "mlflow.experiment=redaction", "save_transform_only=true")) == 0
    printed = capsys.readouterr()
    assert "alice:***@127.0.0.1" in printed.out and "pa55word" not in printed.out + printed.err

    client = MlflowClient(mlflow_server.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("redaction").experiment_id])
    logged = everything_logged(client, run.info.run_id)
    assert run.data.params["mlflow.tracking_uri"] == "http://alice:***@127.0.0.1:" + with_password.rsplit(":", 1)[1]
    assert "pa55word" not in logged and SECRET not in logged
    report = client.download_artifacts(run.info.run_id, "report.json", str(tmp_path))
    assert "pa55word" not in Path(report).read_text()


def test_compare_lists_runs_and_plots(finished_output, mlflow_server, tmp_path, capsys):
    server = mlflow_server.tracking_uri
    log_output(str(finished_output), config_for(finished_output, tracking_uri=server, experiment="compare",
                                                run_name="alpha-0"))
    assert cli.main(quickstart_args(tmp_path / "ridge", "alpha=2.0", f"mlflow.tracking_uri={server}",
                                    "mlflow.experiment=compare", "mlflow.run_name=alpha-2")) == 0
    capsys.readouterr()

    plot = tmp_path / "runs.png"
    assert cli.main(["compare", "--experiment", "compare", "--tracking-uri", mlflow_server.tracking_uri,
                     "--metric", "solver/relative_residual", "--sort", "solver/relative_residual",
                     "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "method", "alpha", "blocks"]
    assert lines[0].split()[-2:] == ["solver/relative_residual", "solver/relative_residual_dropping"]  # the baseline
    # alpha 0 is the least-squares optimum of the calibration residual: it sorts first
    assert [line.split()[0] for line in lines[1:3]] == ["alpha-0", "alpha-2"] and lines[3].startswith("plot")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["compare", "--experiment", "missing", "--tracking-uri", mlflow_server.tracking_uri]) == 2
    assert "no experiment 'missing'" in capsys.readouterr().err


def test_register_in_a_store_other_than_the_environments(finished_output, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default store would land here
    store = f"sqlite:///{tmp_path}/elsewhere.db"
    log_output(str(finished_output), config_for(finished_output, tracking_uri=store, register_as="elsewhere"))
    client = MlflowClient(store, registry_uri=store)
    [version] = client.search_model_versions("name = 'elsewhere'")
    [model] = client.search_logged_models([client.get_experiment_by_name("replaceme").experiment_id])
    assert version.source == model.artifact_location and version.run_id == model.source_run_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.db", "mlruns"]


def test_register_by_reference_keeps_the_model_where_it_is(finished_output, tmp_path):
    """log_model: false (reference, for checkpoints too large to copy): the version points at output/model."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    log_output(str(finished_output), config_for(finished_output, tracking_uri=store, log_model="false",
                                                register_as="by-reference"))
    client = MlflowClient(store, registry_uri=store)
    [version] = client.search_model_versions("name = 'by-reference'")
    assert version.source == (finished_output / "model").as_uri()
    [run] = client.search_runs([client.get_experiment_by_name("replaceme").experiment_id])
    assert client.search_logged_models([run.info.experiment_id]) == []


@pytest.mark.parametrize(("log_model", "imported"), [("auto", True), ("reference", False)])
def test_the_tracking_child_imports_the_transformers_flavour_while_the_run_computes(tmp_path, log_model, imported):
    """Writing the model with MLflow's transformers flavour first imports seconds' worth of modules:
    the tracking child does that after opening the store, not after the run (a fresh interpreter,
    as the child is one)."""
    config = config_for(tmp_path / "out", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_model=log_model)
    script = ("import json, sys\nfrom replaceme.config import validate_config\nfrom replaceme.tracking import Tracker\n"
              "tracker = Tracker(validate_config(json.loads(sys.stdin.read())))\ntracker.open()\n"
              "before = 'mlflow.transformers' in sys.modules\ntracker.prepare_model_logging()\n"
              "print(json.dumps([before, 'mlflow.transformers' in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps(config.model_dump(mode="json")),
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [False, imported]
