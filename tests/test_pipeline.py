"""The Kubeflow pipeline: its compiled YAML is current, it runs end to end on kfp's local runner,
its parameters become one config, and its RayJob path (manifest, create, wait) works against a
stand-in for the Kubernetes API (no cluster here)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from cluster.manifests import IMAGE, RAYJOB_NAME_MAX, iter_containers, render_rayjob
from conftest import BUNDLED_MODEL, CALIB, EVAL, write_config
from ops import STEPS
from ops.common import load_step_config
from ops.profile import profile
from pipelines.rayjob import rayjob_for_step, run_step_as_rayjob, wait_for_rayjob
from pipelines.replaceme_pipeline import COMPILED, DEFAULT_RESOURCES, compile_pipeline, main, replaceme_pipeline
from pipelines.steps import HEAVY_STEPS, resolve_config, run_as_rayjob, write_distances_page
from replaceme.errors import ReplaceMeError
from replaceme.lineage import PIPELINE_RUN_ENV


@pytest.fixture(autouse=True)
def no_leaked_run_id(monkeypatch):
    monkeypatch.delenv(PIPELINE_RUN_ENV, raising=False)


# --- the compiled pipeline ---------------------------------------------------------------------


def _spec(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    spec.pop("sdkVersion", None)  # the kfp version that compiled it, not the pipeline
    return spec


def test_the_checked_in_yaml_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    assert _spec(fresh) == _spec(COMPILED), \
        "pipelines/replaceme_pipeline.yaml is stale: run `python -m pipelines.replaceme_pipeline --compile`"


def test_heavy_steps_switch_between_the_pod_and_a_rayjob():
    spec = _spec(COMPILED)
    components = spec["components"]
    chosen = {}
    for name, component in components.items():
        if not name.startswith("comp-condition-branches"):
            continue
        for branch in component["dag"]["tasks"].values():
            (task,) = components[branch["componentRef"]["name"]]["dag"]["tasks"].values()
            used = re.sub(r"-\d+$", "", task["componentRef"]["name"])
            step = task["inputs"]["parameters"].get("step", {}).get("runtimeValue", {}).get("constant")
            step = step or used.removeprefix("comp-").removesuffix("-as-rayjob")  # profile and merge: their own
            on_ray = branch["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--engine'] == 'rayjob'"
            chosen[(step, on_ray)] = used
    own = {"calibrate": "comp-run-step", "profile": "comp-profile", "merge": "comp-merge"}
    assert chosen == {(step, on_ray): own[step] + ("-as-rayjob" if on_ray else "")
                      for step in HEAVY_STEPS for on_ray in (True, False)}
    executors = spec["deploymentSpec"]["executors"].values()
    assert {e["container"]["image"] for e in executors} == {IMAGE}
    assert all(not task.get("cachingOptions", {}).get("enableCache") for task in spec["root"]["dag"]["tasks"].values())


def _artifact_types(definitions: dict) -> dict[str, str]:
    return {name: a["artifactType"]["schemaTitle"] for name, a in definitions.get("artifacts", {}).items()}


def test_the_steps_declare_what_the_kfp_ui_shows():
    spec = _spec(COMPILED)
    outputs = {name: _artifact_types(c.get("outputDefinitions", {})) for name, c in spec["components"].items()
               if "executorLabel" in c}
    assert outputs["comp-profile"] == outputs["comp-profile-as-rayjob"] == {"distances": "system.HTML"}
    assert outputs["comp-merge"] == outputs["comp-merge-as-rayjob"] == {"model": "system.Model"}
    assert outputs["comp-evaluate"] == {"metrics": "system.Metrics"}
    assert _artifact_types(spec["root"]["outputDefinitions"]) == {"Output": "system.Metrics"}  # the run's evaluation


def _tasks_by_name(spec: dict) -> dict[str, tuple[dict, dict]]:
    """Every task of the pipeline (in branches too) by display name: (the task, its executor's container)."""
    components, executors = spec["components"], spec["deploymentSpec"]["executors"]
    dags = [spec["root"]["dag"], *(c["dag"] for c in components.values() if "dag" in c)]
    found = {}
    for dag in dags:
        for task in dag["tasks"].values():
            component = components[task["componentRef"]["name"]]
            if "executorLabel" in component:
                found[task["taskInfo"]["name"]] = (task, executors[component["executorLabel"]]["container"])
    return found


def test_each_task_requests_its_resources_and_retries():
    tasks = _tasks_by_name(_spec(COMPILED))
    assert set(tasks) == {"resolve-config", "solve", "evaluate", "register",
                          *(f"{step}{suffix}" for step in HEAVY_STEPS for suffix in ("", " (RayJob)"))}
    for name, (task, container) in tasks.items():
        wanted = DEFAULT_RESOURCES["rayjob" if name.endswith("(RayJob)") else name]
        resources = container["resources"]
        assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"]) == (wanted.cpu, wanted.cpu), name
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == wanted.memory, name
        accelerator = resources.get("accelerator", {})
        assert (accelerator.get("resourceType", ""), int(accelerator.get("resourceCount", 0))) == \
            (wanted.accelerator if wanted.gpus else "", wanted.gpus), name
        assert task["retryPolicy"] == {"maxRetryCount": wanted.retries, "backoffDuration": "60s",
                                       "backoffFactor": 2.0, "backoffMaxDuration": "3600s"}, name
    # the model runs in profile, calibrate and evaluate: a GPU each; a pod that waits for a RayJob needs none
    assert {name for name, (_, c) in tasks.items() if "accelerator" in c["resources"]} == \
        {"profile", "calibrate", "evaluate"}


def test_the_image_and_the_resources_are_chosen_at_compile_time(tmp_path, capsys):
    image = "registry.example.com/team/replaceme:test"
    path = tmp_path / "pipeline.yaml"
    assert main(["--image", image, "--output", str(path), "--gpus", "0", "--memory", "20Gi", "--retries", "0"]) == 0
    assert capsys.readouterr().out == f"compiled to {path}\n"
    spec = _spec(path)
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {image}
    assert IMAGE not in path.read_text()
    tasks = _tasks_by_name(spec)
    assert all("accelerator" not in c["resources"] and "retryPolicy" not in t for t, c in tasks.values())
    assert tasks["evaluate"][1]["resources"]["resourceMemoryLimit"] == "20Gi"
    assert tasks["solve"][1]["resources"]["resourceMemoryLimit"] == DEFAULT_RESOURCES["solve"].memory
    assert IMAGE in COMPILED.read_text() and image not in COMPILED.read_text()  # the checked-in YAML: the default


def test_the_distances_page_embeds_the_plot_and_the_table(tmp_path, tiny_llama):
    config = str(write_config(tmp_path / "job.yaml", model_path=str(tiny_llama), dataset=str(CALIB), max_length=32,
                              dataset_size=8, layers_to_skip=2, output_dir=str(tmp_path / "out")))
    profile(config)
    page = Artifact(path=str(tmp_path / "distances.html"))
    write_distances_page(config, str(tmp_path / "out"), page)
    text = Path(page.path).read_text()
    assert "data:image/png;base64," in text
    rows = (tmp_path / "out" / "distances.csv").read_text().splitlines()
    assert text.count("<tr>") == len(rows) and page.metadata["blocks"] == json.loads(
        (tmp_path / "out" / "blocks.json").read_text())


def test_with_the_blocks_given_the_page_says_no_profile_was_measured(tmp_path, tiny_llama):
    config = str(write_config(tmp_path / "job.yaml", model_path=str(tiny_llama), dataset=str(CALIB), max_length=32,
                              dataset_size=8, blocks=[[2, 4]], output_dir=str(tmp_path / "out")))
    profile(config)
    page = Artifact(path=str(tmp_path / "distances.html"))
    write_distances_page(config, str(tmp_path / "out"), page)
    text = Path(page.path).read_text()
    assert "No distance profile: the config names the blocks to remove." in text and "<img" not in text
    assert page.metadata["blocks"] == [[2, 4]]


class Artifact:
    """What a kfp output artifact offers the steps: a local path, a URI, metadata, log_metric."""

    def __init__(self, path: str = "", uri: str = "") -> None:
        self.path, self.uri, self.metadata = path, uri, {}

    def log_metric(self, name: str, value: float) -> None:
        self.metadata[name] = value


# --- the whole pipeline on kfp's local runner ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*have no effect in the current local runner", "ignore:.*non-Python base image")
def test_the_pipeline_runs_locally_end_to_end(tmp_path, monkeypatch):
    import kfp.local
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # the steps run here; MLflow's default artifact root is ./mlruns
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    base = write_config(tmp_path / "base.yaml", batch_size=16, max_length=64, dataset_size=48,
                        eval={"dataset": "set-by-the-pipeline", "dataset_size": 16})
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    run = replaceme_pipeline(output_uri=str(tmp_path / "runs" / "{run_id}"), model_uri=str(BUNDLED_MODEL),
                       data_uri=str(CALIB), eval_uri=str(EVAL), config_uri=str(base), mlflow_tracking_uri=tracking,
                       mlflow_experiment="pipeline-test", register_as="shakespeare-pruned", engine="in_container")

    (out,) = (tmp_path / "runs").iterdir()  # {run_id} became the pipeline run's id
    markers = {step: json.loads((out / "steps" / f"{step}.json").read_text()) for step in STEPS}
    assert {m["pipeline_run_id"] for m in markers.values()} == {out.name}
    report = json.loads((out / "report.json").read_text())
    assert report["perplexity_after"] > report["perplexity_before"] > 1 and report["removed_fraction"] == 0.25
    assert report["lineage"]["pipeline_run_id"] == out.name
    assert json.loads((out / "blocks.json").read_text()) == report["blocks"]
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.num_hidden_layers == 12
    mlflow_run = MlflowClient(tracking).get_run(markers["register"]["mlflow_run_id"])
    assert mlflow_run.data.tags["pipeline_run_id"] == out.name
    assert mlflow_run.data.metrics["perplexity_after"] == pytest.approx(report["perplexity_after"])
    [version] = MlflowClient(tracking, registry_uri=tracking).search_model_versions("name = 'shakespeare-pruned'")
    assert version.run_id == mlflow_run.info.run_id
    # what the KFP UI shows: evaluate's Metrics, merge's Model (the output's model/, not a copy), profile's page
    metrics = run.output  # the pipeline's output: evaluate's Metrics
    (root,) = (tmp_path / "root").iterdir()  # the local runner's folder for this run: a folder per task
    (model,) = json.loads((root / "merge" / "executor_output.json").read_text())["artifacts"]["model"]["artifacts"]
    assert metrics.metadata == pytest.approx({key: report[key] for key in (
        "perplexity_before", "perplexity_after", "retention", "removed_fraction", "removed_layers")})
    assert model["uri"] == str(out / "model")
    assert model["metadata"]["blocks"] == report["blocks"] and model["metadata"]["source_model"] == str(BUNDLED_MODEL)
    assert "data:image/png;base64," in (root / "profile" / "distances").read_text()


# --- parameters to config -----------------------------------------------------------------------

PARAMETERS = dict(data_uri="", eval_uri=str(EVAL), blocks="[[9, 13]]", layers_to_skip=4, num_blocks=1, method="lstsq",
                  alpha=0.1, mlflow_tracking_uri="", mlflow_experiment="exp", register_as="", engine="rayjob",
                  s3_endpoint_url="", pipeline_run_id="run-7")


def test_parameters_override_the_base_config_in_one_file_next_to_the_outputs(tmp_path):
    base = write_config(tmp_path / "base.yaml", model_path="elsewhere", dataset=str(CALIB), alpha=0.5, max_length=64,
                        token="hf_SECRET_VALUE", eval={"dataset": "x", "dataset_size": 8}, mlflow={"run_name": "nightly"})
    config_uri, output = resolve_config(config_uri=str(base), model_uri=str(BUNDLED_MODEL),
                                        output_uri=str(tmp_path / "runs" / "{run_id}"), **PARAMETERS)
    assert output == f"{tmp_path}/runs/run-7" and config_uri == f"{output}/config.yaml"
    config = load_step_config(config_uri)
    assert (config.model_path, config.dataset, config.alpha, config.max_length) == (str(BUNDLED_MODEL), str(CALIB), 0.1, 64)
    assert config.blocks == [(9, 13)] and (config.eval.dataset, config.eval.dataset_size) == (str(EVAL), 8)
    assert (config.mlflow.experiment, config.mlflow.run_name, config.output_dir) == ("exp", "nightly", output)
    assert "SECRET" not in Path(output, "config.yaml").read_text()


@pytest.mark.parametrize("change, message", [
    ({"engine": "spark"}, "engine: 'spark' must be one of in_container, rayjob"),
    ({"blocks": "9-13"}, "blocks: '9-13' is not JSON; give e.g. [[9, 13]] or leave it empty"),
    ({"method": "svd"}, "'method'"),
    ({"output_uri": " "}, "output_uri: required"),
])
def test_bad_parameters_stop_the_pipeline_before_any_work(tmp_path, change, message):
    parameters = {**PARAMETERS, "config_uri": "", "model_uri": str(BUNDLED_MODEL), "data_uri": str(CALIB),
                  "output_uri": str(tmp_path / "out"), **change}
    with pytest.raises(ReplaceMeError, match=re.escape(message)):
        resolve_config(**parameters)
    assert not (tmp_path / "out").exists()


# --- the RayJob path, against a stand-in for the Kubernetes API ---------------------------------


class FakeCustomObjects:
    """Stands in for kubernetes.client.CustomObjectsApi: keeps what was created and answers with
    the given statuses in turn (the last one repeats)."""

    def __init__(self, *statuses: dict, exists: bool = False) -> None:
        self.statuses, self.exists, self.created, self.reads = list(statuses), exists, [], 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(((group, version, namespace, plural), body))
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if not self.statuses:
            raise ApiException(status=404, reason="NotFound")
        self.reads += 1
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"metadata": {"name": name, "namespace": namespace}, "status": status}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}


def test_the_rayjob_runs_the_ops_step_from_the_cluster_manifest():
    job = rayjob_for_step("calibrate", config_uri="s3://bucket/run/config.yaml", output_uri="s3://bucket/run",
                          pipeline_run_id="run-7", namespace="ml")
    assert shlex.split(job["spec"]["entrypoint"]) == [
        "python", "-m", "ops.calibrate", "--config", "s3://bucket/run/config.yaml", "--output",
        "s3://bucket/run", "--set", "engine.backend=ray", "--set", "engine.address=auto", "--pipeline-run-id", "run-7"]
    name = job["metadata"]["name"]
    assert re.fullmatch(r"replaceme-calibrate-[0-9a-f]{10}", name) and len(name) <= RAYJOB_NAME_MAX
    assert job == render_rayjob(name=name, entrypoint=job["spec"]["entrypoint"], namespace="ml")
    assert {c["image"] for c in iter_containers(job)} == {IMAGE}
    same = rayjob_for_step("calibrate", config_uri="s3://bucket/run/config.yaml", output_uri="s3://bucket/run",
                           pipeline_run_id="run-7")
    merge = rayjob_for_step("merge", config_uri="s3://bucket/run/config.yaml", output_uri="s3://bucket/run",
                            pipeline_run_id="run-7")
    assert same["metadata"]["name"] == name != merge["metadata"]["name"]  # a retry finds its own RayJob


def test_waiting_ends_when_the_rayjob_completes():
    api, clock = FakeCustomObjects({}, {"jobDeploymentStatus": "Initializing"}, RUNNING, SUCCEEDED), FakeClock()
    status = wait_for_rayjob(api, "job", "ml", timeout_s=600, poll_s=10, clock=clock, sleep=clock.sleep)
    assert status == SUCCEEDED and api.reads == 4 and clock.now == 30


@pytest.mark.parametrize("status", [
    {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": "ImportError in the driver"},
    {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "message": "ImportError in the driver"},
])
def test_a_failed_rayjob_fails_the_step_with_its_message(status):
    api, clock = FakeCustomObjects(RUNNING, status), FakeClock()
    expected = r"RayJob ml/job failed: .*ImportError in the driver; see `kubectl describe rayjob job -n ml`"
    with pytest.raises(ReplaceMeError, match=expected):
        wait_for_rayjob(api, "job", "ml", timeout_s=600, poll_s=10, clock=clock, sleep=clock.sleep)


def test_a_rayjob_that_does_not_end_in_time_fails_the_step():
    api, clock = FakeCustomObjects(RUNNING), FakeClock()
    with pytest.raises(ReplaceMeError, match=r"RayJob ml/job did not finish within 60 s \(jobDeploymentStatus Running, "
                                             r"jobStatus RUNNING\); it is left running: `kubectl delete rayjob job -n ml`"):
        wait_for_rayjob(api, "job", "ml", timeout_s=60, poll_s=15, clock=clock, sleep=clock.sleep)
    assert api.reads == 5 and clock.now == 60


def test_a_rayjob_deleted_while_waiting_fails_the_step():
    with pytest.raises(ReplaceMeError, match="RayJob ml/job disappeared"):
        wait_for_rayjob(FakeCustomObjects(), "job", "ml", timeout_s=60)


def test_the_step_creates_its_rayjob_once_and_a_retry_waits_for_the_same_one():
    api = FakeCustomObjects(SUCCEEDED)
    args = dict(config_uri="s3://bucket/run/config.yaml", output_uri="s3://bucket/run", pipeline_run_id="run-7",
                namespace="ml")
    assert run_step_as_rayjob("merge", api=api, **args) == SUCCEEDED
    ((where, body),) = api.created
    assert where == ("ray.io", "v1", "ml", "rayjobs") and body == rayjob_for_step("merge", **args)
    retry = FakeCustomObjects(SUCCEEDED, exists=True)
    assert run_step_as_rayjob("merge", api=retry, **args) == SUCCEEDED and retry.reads == 1


def test_a_rayjob_that_succeeded_without_doing_the_step_is_caught(tmp_path, tiny_llama):
    config = str(write_config(tmp_path / "job.yaml", model_path=str(tiny_llama), dataset=str(CALIB), max_length=32,
                              dataset_size=8, blocks=[[2, 4]], output_dir=str(tmp_path / "out")))
    args = dict(config_uri=config, output_uri=str(tmp_path / "out"), pipeline_run_id="run-7", s3_endpoint_url="",
                namespace="ml", timeout_s=60)
    with pytest.raises(ReplaceMeError, match=r"profile: the RayJob succeeded but .*/out/steps/profile.json is missing"):
        run_as_rayjob("profile", api=FakeCustomObjects(SUCCEEDED), **args)
    profile(config)  # what the RayJob's driver would have done
    assert run_as_rayjob("profile", api=FakeCustomObjects(SUCCEEDED), **args) == config
