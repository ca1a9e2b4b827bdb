"""A step opens only the inputs its work reads: `replaceme solve`, `merge` and `evaluate` never read
the calibration set, while a step that reads a bad input still refuses in one line before its work."""

from __future__ import annotations

import json
import shutil

from conftest import CALIB, EVAL, write_config
from replaceme import cli
from user_cli import USER_ERROR


def test_steps_after_calibrate_run_without_the_calibration_set(tmp_path, tiny_llama, capsys):
    data, held_out, out = tmp_path / "calib.jsonl", tmp_path / "eval.jsonl", tmp_path / "out"
    shutil.copy(CALIB, data)
    shutil.copy(EVAL, held_out)
    config = str(write_config(tmp_path / "job.yaml", model_path=str(tiny_llama), dataset=str(data),
                              eval={"dataset": str(held_out), "dataset_size": 8}, output_dir=str(out),
                              blocks=[[2, 4]], dataset_size=8, max_length=32, batch_size=4, mlflow={"enabled": False}))
    assert cli.main(["run", "--config", config, "--quiet"]) == 0
    first = json.loads((out / "report.json").read_text())

    data.unlink()  # the calibration set is gone: a scratch disk cleaned, a bucket's lifecycle rule
    alpha = ["--set", "alpha=10", "--quiet"]
    for step in ("solve", "merge", "evaluate"):
        assert cli.main([step, "--config", config, *alpha]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["alpha"] == 10 and report["perplexity_after"] != first["perplexity_after"]
    # the report still names the data the maps were fitted on: calibrate recorded it
    assert report["lineage"]["datasets"] == first["lineage"]["datasets"]
    assert report["calibration_tokens"] == first["calibration_tokens"] > 0

    # a step that reads the missing input refuses in one line, before it removes or computes anything
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(["calibrate", "--config", config, "--overwrite", *alpha]) == USER_ERROR
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: dataset: file '{data}' does not exist"), line
    held_out.unlink()
    assert cli.main(["evaluate", "--config", config, "--overwrite", *alpha]) == USER_ERROR
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: eval.dataset: file '{held_out}' does not exist"), line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
