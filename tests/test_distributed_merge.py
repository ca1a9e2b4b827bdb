"""The merge on Ray workers writes the same checkpoint as the single-process merge, shard by shard."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import build_tiny_model
from replaceme.checkpoint import Checkpoint
from replaceme.distributed import merge as distributed
from replaceme.distributed.cluster import connect
from replaceme.families import Family
from replaceme.merge import merge_checkpoint, plan_merge
from s3_server import ACCESS_KEY, SECRET_KEY

BLOCKS = [(2, 4), (5, 7)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer_dir) -> Path:
    """An 8-layer Llama in 22 shards, some of which hold only removed layers."""
    return build_tiny_model(tmp_path_factory.mktemp("sharded"), tokenizer_dir, num_hidden_layers=8)


@pytest.fixture(scope="module")
def transforms() -> dict:
    generator = torch.Generator().manual_seed(3)
    return {b: torch.eye(64) + 0.2 * torch.randn(64, 64, generator=generator) for b in BLOCKS}


@pytest.fixture(scope="module")
def single(sharded, transforms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    with Checkpoint(str(sharded)) as checkpoint:
        merge_checkpoint(checkpoint, transforms, fsspec.filesystem("file"), str(out), progress=False)
    return out


@pytest.fixture(scope="module")
def ray(ray_head):
    return connect(ray_head.address)


def assert_same_checkpoint(expected: Path, actual: Path) -> None:
    index = json.loads((expected / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((actual / "model.safetensors.index.json").read_text())["weight_map"] == index
    assert (actual / "config.json").read_text() == (expected / "config.json").read_text()
    assert sorted(p.name for p in actual.iterdir()) == sorted(p.name for p in expected.iterdir())
    for shard in sorted(set(index.values())):
        with safe_open(expected / shard, "pt") as want, safe_open(actual / shard, "pt") as got:
            assert list(got.keys()) == list(want.keys())
            for name in want.keys():  # noqa: SIM118 - a safetensors handle: keys() but no __iter__
                a, b = want.get_tensor(name), got.get_tensor(name)
                assert a.dtype == b.dtype and a.shape == b.shape
                assert a.view(-1).view(torch.uint8).numpy().tobytes() == b.view(-1).view(torch.uint8).numpy().tobytes(), name


def test_three_workers_write_what_one_process_writes(ray, sharded, transforms, single, tmp_path):
    reports = []
    out = tmp_path / "ray"
    config = distributed.merge_on_ray(str(sharded), transforms, str(out), workers=3, progress=False,
                                      on_shard=reports.append)
    assert config["num_hidden_layers"] == 4
    assert_same_checkpoint(single, out)
    shards = {p.name for p in out.glob("*.safetensors")}
    assert sorted(r.shard for r in reports) == sorted(shards)  # each shard written exactly once
    assert len(shards) < len(list(sharded.glob("*.safetensors")))  # shards of removed layers only are dropped
    assert all(r.peak_rss_mb for r in reports)
    AutoModelForCausalLM.from_pretrained(out)


def test_reads_and_writes_s3(ray, s3_server, sharded, transforms, single, tmp_path):
    """Workers get the endpoint and credentials from the storage options, not from the driver's environment."""
    bucket = s3_server.create_bucket("merge")
    options = {"key": ACCESS_KEY, "secret": SECRET_KEY}
    s3 = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint_url, **options)
    s3.put(f"{sharded}/", "merge/source/", recursive=True)
    distributed.merge_on_ray(f"{bucket}/source", transforms, f"{bucket}/pruned", workers=3, progress=False,
                             endpoint_url=s3_server.endpoint_url, storage_options=options)
    s3.invalidate_cache()
    s3.get("merge/pruned/", f"{tmp_path}/pruned/", recursive=True)
    assert_same_checkpoint(single, tmp_path / "pruned")


@dataclass(frozen=True)
class FailingOnce(Family):
    """A family whose first fold raises an I/O error, after its shard was partly written."""

    marker: str = ""

    def fold(self, weight, transform):
        if not Path(self.marker).exists():
            Path(self.marker).touch()
            raise OSError("injected: the store dropped the connection")
        return super().fold(weight, transform)


def failing_once(monkeypatch, marker: Path) -> None:
    """Plan with :class:`FailingOnce`; Ray workers cannot import this module, so ship it by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def plan(source, transforms, **options):  # shard_size, dtype
        planned = plan_merge(source, transforms, **options)
        return replace(planned, family=FailingOnce(**{**asdict(planned.family), "marker": str(marker)}))

    monkeypatch.setattr(distributed, "plan_merge", plan)


def test_a_retried_task_rewrites_its_shard_from_scratch(ray, sharded, transforms, single, tmp_path, monkeypatch):
    failing_once(monkeypatch, tmp_path / "failed")
    out = tmp_path / "ray"
    distributed.merge_on_ray(str(sharded), transforms, f"file://{out}", workers=3, progress=False)
    assert (tmp_path / "failed").exists()
    assert_same_checkpoint(single, out)


def test_a_failed_merge_leaves_no_config(ray, sharded, transforms, tmp_path, monkeypatch):
    failing_once(monkeypatch, tmp_path / "failed")
    out = tmp_path / "ray"
    with pytest.raises(OSError, match="injected"):
        distributed.merge_on_ray(str(sharded), transforms, str(out), workers=2, max_retries=0, progress=False)
    assert not (out / "config.json").exists()  # config marks a finished folder; nothing else can
