"""What the pipeline's components do, importable (the component bodies only call these).

``resolve_config`` turns the pipeline parameters into one validated config, written next to the
outputs (``<output>/config.yaml``) so that every step, in a pod or in a RayJob, reads the same
file. The steps then run from that URI, in the component's container or as a RayJob.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from ops.common import current_marker, load_step_config, output_dir
from replaceme.config import read_yaml, validate_config
from replaceme.errors import ReplaceMeError
from replaceme.outputs import OWNER_FILE, OutputDir

ENGINES = ("in_container", "rayjob")
HEAVY_STEPS = ("profile", "calibrate", "merge")  # run as RayJobs with engine: rayjob
RUN_ID_FIELD = "{run_id}"  # in output_uri: replaced by the pipeline run id (one folder per scheduled run)


def resolve_config(*, config_uri: str, model_uri: str, data_uri: str, eval_uri: str, output_uri: str, blocks: str,
                   layers_to_skip: int, num_blocks: int, method: str, alpha: float, mlflow_tracking_uri: str,
                   mlflow_experiment: str, register_as: str, engine: str, s3_endpoint_url: str,
                   pipeline_run_id: str) -> tuple[str, str]:
    """Write ``<output>/config.yaml`` (the base config with the parameters applied); returns its
    URI and the output URI. Parameters given win over the base config; empty strings keep it."""
    if engine not in ENGINES:
        raise ReplaceMeError(f"engine: {engine!r} must be one of {', '.join(ENGINES)}")
    if not output_uri.strip():
        raise ReplaceMeError("output_uri: required; give the output folder, e.g. s3://bucket/replaceme/{run_id}")
    use_endpoint(s3_endpoint_url)
    output = output_uri.replace(RUN_ID_FIELD, pipeline_run_id).rstrip("/")
    data = read_yaml(config_uri) if config_uri else {}
    data.pop("token", None)  # secrets stay in the environment (HF_TOKEN, AWS_*), not next to the outputs
    given = {"model_path": model_uri, "dataset": data_uri, "output_dir": output, "method": method,
             "alpha": alpha, "layers_to_skip": layers_to_skip, "num_A": num_blocks}
    data.update({key: value for key, value in given.items() if value != ""})
    data["blocks"] = _parse_blocks(blocks)
    if eval_uri:
        data["eval"] = {**data["eval"], "dataset": eval_uri} if isinstance(data.get("eval"), dict) else eval_uri
    _set_nested(data, "mlflow", tracking_uri=mlflow_tracking_uri, experiment=mlflow_experiment, register_as=register_as)
    _set_nested(data, "storage", endpoint_url=s3_endpoint_url)
    config = validate_config(data)  # every mistake reported here, before any work
    out = OutputDir(output, config.storage_options(output))
    if not out.exists(OWNER_FILE):  # the steps write into this folder: it is replaceme's
        out.mark_owned(pipeline_run_id or "pipeline")
    out.write_text("config.yaml", yaml.safe_dump(data, sort_keys=False))
    return f"{out.uri}/config.yaml", out.uri


def _parse_blocks(text: str) -> list[list[int]] | None:
    if not text.strip():
        return None  # select by distance
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ReplaceMeError(f"blocks: {text!r} is not JSON; give e.g. [[9, 13]] or leave it empty") from None


def _set_nested(data: dict[str, Any], key: str, **values: str) -> None:
    given = {name: value for name, value in values.items() if value}
    if given:
        data[key] = {**(data.get(key) or {}), **given}


def use_endpoint(s3_endpoint_url: str) -> None:
    """Point s3fs at an S3-compatible server (e.g. the MinIO of a Kubeflow install)."""
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url


def run_in_container(step: str, *, config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str) -> str:
    """Run ``ops.<step>`` in this process; returns the config URI for the next step."""
    import importlib

    use_endpoint(s3_endpoint_url)
    module = importlib.import_module(f"ops.{step}")
    module.STEP.run(config_uri, output=output_uri, pipeline_run_id=pipeline_run_id)
    return config_uri


def run_as_rayjob(step: str, *, config_uri: str, output_uri: str, pipeline_run_id: str, s3_endpoint_url: str,
                  namespace: str, timeout_s: int, api: Any = None) -> str:
    """Run ``ops.<step>`` as a RayJob and check that it left a current completion marker."""
    from pipelines.rayjob import run_step_as_rayjob

    use_endpoint(s3_endpoint_url)
    run_step_as_rayjob(step, config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id,
                       namespace=namespace or None, timeout_s=timeout_s, api=api)
    config = load_step_config(config_uri, output=output_uri)
    if current_marker(step, config, output_dir(config)) is None:
        raise ReplaceMeError(f"{step}: the RayJob succeeded but {output_uri}/steps/{step}.json is missing or stale; "
                             "see the RayJob's logs")
    return config_uri


# --- what the KFP UI shows: typed outputs filled from the output folder ---------------------------
# The artifacts are kfp.dsl objects (HTML, Model, Metrics) handed in by the component bodies; only
# their path / uri / metadata / log_metric are used here, so this module does not import kfp.

EVALUATION_METRICS = ("perplexity_before", "perplexity_after", "retention", "removed_fraction", "removed_layers")


def write_distances_page(config_uri: str, output_uri: str, page: Any) -> None:
    """Write the profile's distance plot (distances.png, embedded) and table (distances.csv) as one
    HTML page at ``page.path``; with the blocks given in the config, a page saying so."""
    import base64
    import csv
    import html
    import io

    out = output_dir(load_step_config(config_uri, output=output_uri))
    blocks = json.loads(out.read_text("blocks.json")) if out.exists("blocks.json") else None
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>replaceme: block distances</title>",
             "<style>body{font-family:sans-serif} table{border-collapse:collapse} "
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
             "<h2>Block distances</h2>", f"<p>Blocks removed: {html.escape(json.dumps(blocks))}</p>"]
    if out.exists("distances.png"):
        image = base64.b64encode(out.read_bytes("distances.png")).decode()
        parts.append(f"<img alt='distances' style='max-width:100%' src='data:image/png;base64,{image}'>")
    if out.exists("distances.csv"):
        rows = list(csv.reader(io.StringIO(out.read_text("distances.csv"))))
        header, body = rows[0], rows[1:]
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in body]
        parts.append("</table>")
    else:
        parts.append("<p>No distance profile: the config names the blocks to remove.</p>")
    parts.append("</body></html>")
    with open(page.path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    page.metadata["blocks"] = blocks


def describe_model(config_uri: str, output_uri: str, model: Any) -> None:
    """Point the Model artifact at ``<output>/model`` (the pruned checkpoint; nothing is copied)
    and record the removed blocks and the source model as its metadata."""
    config = load_step_config(config_uri, output=output_uri)
    out = output_dir(config)
    model.uri = f"{out.uri}/model"
    model.metadata.update({"blocks": json.loads(out.read_text("blocks.json")), "source_model": config.model_path,
                           "method": config.method, "alpha": config.alpha, "framework": "transformers"})


def log_evaluation(config_uri: str, output_uri: str, metrics: Any) -> dict[str, float]:
    """Log the report's perplexities, retention and removed fraction to a kfp Metrics artifact."""
    out = output_dir(load_step_config(config_uri, output=output_uri))
    report = json.loads(out.read_text("report.json"))
    logged = {key: float(report[key]) for key in EVALUATION_METRICS if report.get(key) is not None}
    for key, value in logged.items():
        metrics.log_metric(key, value)
    return logged
