"""The command line as users run it: the quickstart on the bundled model, and step by step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import BUNDLED_MODEL, CALIB, EVAL, ROOT, write_config
from replaceme.cli import main


def replaceme(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "replaceme", *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    result = replaceme("run", "--config", "examples/quickstart.yaml", "--set", f"output_dir={out}", "--quiet")
    assert "removed blocks" in result.stdout and "perplexity" in result.stdout
    report = json.loads((out / "report.json").read_text())
    blocks = json.loads((out / "blocks.json").read_text())
    assert report["blocks"] == blocks and len(blocks) == 1 and blocks[0][1] - blocks[0][0] == 4
    assert report["removed_fraction"] == 0.25
    assert report["perplexity_after"] > report["perplexity_before"] > 1
    transforms = load_file(out / "transforms.safetensors")
    assert list(transforms) == [f"{blocks[0][0]}-{blocks[0][1]}"] and transforms[list(transforms)[0]].shape == (128, 128)
    assert (out / "distances.csv").read_text().startswith("start,end,angular_distance")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 12
    card = (out / "model" / "README.md").read_text()  # our card, with what this run measured
    assert "tags:\n- replaceme\n- depth-pruning" in card and "16 → 12" in card
    assert f"| this model | {report['perplexity_after']:.4f} |" in card
    assert f"python -m replaceme run --config examples/quickstart.yaml --set output_dir={out} --quiet" in card
    assert not (out / "model" / "TRAINING.json").exists()  # the bundled model's own notes stay with it
    assert not list(tmp_path.glob("*.incomplete"))
    # the bundled model is never written to
    assert not any(p.name.startswith(".") or p.name.endswith(".incomplete") for p in BUNDLED_MODEL.iterdir())


def test_steps_one_by_one_and_resolve_with_other_alpha(tmp_path, tiny_llama, capsys):
    config = write_config(tmp_path / "job.yaml", model_path=str(tiny_llama), dataset=str(CALIB), eval=str(EVAL),
                          output_dir=str(tmp_path / "out"), max_length=32, dataset_size=24, layers_to_skip=2,
                          token="hf_SECRET_VALUE")
    args = ["--config", str(config), "--quiet"]
    assert main(["profile", *args]) == 0
    assert main(["calibrate", *args]) == 0
    first = load_file(tmp_path / "out" / "transforms.safetensors")
    alpha = ["--set", "alpha=1000"]
    assert main(["solve", *args, *alpha]) == 0
    second = load_file(tmp_path / "out" / "transforms.safetensors")
    (key,) = first
    assert not torch.allclose(first[key], second[key])
    assert main(["merge", *args]) == 2  # alpha 0: the maps in place were solved with alpha 1000
    assert "run `replaceme solve`" in capsys.readouterr().err
    assert main(["merge", *args, *alpha]) == 0
    assert main(["merge", *args, *alpha]) == 0 and "already done" in capsys.readouterr().out
    assert main(["evaluate", *args, *alpha]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["perplexity_after"] > 0 and set(report["seconds"]) >= {"profile", "calibrate", "solve", "merge"}
    assert "SECRET" not in capsys.readouterr().out + (tmp_path / "out" / "report.json").read_text()
    # the report describes the maps now in place (alpha 1000), as `replaceme run` would have written it
    assert report["config"]["alpha"] == 1000 and "evaluate" in report["seconds"]
    assert report["solver"] == json.loads((tmp_path / "out" / "calibration" / "solver.json").read_text())["blocks"]
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["log", str(tmp_path / "out"), "--set", f"mlflow.tracking_uri={tracking}"]) == 0
    from mlflow import MlflowClient

    [run] = MlflowClient(tracking).search_runs([MlflowClient(tracking).get_experiment_by_name("replaceme").experiment_id])
    assert run.data.params["alpha"] == "1000.0" and run.data.metrics["retention"] == pytest.approx(report["retention"])


def test_errors_print_one_line_without_traceback(tmp_path):
    result = replaceme("run", "--config", "examples/quickstart.yaml", "--set", "alpah=2", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: invalid config: unknown key 'alpah'; did you mean 'alpha'?"


def test_help_lists_the_commands():
    result = replaceme("--help")
    for command in ("run", "profile", "calibrate", "solve", "merge", "evaluate"):
        assert command in result.stdout
