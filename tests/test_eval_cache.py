"""The source model's perplexity is cached: a second evaluation with the same source weights, eval
texts and settings reuses it without running a source layer; a rewritten shard, a corrupt or
half-written entry, or a cache turned off means it is computed again, never a wrong figure."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import fsspec
import pytest
from safetensors.torch import load_file, save_file

from conftest import CALIB, EVAL, write_config
from replaceme import cli, evalcache
from replaceme.engine import LocalEngine
from replaceme.errors import ReplaceMeError

ALPHA = ["--set", "alpha=10", "--quiet"]


@pytest.fixture
def model(tmp_path, tiny_llama) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))  # its shards are rewritten below


def job(tmp_path: Path, model: Path, cache, **changes) -> str:
    values = dict(model_path=str(model), dataset=str(CALIB),
                  eval={"dataset": str(EVAL), "dataset_size": 8, "cache": cache}, output_dir=str(tmp_path / "out"),
                  blocks=[[2, 4]], dataset_size=8, max_length=32, batch_size=4, mlflow={"enabled": False})
    return str(write_config(tmp_path / "job.yaml", **{**values, **changes}))


def report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "report.json").read_text())


def count_source_layers(monkeypatch, model: Path) -> list[int]:
    """The decoder layers of ``model`` run from now on (the pruned model's are not counted)."""
    ran, run_layer = [], LocalEngine.run_layer

    def counting(self, index, *args, **kwargs):
        if Path(self.model.checkpoint.root) == model:
            ran.append(index)
        return run_layer(self, index, *args, **kwargs)

    monkeypatch.setattr(LocalEngine, "run_layer", counting)
    return ran


def entries(cache: Path) -> list[Path]:
    return sorted((cache / evalcache.FOLDER).glob("*.json"))


def test_a_second_evaluation_reuses_the_source_perplexity_until_a_shard_is_rewritten(tmp_path, model, monkeypatch,
                                                                                      capsys):
    cache = tmp_path / "cache"
    config = job(tmp_path, model, str(cache))
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    first = report(tmp_path)
    assert first["perplexity_before_cached"] is False and len(entries(cache)) == 1

    ran = count_source_layers(monkeypatch, model)
    for step in ("solve", "merge", "evaluate"):  # another alpha: a new pruned model, the same source
        assert cli.main([step, "--config", config, *ALPHA]) == 0
    second = report(tmp_path)
    assert ran == [] and second["perplexity_before_cached"] is True
    assert (second["perplexity_before"], second["eval_tokens"]) == (first["perplexity_before"], first["eval_tokens"])
    assert second["perplexity_after"] != first["perplexity_after"]
    assert second["retention"] == second["perplexity_before"] / second["perplexity_after"]

    # the pruned model's figure is the one the uncached path gives, bit for bit (where the cache is
    # shapes no result: without --overwrite the evaluation is already done)
    uncached = [*ALPHA, "--set", "eval.cache=false"]
    assert cli.main(["evaluate", "--config", config, *uncached]) == 0 and "already done" in capsys.readouterr().out
    assert cli.main(["evaluate", "--config", config, "--overwrite", *uncached]) == 0
    third = report(tmp_path)
    assert third["perplexity_before_cached"] is False and ran == list(range(6))
    assert (third["perplexity_before"], third["perplexity_after"]) == (second["perplexity_before"],
                                                                       second["perplexity_after"])

    # other weights in a shard of the same size, its old mtime kept (cp -p, rsync -a): the index is
    # unchanged, the entry is not reused
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.4.mlp.down_proj.weight"
    shard = model / index[name]
    stat, tensors = shard.stat(), load_file(shard)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, shard, metadata={"format": "pt"})
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size
    ran.clear()
    assert cli.main(["evaluate", "--config", config, "--overwrite", *ALPHA]) == 0
    fourth = report(tmp_path)
    assert fourth["perplexity_before_cached"] is False and ran == list(range(6))
    assert fourth["perplexity_before"] != first["perplexity_before"] and len(entries(cache)) == 2


def test_a_corrupt_or_half_written_entry_is_recomputed_never_trusted(tmp_path, model, monkeypatch, caplog):
    cache = tmp_path / "cache"
    config = job(tmp_path, model, str(cache))
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    first = report(tmp_path)
    [entry] = entries(cache)
    good = entry.read_bytes()
    ran = count_source_layers(monkeypatch, model)
    evaluate = ["evaluate", "--config", config, "--overwrite", "--quiet"]

    for damaged in (good[: len(good) // 2],  # cut short
                    good.replace(str(first["perplexity_before"]).encode(), b"1.5"),  # another value, same shape
                    b"\x00" * len(good)):
        entry.write_bytes(damaged)
        ran.clear()
        with caplog.at_level(logging.WARNING, logger="replaceme"):
            assert cli.main(evaluate) == 0
        assert "eval.cache: ignoring the corrupt entry" in caplog.text and str(entry) in caplog.text
        caplog.clear()
        again = report(tmp_path)
        assert again["perplexity_before_cached"] is False and ran == list(range(6))
        assert again["perplexity_before"] == first["perplexity_before"]
        assert entry.read_bytes() != damaged  # replaced by a valid entry
    ran.clear()
    assert cli.main(evaluate) == 0 and report(tmp_path)["perplexity_before_cached"] is True and ran == []

    # a write that dies before its rename leaves no entry (and no temporary file) behind, and the run completes
    entry.unlink()

    replace = os.replace

    def dies(source, target, *args, **kwargs):  # only the cache's rename: a full disk under the cache
        if str(target).startswith(str(cache)):
            raise OSError(28, "No space left on device")
        return replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", dies)
    with caplog.at_level(logging.WARNING, logger="replaceme"):
        assert cli.main(evaluate) == 0
    assert "eval.cache: cannot write" in caplog.text and report(tmp_path)["perplexity_before_cached"] is False
    assert list((cache / evalcache.FOLDER).iterdir()) == []


def test_the_cache_location_and_turning_it_off(tmp_path, model, monkeypatch):
    monkeypatch.delenv(evalcache.ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert evalcache.location(True) == str(tmp_path / "home" / ".cache" / "replaceme")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert evalcache.location(True) == str(tmp_path / "xdg" / "replaceme")
    monkeypatch.setenv(evalcache.ENV, "s3://team-bucket/replaceme-cache/")
    assert evalcache.location(True) == "s3://team-bucket/replaceme-cache"
    assert evalcache.location("~/elsewhere") == str(tmp_path / "home" / "elsewhere") and evalcache.location(False) is None
    with pytest.raises(ReplaceMeError, match="^eval.cache: is empty"):
        evalcache.location("")

    shared = tmp_path / "from-env"
    monkeypatch.setenv(evalcache.ENV, str(shared))
    assert cli.main(["run", "--config", job(tmp_path, model, False), "--quiet"]) == 0
    assert report(tmp_path)["perplexity_before_cached"] is False and not shared.exists()
    assert cli.main(["evaluate", "--config", job(tmp_path, model, True), "--overwrite", "--quiet"]) == 0
    assert len(entries(shared)) == 1 and not (tmp_path / "home").exists()


def test_a_cache_inside_the_source_model_or_of_unknown_scheme_is_refused_before_any_work(tmp_path, model, capsys):
    from user_cli import USER_ERROR, snapshot

    before = snapshot(model)
    for cache, fragment in ((str(model / "cache"), "is inside the source model"),
                            ("nosuchscheme://bucket/cache", "eval.cache: cannot open nosuchscheme://bucket/cache")):
        assert cli.main(["run", "--config", job(tmp_path, model, cache), "--quiet"]) == USER_ERROR
        [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert fragment in line, line
        assert not (tmp_path / "out").exists() and snapshot(model) == before


def test_pods_share_a_cache_on_s3(tmp_path, model, s3_server, monkeypatch):
    bucket = s3_server.create_bucket("perplexity-cache")
    config = job(tmp_path, model, f"{bucket}/team", storage={"endpoint_url": s3_server.endpoint_url})
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    first = report(tmp_path)
    fs = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint_url, skip_instance_cache=True)
    assert len(fs.ls(f"{bucket.removeprefix('s3://')}/team/{evalcache.FOLDER}")) == 1
    ran = count_source_layers(monkeypatch, model)
    assert cli.main(["evaluate", "--config", config, "--overwrite", "--quiet"]) == 0
    second = report(tmp_path)
    assert ran == [] and second["perplexity_before_cached"] is True
    assert second["perplexity_before"] == first["perplexity_before"]
