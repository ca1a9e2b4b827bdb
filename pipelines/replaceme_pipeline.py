"""The ReplaceMe Kubeflow pipeline (kfp v2): profile → calibrate → solve → merge → evaluate → register.

Each component calls one ``ops`` step on ``<output_uri>/config.yaml``, which the first component
writes from the parameters. ``engine="rayjob"`` runs profile, calibrate and merge as KubeRay RayJobs
instead of inside the component's pod. The UI shows the profile's distance plot (``HTML``), the
pruned model (``Model``, its URI ``<output>/model``) and the evaluation (``Metrics``).

    python -m pipelines.replaceme_pipeline --compile   # rewrites pipelines/replaceme_pipeline.yaml
    python -m pipelines.replaceme_pipeline --image registry.example.com/replaceme:1.2 --output pipeline.yaml
"""

# No `from __future__ import annotations`: kfp reads the components' annotations as types.
import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kfp import compiler, dsl
from kfp.dsl import HTML, Metrics, Model, Output

from cluster.manifests import IMAGE

COMPILED = Path(__file__).with_name("replaceme_pipeline.yaml")


# --- what each task asks of the cluster ------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """A task's requests (= limits, so a step gets what it asked for), its GPUs and its retries."""

    cpu: str = "1"
    memory: str = "4Gi"
    accelerator: str = ""  # e.g. nvidia.com/gpu; empty: no accelerator
    gpus: int = 0
    retries: int = 2  # a pod lost with its node; the steps' markers make a retry resume, not redo
    backoff: str = "60s"  # first wait before a retry, doubled each time

    def apply(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        task.set_cpu_request(self.cpu).set_cpu_limit(self.cpu)
        task.set_memory_request(self.memory).set_memory_limit(self.memory)
        if self.accelerator and self.gpus:
            task.set_accelerator_type(self.accelerator).set_accelerator_limit(self.gpus)
        if self.retries:
            task.set_retry(num_retries=self.retries, backoff_duration=self.backoff, backoff_factor=2.0,
                           backoff_max_duration="3600s")
        return task


GPU = "nvidia.com/gpu"
HEAVY = Resources(cpu="8", memory="64Gi", accelerator=GPU, gpus=1)  # runs the model on the calibration/eval text
LIGHT = Resources()
# Keys: resolve-config, the ops steps in their pods, and "rayjob" for a pod that only waits for a RayJob.
DEFAULT_RESOURCES: dict[str, Resources] = {
    "resolve-config": LIGHT,
    "profile": HEAVY,
    "calibrate": HEAVY,
    "solve": Resources(cpu="4", memory="16Gi"),  # least squares over the saved statistics (hidden² per block)
    "merge": Resources(cpu="4", memory="32Gi"),  # streams the shards, folding the maps on the CPU
    "evaluate": HEAVY,
    "register": Resources(cpu="2", memory="16Gi"),  # may load the model to log it with MLflow's transformers flavour
    "rayjob": LIGHT,
}
HEAVY_IN_POD = ("profile", "calibrate", "evaluate")  # what --cpu/--memory/--gpus change


# --- components: each calls pipelines.steps, which calls ops --------------------------------------
# Plain functions here, made components by build_pipeline with the image chosen at compile time.


def resolve_config(config_uri: str, model_uri: str, data_uri: str, eval_uri: str, output_uri: str, blocks: str,
                   layers_to_skip: int, num_blocks: int, method: str, alpha: float, mlflow_tracking_uri: str,
                   mlflow_experiment: str, register_as: str, engine: str, s3_endpoint_url: str, pipeline_run_id: str
                   # kfp's documented form for several outputs; mypy only knows the class form
                   ) -> NamedTuple("Resolved", [("config_uri", str), ("output_uri", str)]):  # type: ignore[valid-type]
    """Validate the parameters and write <output_uri>/config.yaml for the steps."""
    from pipelines.steps import resolve_config as resolve

    return resolve(config_uri=config_uri, model_uri=model_uri, data_uri=data_uri, eval_uri=eval_uri,
                   output_uri=output_uri, blocks=blocks, layers_to_skip=layers_to_skip, num_blocks=num_blocks,
                   method=method, alpha=alpha, mlflow_tracking_uri=mlflow_tracking_uri,
                   mlflow_experiment=mlflow_experiment, register_as=register_as, engine=engine,
                   s3_endpoint_url=s3_endpoint_url, pipeline_run_id=pipeline_run_id)


def run_step(step: str, config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str) -> str:
    """Run `python -m ops.<step>` in this container; returns the config URI for the next step."""
    from pipelines.steps import run_in_container

    return run_in_container(step, config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                            s3_endpoint_url=s3_endpoint_url)


def run_step_as_rayjob(step: str, config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str,
                       namespace: str, timeout_s: int) -> str:
    """Run `python -m ops.<step>` as a KubeRay RayJob and wait for it; returns the config URI."""
    from pipelines.steps import run_as_rayjob

    return run_as_rayjob(step, config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                         s3_endpoint_url=s3_endpoint_url, namespace=namespace, timeout_s=timeout_s)


def profile(config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str,
            distances: Output[HTML]) -> str:
    """Run `python -m ops.profile` in this container; the distance plot and table as an HTML page."""
    from pipelines.steps import run_in_container, write_distances_page

    run_in_container("profile", config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                     s3_endpoint_url=s3_endpoint_url)
    write_distances_page(config_uri, output_uri, distances)
    return config_uri


def profile_as_rayjob(config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str, namespace: str,
                      timeout_s: int, distances: Output[HTML]) -> str:
    """Run `python -m ops.profile` as a RayJob; the distance plot and table as an HTML page."""
    from pipelines.steps import run_as_rayjob, write_distances_page

    run_as_rayjob("profile", config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                  s3_endpoint_url=s3_endpoint_url, namespace=namespace, timeout_s=timeout_s)
    write_distances_page(config_uri, output_uri, distances)
    return config_uri


def merge(config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str, model: Output[Model]) -> str:
    """Run `python -m ops.merge` in this container; the pruned model as a Model artifact at <output>/model."""
    from pipelines.steps import describe_model, run_in_container

    run_in_container("merge", config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                     s3_endpoint_url=s3_endpoint_url)
    describe_model(config_uri, output_uri, model)
    return config_uri


def merge_as_rayjob(config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str, namespace: str,
                    timeout_s: int, model: Output[Model]) -> str:
    """Run `python -m ops.merge` as a RayJob; the pruned model as a Model artifact at <output>/model."""
    from pipelines.steps import describe_model, run_as_rayjob

    run_as_rayjob("merge", config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                  s3_endpoint_url=s3_endpoint_url, namespace=namespace, timeout_s=timeout_s)
    describe_model(config_uri, output_uri, model)
    return config_uri


def evaluate(config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str,
             metrics: Output[Metrics]) -> str:
    """Run `python -m ops.evaluate` in this container; perplexities, retention, removed fraction as Metrics."""
    from pipelines.steps import log_evaluation, run_in_container

    run_in_container("evaluate", config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                     s3_endpoint_url=s3_endpoint_url)
    log_evaluation(config_uri, output_uri, metrics)
    return config_uri


def _named(task: dsl.PipelineTask, name: str, resources: Resources) -> dsl.PipelineTask:
    # State lives at output_uri and the steps skip what their markers say is done, so KFP's
    # cache (keyed on parameters only) would be wrong after outputs are deleted or changed.
    return resources.apply(task.set_display_name(name).set_caching_options(False))


# --- the pipeline, for an image and per-task resources -------------------------------------------


def build_pipeline(image: str = IMAGE, resources: Mapping[str, Resources] | None = None) -> Any:
    """The pipeline with every component in ``image`` and the tasks' requests and retries from
    ``resources`` (keys as in DEFAULT_RESOURCES; missing keys keep the defaults)."""
    res = {**DEFAULT_RESOURCES, **(resources or {})}

    def component(func: Callable[..., Any]) -> Any:
        # The image has replaceme (with ops, pipelines, kfp, kubernetes) installed: nothing to pip install.
        return dsl.component(func, base_image=image, install_kfp_package=False)

    resolve_c, step_c, step_ray_c = component(resolve_config), component(run_step), component(run_step_as_rayjob)
    profile_c, profile_ray_c = component(profile), component(profile_as_rayjob)
    merge_c, merge_ray_c, evaluate_c = component(merge), component(merge_as_rayjob), component(evaluate)

    @dsl.pipeline(name="replaceme", description="Training-free depth pruning (ReplaceMe): profile, calibrate, solve, "
                                                "merge, evaluate, register in MLflow")
    def replaceme_pipeline(
        output_uri: str,
        model_uri: str = "",
        data_uri: str = "",
        eval_uri: str = "",
        config_uri: str = "",
        blocks: str = "",
        layers_to_skip: int = 4,
        num_blocks: int = 1,
        method: str = "lstsq",
        alpha: float = 0.0,
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "replaceme",
        register_as: str = "",
        engine: str = "in_container",
        rayjob_namespace: str = "",
        rayjob_timeout_s: int = 8 * 3600,
        s3_endpoint_url: str = "",
    ) -> Metrics:  # the run's evaluation; the model and the distances page are on their tasks
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        resolved = _named(resolve_c(
            config_uri=config_uri, model_uri=model_uri, data_uri=data_uri, eval_uri=eval_uri, output_uri=output_uri,
            blocks=blocks, layers_to_skip=layers_to_skip, num_blocks=num_blocks, method=method, alpha=alpha,
            mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment, register_as=register_as,
            engine=engine, s3_endpoint_url=s3_endpoint_url, pipeline_run_id=run_id), "resolve-config",
            res["resolve-config"])
        common = dict(output_uri=resolved.outputs["output_uri"], pipeline_run_id=run_id, s3_endpoint_url=s3_endpoint_url)
        on_ray = dict(namespace=rayjob_namespace, timeout_s=rayjob_timeout_s)

        def heavy_step(name: str, config: Any, in_pod: Any, as_rayjob: Any, **step: str) -> tuple[Any, Any]:
            """In the component's pod, or as a RayJob (the pod only waits); the next step takes whichever ran."""
            with dsl.If(engine == "rayjob", name=f"{name}-on-rayjob"):
                ray_task = _named(as_rayjob(config_uri=config, **step, **on_ray, **common), f"{name} (RayJob)",
                                  res["rayjob"])
            with dsl.Else(name=f"{name}-in-container"):
                pod_task = _named(in_pod(config_uri=config, **step, **common), name, res[name])
            return ray_task, pod_task

        def one_of(tasks: tuple[Any, Any]) -> Any:
            return dsl.OneOf(*(task.outputs["Output"] for task in tasks))

        profiled = heavy_step("profile", resolved.outputs["config_uri"], profile_c, profile_ray_c)
        calibrated = heavy_step("calibrate", one_of(profiled), step_c, step_ray_c, step="calibrate")
        solved = _named(step_c(step="solve", config_uri=one_of(calibrated), **common), "solve", res["solve"])
        merged = heavy_step("merge", solved.output, merge_c, merge_ray_c)
        evaluated = _named(evaluate_c(config_uri=one_of(merged), **common), "evaluate", res["evaluate"])
        _named(step_c(step="register", config_uri=evaluated.outputs["Output"], **common), "register", res["register"])
        # Only evaluate's Metrics: the model and the page come from one of two branches, and kfp's local
        # runner takes no dsl.OneOf of artifacts as a pipeline output.
        return evaluated.outputs["metrics"]

    return replaceme_pipeline


replaceme_pipeline = build_pipeline()  # the default image and resources: what the checked-in YAML holds


def compile_pipeline(path: str | Path = COMPILED, *, image: str = IMAGE,
                     resources: Mapping[str, Resources] | None = None) -> Path:
    pipeline = replaceme_pipeline if image == IMAGE and not resources else build_pipeline(image, resources)
    compiler.Compiler().compile(pipeline, str(path))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.replaceme_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="write the compiled pipeline YAML (the default action)")
    parser.add_argument("--output", default=str(COMPILED), metavar="PATH", help="where (default: %(default)s)")
    parser.add_argument("--image", default=IMAGE, help="the image every step runs in (default: %(default)s, "
                                                       "built from cluster/Dockerfile)")
    heavy = DEFAULT_RESOURCES["profile"]
    steps = ", ".join(HEAVY_IN_POD)
    parser.add_argument("--cpu", default=heavy.cpu, help=f"CPUs of {steps} in their pods (default: %(default)s)")
    parser.add_argument("--memory", default=heavy.memory, help=f"memory of {steps} (default: %(default)s)")
    parser.add_argument("--gpus", type=int, default=heavy.gpus, help=f"GPUs of {steps}; 0: none (default: %(default)s)")
    parser.add_argument("--accelerator", default=heavy.accelerator,
                        help="the accelerator's resource name (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=heavy.retries,
                        help="retries of every task, after 60 s, 120 s, … (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.gpus < 0 or args.retries < 0:
        parser.error("--gpus and --retries take a count, 0 or more")
    resources = {name: dataclasses.replace(value, retries=args.retries) for name, value in DEFAULT_RESOURCES.items()}
    for name in HEAVY_IN_POD:
        resources[name] = dataclasses.replace(resources[name], cpu=args.cpu, memory=args.memory,
                                              accelerator=args.accelerator, gpus=args.gpus)
    changed = resources != DEFAULT_RESOURCES
    print(f"compiled to {compile_pipeline(args.output, image=args.image, resources=resources if changed else None)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
