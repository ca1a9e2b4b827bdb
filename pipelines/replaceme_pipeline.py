"""The ReplaceMe Kubeflow pipeline (kfp v2): profile → calibrate → solve → merge → evaluate → register.

Each component calls one ``ops`` step on ``<output_uri>/config.yaml``, which the first component
writes from the parameters. ``engine="rayjob"`` runs profile, calibrate and merge as KubeRay RayJobs
instead of inside the component's pod.

    python -m pipelines.replaceme_pipeline --compile   # rewrites pipelines/replaceme_pipeline.yaml
"""

import argparse
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl

from cluster.manifests import IMAGE

COMPILED = Path(__file__).with_name("replaceme_pipeline.yaml")

# The image has replaceme (with ops, pipelines, kfp, kubernetes) installed: nothing to pip install.
component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
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


@component
def run_step(step: str, config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str) -> str:
    """Run `python -m ops.<step>` in this container; returns the config URI for the next step."""
    from pipelines.steps import run_in_container

    return run_in_container(step, config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                            s3_endpoint_url=s3_endpoint_url)


@component
def run_step_as_rayjob(step: str, config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str,
                       namespace: str, timeout_s: int) -> str:
    """Run `python -m ops.<step>` as a KubeRay RayJob and wait for it; returns the config URI."""
    from pipelines.steps import run_as_rayjob

    return run_as_rayjob(step, config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                         s3_endpoint_url=s3_endpoint_url, namespace=namespace, timeout_s=timeout_s)


def _named(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    # State lives at output_uri and the steps skip what their markers say is done, so KFP's
    # cache (keyed on parameters only) would be wrong after outputs are deleted or changed.
    return task.set_display_name(name).set_caching_options(False)


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
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    resolved = _named(resolve_config(
        config_uri=config_uri, model_uri=model_uri, data_uri=data_uri, eval_uri=eval_uri, output_uri=output_uri,
        blocks=blocks, layers_to_skip=layers_to_skip, num_blocks=num_blocks, method=method, alpha=alpha,
        mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment, register_as=register_as,
        engine=engine, s3_endpoint_url=s3_endpoint_url, pipeline_run_id=run_id), "resolve-config")
    common = dict(output_uri=resolved.outputs["output_uri"], pipeline_run_id=run_id, s3_endpoint_url=s3_endpoint_url)

    def step(name: str, config) -> dsl.PipelineTask:
        return _named(run_step(step=name, config_uri=config, **common), name)

    def heavy_step(name: str, config):
        """In the component's pod, or as a RayJob; the next step takes whichever ran."""
        with dsl.If(engine == "rayjob", name=f"{name}-on-rayjob"):
            on_ray = _named(run_step_as_rayjob(step=name, config_uri=config, namespace=rayjob_namespace,
                                               timeout_s=rayjob_timeout_s, **common), f"{name} (RayJob)")
        with dsl.Else(name=f"{name}-in-container"):
            in_pod = step(name, config)
        return dsl.OneOf(on_ray.output, in_pod.output)

    profiled = heavy_step("profile", resolved.outputs["config_uri"])  # runs every layer: heavy on big models
    calibrated = heavy_step("calibrate", profiled)
    solved = step("solve", calibrated)
    merged = heavy_step("merge", solved.output)
    evaluated = step("evaluate", merged)
    step("register", evaluated.output)


def compile_pipeline(path: str | Path = COMPILED) -> Path:
    compiler.Compiler().compile(replaceme_pipeline, str(path))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.replaceme_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="write the compiled pipeline YAML")
    parser.add_argument("--output", default=str(COMPILED), metavar="PATH", help="where (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.compile:
        parser.print_help()
        return 1
    print(f"compiled to {compile_pipeline(args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
