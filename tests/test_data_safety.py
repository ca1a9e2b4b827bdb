"""Nothing a user owns is ever lost, and nothing stale is reported as current: --overwrite, the output
lock, publishing on S3, step markers, saved distances, local paths, resume, full and read-only disks.

Every test hashes the user's files (source model, data, unrelated files) before and after."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import pytest
from safetensors.torch import load_file

from conftest import BUNDLED_MODEL, CALIB, EVAL, ROOT, write_config
from replaceme import cli, outputs, recipe
from replaceme.config import validate_config
from replaceme.engine import LocalEngine
from replaceme.errors import ReplaceMeError
from user_cli import STORAGE_ERROR, USER_ERROR, assert_one_line_error, replaceme_cli, snapshot

SMALL = dict(dataset_size=8, max_length=32, batch_size=4, mlflow={"enabled": False})


def settings(model: Path, out: Path | str, **changes) -> dict:
    return {"model_path": str(model), "dataset": str(CALIB), "eval": {"dataset": str(EVAL), "dataset_size": 8},
            "output_dir": str(out), "blocks": [[2, 4]], **SMALL, **changes}


def job(path: Path, model: Path, out: Path | str, **changes) -> Path:
    return write_config(path, **settings(model, out, **changes))


@pytest.fixture
def workspace(tmp_path, tiny_llama) -> Path:
    """A user's project folder: a model, calibration and eval data, and a file of theirs."""
    folder = tmp_path / "project"
    shutil.copytree(tiny_llama, folder / "model")
    shutil.copy(CALIB, folder / "calib.jsonl")
    shutil.copy(EVAL, folder / "eval.jsonl")
    (folder / "notes.txt").write_text("three weeks of notes")
    return folder


# --- 1. --overwrite never deletes what replaceme did not write -------------------------------------


def test_overwrite_refuses_an_output_holding_the_source_model_and_data(workspace):
    before = snapshot(workspace)
    config = write_config(workspace.parent / "job.yaml", **settings(workspace / "model", workspace,
                          dataset=str(workspace / "calib.jsonl"), eval=str(workspace / "eval.jsonl")))
    result = replaceme_cli("run", "--config", str(config), "--overwrite", "--quiet")
    assert_one_line_error(result, USER_ERROR, f"output_dir: {workspace} holds the run's model_path")
    assert snapshot(workspace) == before
    assert sorted(p.name for p in workspace.parent.iterdir()) == ["job.yaml", "project"]


def test_overwrite_replaces_only_a_folder_replaceme_wrote(tmp_path, workspace, tiny_llama):
    theirs = tmp_path / "results"
    theirs.mkdir()
    (theirs / "paper.tex").write_text("\\section{Results}")
    before = snapshot(workspace, theirs)
    result = replaceme_cli("run", "--config", str(job(tmp_path / "job.yaml", tiny_llama, theirs)), "--overwrite", "--quiet")
    assert_one_line_error(result, USER_ERROR, f"output_dir: {theirs} was not written by replaceme", "paper.tex")
    assert snapshot(workspace, theirs) == before and not (tmp_path / "results.incomplete").exists()

    out = tmp_path / "pruned"
    first = recipe.run(validate_config(settings(tiny_llama, out)), progress=False)
    assert json.loads((out / ".replaceme").read_text())["tool"] == "replaceme"
    second = recipe.run(validate_config(settings(tiny_llama, out, blocks=[[3, 5]], overwrite=True)), progress=False)
    assert (first["blocks"], second["blocks"]) == ([[2, 4]], [[3, 5]])
    assert json.loads((out / "blocks.json").read_text()) == [[3, 5]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "project", "pruned", "results"]


def test_output_dir_dot_with_overwrite_is_refused_before_any_work(workspace, tiny_llama):
    config = job(workspace / "job.yaml", tiny_llama, ".")
    before = snapshot(workspace)
    result = replaceme_cli("run", "--config", str(config), "--overwrite", "--quiet", cwd=workspace)
    assert_one_line_error(result, USER_ERROR, "was not written by replaceme")
    assert snapshot(workspace) == before
    assert not any(p.name.endswith((".incomplete", ".lock")) for p in workspace.parent.iterdir())


# --- 2. one run at a time per output ---------------------------------------------------------------

SLOW_CLI = """
import os, sys, time
from replaceme import recipe
from replaceme.cli import main

merge = recipe.merge
def slow_merge(ctx, out):  # holds the output until the test releases it (or the time is up)
    open(sys.argv[1], "w").close()
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline and not os.path.exists(sys.argv[1] + ".release"):
        time.sleep(0.1)
    return merge(ctx, out)
recipe.merge = slow_merge
sys.exit(main(sys.argv[3:]))
"""


def start_slow_run(tmp_path: Path, config: Path, seconds: float) -> tuple[subprocess.Popen, Path]:
    """``replaceme run`` in another process that pauses in its merge step, with the output held, for
    ``seconds`` or until ``release(merging)``."""
    script, merging = tmp_path / "slow_cli.py", tmp_path / "merging"
    script.write_text(textwrap.dedent(SLOW_CLI))
    process = subprocess.Popen([sys.executable, str(script), str(merging), str(seconds), "run", "--config", str(config),
                                "--quiet"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not merging.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the first run never reached its merge"
        time.sleep(0.2)
    return process, merging


def release(merging: Path) -> None:
    Path(f"{merging}.release").touch()


def test_a_second_run_to_the_same_output_fails_at_once_naming_the_holder(tmp_path, tiny_llama):
    config = job(tmp_path / "job.yaml", tiny_llama, tmp_path / "out")
    first, merging = start_slow_run(tmp_path, config, seconds=300)
    try:
        second = replaceme_cli("run", "--config", str(config), "--overwrite", "--quiet")
        assert first.poll() is None  # the first run still held the output when the second one gave up
    finally:
        release(merging)
        stdout, stderr = first.communicate(timeout=300)
    assert_one_line_error(second, USER_ERROR, f"output_dir: {tmp_path / 'out'} is in use by run",
                          f"pid {first.pid} on")
    assert first.returncode == 0, stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["blocks"] == [[2, 4]] and (tmp_path / "out" / "model" / "config.json").exists()
    assert not (tmp_path / "out.lock").exists() and not (tmp_path / "out.incomplete").exists()


def test_a_run_killed_while_holding_the_output_is_resumed_by_the_next(tmp_path, tiny_llama):
    config = job(tmp_path / "job.yaml", tiny_llama, tmp_path / "out")
    first, _ = start_slow_run(tmp_path, config, seconds=120)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (tmp_path / "out.incomplete" / "steps" / "calibrate.json").exists() and not (tmp_path / "out").exists()
    rerun = replaceme_cli("run", "--config", str(config), "--quiet")  # the lock died with its holder
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and "calibrate" in rerun.stderr.split("resuming", 1)[1].splitlines()[0]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["perplexity_after"] > 0


# --- resume: a local run that dies keeps its finished steps ----------------------------------------


def test_a_run_that_dies_in_the_merge_resumes_without_recalibrating(tmp_path, tiny_llama, monkeypatch):
    config = validate_config(settings(tiny_llama, tmp_path / "out"))

    def broken(*args, **kwargs):
        raise RuntimeError("merge crashed")

    with monkeypatch.context() as patch:
        patch.setattr(recipe, "merge_checkpoint", broken)
        with pytest.raises(RuntimeError, match="merge crashed"):
            recipe.run(config, progress=False)
    staged = tmp_path / "out.incomplete"
    maps = load_file(staged / "transforms.safetensors")
    assert not (tmp_path / "out").exists() and (staged / "steps" / "calibrate.json").exists()

    def no_model_pass(*args, **kwargs):
        raise AssertionError("the calibration was redone")

    monkeypatch.setattr(LocalEngine, "calibrate", no_model_pass)
    report = recipe.run(config, progress=False)
    assert report["perplexity_after"] > 0 and not staged.exists()
    assert load_file(tmp_path / "out" / "transforms.safetensors")["2-4"].equal(maps["2-4"])
    # other settings: the staging folder's steps are not reused
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="merge crashed"):
        monkeypatch.setattr(recipe, "merge_checkpoint", broken)
        recipe.run(validate_config(settings(tiny_llama, tmp_path / "other")), progress=False)
    monkeypatch.setattr(LocalEngine, "calibrate", no_model_pass)
    with pytest.raises(AssertionError, match="the calibration was redone"):
        recipe.run(validate_config(settings(tiny_llama, tmp_path / "other", max_length=24)), progress=False)


def test_a_source_with_sub_folders_is_merged_without_them(tmp_path, tiny_llama):
    source = tmp_path / "downloaded"
    shutil.copytree(tiny_llama, source)
    (source / ".cache" / "huggingface").mkdir(parents=True)  # left by `hf download --local-dir`
    (source / "original").mkdir()  # Llama 3 repositories ship the original weights here
    (source / "original" / "params.json").write_text("{}")
    before = snapshot(source)
    report = recipe.run(validate_config(settings(source, tmp_path / "out")), progress=False)
    assert report["perplexity_after"] > 0 and snapshot(source) == before
    assert not (tmp_path / "out" / "model" / "original").exists()


# --- 3. S3: publish never deletes first; each byte copied once -------------------------------------


@pytest.fixture
def bucket(s3_server, monkeypatch):
    s3_server.create_bucket("safety")
    fs = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint_url, skip_instance_cache=True)
    yield fs
    fs.rm("safety", recursive=True)


def s3_settings(s3_server, tiny_llama, **changes) -> dict:
    return settings(tiny_llama, "s3://safety/out", storage={"endpoint_url": s3_server.endpoint_url}, **changes)


def test_s3_overwrite_keeps_the_new_output_when_the_copy_fails_and_copies_each_object_once(
        s3_server, bucket, tiny_llama, monkeypatch):
    recipe.run(validate_config(s3_settings(s3_server, tiny_llama)), progress=False)
    copies = []
    copy = type(bucket)._cp_file

    async def failing_copy(self, path1, path2, **kwargs):
        copies.append(path1)
        if path1.endswith("report.json"):
            raise OSError("the network went away")
        return await copy(self, path1, path2, **kwargs)

    monkeypatch.setattr(type(bucket), "_cp_file", failing_copy)
    new = validate_config(s3_settings(s3_server, tiny_llama, blocks=[[3, 5]], overwrite=True))
    with pytest.raises(OSError, match="network"):
        recipe.run(new, progress=False)
    bucket.invalidate_cache()
    assert not any("model.incomplete" in p for p in bucket.find("safety"))  # model/ was not staged twice
    assert len(copies) == len(set(copies)) and all(p.startswith("safety/out.incomplete/") for p in copies)
    assert bucket.exists("safety/out.incomplete/report.json")  # the new output survives, complete
    assert not bucket.exists("safety/out/report.json")  # the half-replaced one does not look finished
    monkeypatch.undo()
    monkeypatch.setattr(LocalEngine, "calibrate", lambda *a, **k: pytest.fail("recalibrated"))
    report = recipe.run(new, progress=False)  # publishes the staged output without recomputing it
    bucket.invalidate_cache()
    assert report["blocks"] == [[3, 5]] and not bucket.exists("safety/out.incomplete")
    assert json.loads(bucket.cat_file("safety/out/blocks.json")) == [[3, 5]]
    assert bucket.exists("safety/out/.replaceme") and not bucket.exists("safety/out.lock")


def test_s3_output_lease_refuses_a_second_run_until_it_expires(s3_server, bucket, tiny_llama, monkeypatch):
    config = validate_config(s3_settings(s3_server, tiny_llama))
    with (outputs.locked("s3://safety/out", storage_options=config.storage_options("s3://safety/out")),
          pytest.raises(ReplaceMeError, match=r"output_dir: s3://safety/out is in use by run .* renewed \d+ s ago")):
        recipe.run(config, progress=False)
    assert not bucket.exists("safety/out") and not bucket.exists("safety/out.lock")
    stale = {"run": "dead", "host": "elsewhere", "pid": 1, "since": "2026-01-01T00:00:00+00:00", "renewed": 0}
    bucket.pipe_file("safety/out.lock", json.dumps(stale).encode())  # a run that died without releasing it
    report = recipe.run(config, progress=False)
    assert report["blocks"] == [[2, 4]] and not bucket.exists("safety/out.lock")


# --- 4. step commands never report stale artefacts -------------------------------------------------


def test_steps_after_a_re_solve_refuse_until_rebuilt(tmp_path, tiny_llama, capsys):
    config = str(job(tmp_path / "job.yaml", tiny_llama, tmp_path / "out"))
    out = tmp_path / "out"
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    assert cli.main(["solve", "--config", config, "--set", "alpha=1000", "--quiet"]) == 0
    assert not (out / "report.json").exists()  # it described the model of the old maps
    capsys.readouterr()
    assert cli.main(["evaluate", "--config", config, "--set", "alpha=1000", "--quiet"]) == USER_ERROR
    error = capsys.readouterr().err
    assert "merge.json is missing; run `replaceme merge`" in error
    assert cli.main(["merge", "--config", config, "--set", "alpha=1000", "--quiet"]) == 0
    assert cli.main(["evaluate", "--config", config, "--set", "alpha=1000", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["alpha"] == 1000 and report["blocks"] == [[2, 4]]


def test_a_model_pass_is_replaced_only_with_overwrite_and_then_everything_after_it_is_stale(tmp_path, tiny_llama, capsys):
    config = str(job(tmp_path / "job.yaml", tiny_llama, tmp_path / "out"))
    out = tmp_path / "out"
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    before = snapshot(out)
    other = ["--set", "blocks=[[3,5]]", "--quiet"]
    capsys.readouterr()
    assert cli.main(["calibrate", "--config", config, *other]) == USER_ERROR  # blocks.json says [[2, 4]]
    assert "run `replaceme profile`" in capsys.readouterr().err
    assert cli.main(["profile", "--config", config, *other]) == USER_ERROR
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli.main(["calibrate", "--config", config, "--set", "max_length=24", "--quiet"]) == USER_ERROR
    assert "pass --overwrite" in capsys.readouterr().err
    assert snapshot(out) == before
    assert cli.main(["profile", "--config", config, *other, "--overwrite"]) == 0
    assert cli.main(["calibrate", "--config", config, *other]) == 0
    assert cli.main(["evaluate", "--config", config, *other]) == USER_ERROR  # model/ holds the old blocks
    assert "run `replaceme merge`" in capsys.readouterr().err
    assert not (out / "report.json").exists()


def test_ops_and_cli_steps_share_one_set_of_markers(tmp_path, tiny_llama):
    from ops.merge import merge as ops_merge

    config = str(job(tmp_path / "job.yaml", tiny_llama, tmp_path / "out"))
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    assert ops_merge(config).skipped  # the run's merge marker is the pipeline's
    assert cli.main(["solve", "--config", config, "--set", "alpha=5", "--quiet"]) == 0
    with pytest.raises(ReplaceMeError, match=r"the solve step .* other settings.*`python -m ops\.solve`"):
        ops_merge(config)


# --- 6. saved distances are reused only for the block size and model they were measured on ----------


def test_distances_path_is_refused_for_another_block_size_or_model(tmp_path, tiny_llama, tokenizer_dir):
    from conftest import build_tiny_model

    saved = "memory://profiles/distances.csv"  # any fsspec URI, read and written through the config's storage
    first = recipe.run(validate_config(settings(tiny_llama, tmp_path / "a", blocks=None, layers_to_skip=2,
                                                distances_path=saved)), progress=False)
    assert len(first["blocks"]) == 1 and first["blocks"][0][1] - first["blocks"][0][0] == 2
    again = recipe.run(validate_config(settings(tiny_llama, tmp_path / "b", blocks=None, layers_to_skip=2,
                                                distances_path=saved)), progress=False)
    assert again["blocks"] == first["blocks"]
    with pytest.raises(ReplaceMeError, match="holds distances of 2-layer blocks, but layers_to_skip is 3"):
        recipe.run(validate_config(settings(tiny_llama, tmp_path / "c", blocks=None, layers_to_skip=3,
                                            distances_path=saved)), progress=False)
    other = build_tiny_model(tmp_path / "other-model", tokenizer_dir, num_hidden_layers=8)
    with pytest.raises(ReplaceMeError, match="was measured on another model"):
        recipe.run(validate_config(settings(other, tmp_path / "d", blocks=None, layers_to_skip=2,
                                            distances_path=saved)), progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    fsspec.filesystem("memory").rm("/profiles", recursive=True)


# --- 7. every local path is resolved in the driver --------------------------------------------------


def test_relative_paths_are_made_absolute_where_the_config_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = validate_config({"model_path": "examples/shakespeare-llama-16l", "dataset": "examples/data/calib.jsonl",
                              "eval": "examples/data/eval.jsonl", "output_dir": "outputs/x", "distances_path": "d.csv",
                              "activations": {"uri": "store"}})
    assert config.model_path == str(BUNDLED_MODEL) and config.dataset == str(CALIB) and config.eval.dataset == str(EVAL)
    assert (config.output_dir, config.distances_path, config.activations.uri) == (
        str(ROOT / "outputs" / "x"), str(ROOT / "d.csv"), str(ROOT / "store"))
    hub = validate_config({"model_path": "meta-llama/Llama-3.1-8B", "dataset": "allenai/c4"})
    assert (hub.model_path, hub.dataset) == ("meta-llama/Llama-3.1-8B", "allenai/c4")  # Hub names stay names


def test_ray_run_with_a_relative_model_path(ray_head, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the Ray workers run elsewhere
    config = validate_config(settings("examples/shakespeare-llama-16l", tmp_path / "out", dataset="examples/data/calib.jsonl",
                                      blocks=[[4, 8]], engine={"backend": "ray", "address": ray_head.address,
                                                               "stages": 2, "resource_timeout_s": 60}))
    report = recipe.run(config, progress=False)
    assert report["blocks"] == [[4, 8]] and report["perplexity_after"] > 0


# --- 9. disks that are full, read-only or not disks ------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs: room for the maps and statistics of the tiny model, not for its pruned copy."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_the_disk_as_it_was(tmp_path, tiny_llama, small_disk):
    before = snapshot(tiny_llama)
    config = job(tmp_path / "job.yaml", tiny_llama, small_disk / "out")
    result = replaceme_cli("run", "--config", str(config), "--quiet")
    assert_one_line_error(result, STORAGE_ERROR, "no space left on the device", "nothing was published")
    assert list(small_disk.iterdir()) == [] and snapshot(tiny_llama) == before


def test_read_only_and_virtual_outputs_are_refused_before_any_work(tmp_path, tiny_llama):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        result = replaceme_cli("run", "--config", str(job(tmp_path / "a.yaml", tiny_llama, read_only / "out")), "--quiet")
        assert_one_line_error(result, USER_ERROR, f"output_dir: cannot write under {read_only}")
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    result = replaceme_cli("run", "--config", str(job(tmp_path / "b.yaml", tiny_llama, "/proc/replaceme-out")), "--quiet")
    assert_one_line_error(result, USER_ERROR, "output_dir: /proc/replaceme-out is on a virtual filesystem")
