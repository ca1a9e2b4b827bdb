"""Distributed runs with the activation store and outputs on a real S3-compatible server, re-solving
from the store without the model, and damaged store contents found through the manifest."""

from __future__ import annotations

import json

import fsspec
import pytest

from conftest import BUNDLED_MODEL, CALIB, EVAL
from replaceme import cli, layerwise, recipe
from replaceme.config import validate_config
from replaceme.errors import ReplaceMeError

pytest.importorskip("ray")


def ray_config(ray_head, **settings) -> dict:
    config = dict(model_path=str(BUNDLED_MODEL), dataset=str(CALIB), dataset_size=32, batch_size=8, max_length=64,
                  blocks=[[4, 8]], eval={"dataset": str(EVAL), "dataset_size": 16},
                  engine={"backend": "ray", "address": ray_head.address, "stages": 2, "batches_per_shard": 1,
                          "merge_workers": 2, "resource_timeout_s": 60})
    config.update(settings)
    return config


def test_cosine_run_with_store_and_outputs_on_s3(ray_head, s3_server, tmp_path):
    s3_server.create_bucket("runs")
    config = validate_config(ray_config(
        ray_head, method="cosine", solver="lbfgs", cosine={"steps": 20}, run_id="s3-run",
        activations={"uri": "s3://runs/activations", "row_group_rows": 100}, output_dir="s3://runs/out",
        storage={"endpoint_url": s3_server.endpoint_url}))
    report = recipe.run(config, progress=False)
    assert report["retention"] > 0.9
    assert report["solver"][0]["cosine_distance"] < report["solver"][0]["cosine_distance_dropping"]
    s3 = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint_url)
    assert s3.exists("runs/out/model/config.json") and s3.exists("runs/out/transforms.safetensors")
    assert not s3.exists("runs/out.incomplete")
    manifest = json.loads(s3.cat_file("runs/activations/s3-run/blocks/4-8/manifest.json"))
    assert manifest["shards"] == [0, 1, 2, 3] and manifest["rows"] == report["solver"][0]["tokens"]

    # recorded in MLflow from the object store: artifacts and the logged model come down from S3
    from mlflow import MlflowClient

    from replaceme.tracking import log_output

    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = log_output("s3://runs/out", config.model_copy(update={"mlflow": config.mlflow.model_copy(
        update={"tracking_uri": store})}))
    client = MlflowClient(store)
    assert {a.path for a in client.list_artifacts(run_id)} == {"report.json", "blocks.json", "transforms.safetensors"}
    [model] = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert {"MLmodel", "model", "components"} <= files  # MLflow's transformers flavour, built from the S3 output


def test_solve_again_from_the_store_without_running_the_model(ray_head, tmp_path, monkeypatch, capsys):
    store = f"file://{tmp_path / 'store'}"
    settings = ray_config(ray_head, activations={"uri": store}, run_id="resolve", output_dir=str(tmp_path / "out"))
    first = recipe.run(validate_config(settings), progress=False)

    def no_model(*args, **kwargs):
        raise AssertionError("re-solving must not load model weights")

    monkeypatch.setattr(layerwise.LayerwiseModel, "load_layer", no_model)
    config_file = tmp_path / "config.json"  # YAML is a superset of JSON
    config_file.write_text(json.dumps({**settings, "alpha": 50.0}))
    assert cli.main(["solve", "--config", str(config_file), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "block [4, 8]" in line and f"{first['solver'][0]['tokens']} tokens" in line
    residual = float(line.split("relative residual ")[1].split()[0])
    assert residual > first["solver"][0]["relative_residual"]  # a strong ridge fits worse: it was re-solved


def test_damaged_rows_part_is_found_through_the_manifest(ray_head, tmp_path):
    store = tmp_path / "store"
    settings = ray_config(ray_head, method="cosine", cosine={"steps": 5}, activations={"uri": f"file://{store}"},
                          run_id="damaged", output_dir=str(tmp_path / "out"))
    recipe.run(validate_config(settings), progress=False)
    part = sorted(store.glob("damaged/blocks/4-8/rows/*.parquet"))[1]
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    part.write_bytes(bytes(raw))
    ctx = recipe.Context(validate_config(settings), progress=False)
    with pytest.raises(ReplaceMeError, match=rf"{part.name}.*checksum"):
        recipe.solve(ctx, recipe.OutputDir(str(tmp_path / "out")))
