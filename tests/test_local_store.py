"""The in-process engine writes the activation store like the Ray stages do: per data shard its
statistics, rows and commit record, each block's manifest last. A local run with ``activations.uri``
can then be re-solved from the store (another alpha, method: cosine) without running the model,
and a rerun with the same run id resumes from the committed shards.

Equality bound: the local engine sums the per-shard float64 partials in shard order, exactly as
``ActivationStore.reduce_stats`` does when re-solving, so every map below is compared with
``torch.equal`` (bit for bit), not to a tolerance."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from conftest import CALIB, write_config
from replaceme import cli, layerwise, recipe
from replaceme.activations import ActivationStore
from replaceme.config import validate_config
from replaceme.engine import LocalEngine
from replaceme.errors import ReplaceMeError
from replaceme.outputs import OutputDir

BLOCK = "2-4"
SHARDS = 3  # 24 texts, 4 per batch, 2 batches per shard


def settings(model, out, **changes) -> dict:
    values = dict(model_path=str(model), dataset=str(CALIB), output_dir=str(out), max_length=32, dataset_size=24,
                  batch_size=4, blocks=[[2, 4]], save_transform_only=True, engine={"batches_per_shard": 2})
    return {**values, **changes}


def run(values: dict) -> dict:
    return recipe.run(validate_config(values), progress=False)


def transform(out) -> torch.Tensor:
    return load_file(out / "transforms.safetensors")[BLOCK]


def no_model(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("re-solving from the store must not run the model")

    monkeypatch.setattr(layerwise.LayerwiseModel, "load_layer", refuse)
    monkeypatch.setattr(LocalEngine, "run_layer", refuse)


def test_local_run_commits_shards_and_manifest_and_gives_the_in_memory_map(tmp_path, tiny_llama):
    report = run(settings(tiny_llama, tmp_path / "stored", activations={"uri": f"file://{tmp_path / 'store'}"},
                          run_id="local"))
    run(settings(tiny_llama, tmp_path / "memory"))
    block = tmp_path / "store" / "local" / "blocks" / BLOCK
    manifest = json.loads((block / "manifest.json").read_text())
    tokens = report["solver"][0]["tokens"]
    assert manifest["shards"] == list(range(SHARDS)) and manifest["tokens"] == manifest["rows"] == tokens
    assert sorted(p.name for p in (block / "shards").iterdir()) == [f"{n:05d}.json" for n in range(SHARDS)]
    assert len(list((block / "stats").iterdir())) == len(list((block / "rows").iterdir())) == SHARDS
    assert torch.equal(transform(tmp_path / "stored"), transform(tmp_path / "memory"))
    store = ActivationStore(f"file://{tmp_path / 'store'}", "local")
    assert store.reduce_stats((2, 4)).tokens == tokens
    assert sum(1 for _ in store.iter_rows((2, 4))) > 0
    assert report["lineage"]["stores"]["activations"] == store.location


def test_resolve_with_another_alpha_from_the_store(tmp_path, tiny_llama, monkeypatch, capsys):
    values = settings(tiny_llama, tmp_path / "out", activations={"uri": f"file://{tmp_path / 'store'}"},
                      run_id="resolve")
    run(values)
    run(settings(tiny_llama, tmp_path / "fresh", alpha=50.0))  # a fresh in-memory run with that alpha
    (tmp_path / "out" / "calibration" / "stats-2-4.safetensors").unlink()  # the store is what is read
    no_model(monkeypatch)
    config = write_config(tmp_path / "job.yaml", **values)
    assert cli.main(["solve", "--config", str(config), "--set", "alpha=50", "--quiet"]) == 0
    assert "block [2, 4]" in capsys.readouterr().out
    assert torch.equal(transform(tmp_path / "out"), transform(tmp_path / "fresh"))


def test_cosine_resolves_from_the_rows_in_the_store(tmp_path, tiny_llama, monkeypatch):
    values = settings(tiny_llama, tmp_path / "out", method="cosine", solver="lbfgs", cosine={"steps": 10},
                      activations={"uri": f"file://{tmp_path / 'store'}", "row_group_rows": 50}, run_id="cosine")
    report = run(values)
    assert report["solver"][0]["cosine_distance"] < report["solver"][0]["cosine_distance_dropping"]
    assert not (tmp_path / "out" / "calibration" / "activations-2-4.safetensors").exists()  # the rows are in the store
    first = transform(tmp_path / "out")
    no_model(monkeypatch)
    ctx = recipe.Context(validate_config(values), progress=False)
    (detail,) = recipe.solve(ctx, OutputDir(str(tmp_path / "out")))
    assert detail["cosine_distance"] == report["solver"][0]["cosine_distance"]
    assert torch.equal(transform(tmp_path / "out"), first)


def batches_run(monkeypatch) -> list[list[int]]:
    """The batch ids each decoder layer runs on from now on."""
    ran: list[list[int]] = []
    original = LocalEngine.run_layer

    def counting(self, index, stream, **kwargs):
        ran.append(list(self.batch_ids))
        return original(self, index, stream, **kwargs)

    monkeypatch.setattr(LocalEngine, "run_layer", counting)
    return ran


def test_rerun_resumes_from_committed_shards(tmp_path, tiny_llama, monkeypatch):
    values = settings(tiny_llama, tmp_path / "first", activations={"uri": f"file://{tmp_path / 'store'}"},
                      run_id="resume")
    run(values)
    ran = batches_run(monkeypatch)
    (tmp_path / "store" / "resume" / "blocks" / BLOCK / "shards" / "00001.json").unlink()  # as if shard 1 died
    run({**values, "output_dir": str(tmp_path / "second")})
    assert ran and all(ids == [2, 3] for ids in ran)  # only shard 1's batches went through the layers
    assert torch.equal(transform(tmp_path / "second"), transform(tmp_path / "first"))
    ran.clear()
    run({**values, "output_dir": str(tmp_path / "third")})
    assert ran == []  # every shard committed: no layer runs
    assert torch.equal(transform(tmp_path / "third"), transform(tmp_path / "first"))


def test_local_run_writes_the_store_on_s3(tmp_path, tiny_llama, s3_server):
    s3_server.create_bucket("local-runs")
    report = run(settings(tiny_llama, tmp_path / "out", activations={"uri": "s3://local-runs/acts"}, run_id="s3",
                          storage={"endpoint_url": s3_server.endpoint_url}))
    s3 = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint_url, skip_instance_cache=True)
    manifest = json.loads(s3.cat_file(f"local-runs/acts/s3/blocks/{BLOCK}/manifest.json"))
    assert manifest["shards"] == list(range(SHARDS)) and manifest["rows"] == report["solver"][0]["tokens"]
    run(settings(tiny_llama, tmp_path / "memory"))
    assert torch.equal(transform(tmp_path / "out"), transform(tmp_path / "memory"))


def test_statistics_only_store_has_no_rows_and_cosine_says_so(tmp_path, tiny_llama):
    values = settings(tiny_llama, tmp_path / "out", activations={"uri": f"file://{tmp_path / 'store'}",
                                                                 "save_rows": False}, run_id="stats-only")
    run(values)
    block = tmp_path / "store" / "stats-only" / "blocks" / BLOCK
    manifest = json.loads((block / "manifest.json").read_text())
    assert manifest["shards"] == list(range(SHARDS)) and manifest["parts"] == [] and not (block / "rows").exists()
    ctx = recipe.Context(validate_config({**values, "method": "cosine"}), progress=False)
    with pytest.raises(ReplaceMeError, match=r"^activations.save_rows: file://.*/stats-only holds only the statistics "
                                             r"of block 2-4, no rows; .*activations.save_rows: true$"):
        recipe.solve(ctx, OutputDir(str(tmp_path / "out")))


def test_two_blocks_fitted_in_turn_match_the_in_memory_run_and_resume(tmp_path, tiny_llama, monkeypatch):
    values = settings(tiny_llama, tmp_path / "stored", blocks=[[1, 2], [3, 5]], alpha=1.0,
                      activations={"uri": f"file://{tmp_path / 'store'}"}, run_id="two")
    run(values)
    run(settings(tiny_llama, tmp_path / "memory", blocks=[[1, 2], [3, 5]], alpha=1.0))
    first = load_file(tmp_path / "stored" / "transforms.safetensors")
    memory = load_file(tmp_path / "memory" / "transforms.safetensors")
    assert set(first) == {"1-2", "3-5"} and all(torch.equal(first[k], memory[k]) for k in first)
    ran = batches_run(monkeypatch)
    (tmp_path / "store" / "two" / "blocks" / "3-5" / "shards" / "00000.json").unlink()  # committed for 1-2 only
    run({**values, "output_dir": str(tmp_path / "resumed")})
    assert ran and all(ids == [0, 1] for ids in ran)
    resumed = load_file(tmp_path / "resumed" / "transforms.safetensors")
    assert all(torch.equal(resumed[k], first[k]) for k in first)
