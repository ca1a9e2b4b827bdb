"""The Python API: ``from replaceme import prune`` runs what ``replaceme run`` runs, raises instead of exiting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

import replaceme
from conftest import BUNDLED_MODEL, CALIB, EVAL, ROOT
from replaceme import PruneResult, ReplaceMeConfig, ReplaceMeError, prune
from replaceme.api import resolve_config
from replaceme.config import load_config


@pytest.mark.slow
def test_prune_returns_what_it_wrote_and_records_it_in_mlflow(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    steps: list[str] = []
    result = prune(ROOT / "examples" / "quickstart.yaml", model_path=str(BUNDLED_MODEL), dataset=str(CALIB),
                   dataset_size=32, max_length=64, eval={"dataset": str(EVAL), "dataset_size": 8},
                   output_dir=str(tmp_path / "out"), mlflow={"tracking_uri": store, "experiment": "api"},
                   progress=False, on_step=steps.append)

    assert isinstance(result, PruneResult) and steps == ["profile", "calibrate", "solve", "merge", "evaluate"]
    out = tmp_path / "out"
    assert result.output_dir == str(out) and result.model_dir == str(out / "model")
    assert result.report == json.loads((out / "report.json").read_text())
    assert [list(b) for b in result.blocks] == json.loads((out / "blocks.json").read_text()) == result.report["blocks"]
    assert result.transforms_uri == str(out / "transforms.safetensors")
    maps = result.maps()
    assert list(maps) == result.blocks and all(t.shape == (128, 128) for t in maps.values())

    client = MlflowClient(store)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_experiment_by_name("api").experiment_id
    assert run.data.tags["replaceme.output_uri"].endswith(str(out))
    assert json.loads(run.data.tags["replaceme.blocks"]) == result.report["blocks"]
    assert run.data.metrics["retention"] == pytest.approx(result.report["retention"])
    assert run.data.params["dataset_size"] == "32"


def test_prune_raises_instead_of_exiting(tmp_path):
    with pytest.raises(ReplaceMeError, match="unknown key 'alpah'; did you mean 'alpha'"):
        prune(model_path=str(BUNDLED_MODEL), dataset=str(CALIB), output_dir=str(tmp_path / "out"), alpah=0.1)
    with pytest.raises(ReplaceMeError, match="'model_path' is required"):
        prune({"dataset": str(CALIB)}, progress=False)


def test_keyword_settings_override_a_config_and_merge_into_its_sections(tmp_path):
    config = load_config(ROOT / "examples" / "quickstart.yaml",
                         [f"output_dir={tmp_path}/out", "token=hf_secret", "mlflow.experiment=mine"])
    resolved = resolve_config(config, {"alpha": 0.5, "mlflow": {"enabled": False}, "eval": {"dataset_size": 4}})
    assert isinstance(resolved, ReplaceMeConfig) and resolved.alpha == 0.5
    assert resolved.mlflow.experiment == "mine" and not resolved.mlflow.enabled  # merged, not replaced
    assert resolved.token is not None and resolved.token.get_secret_value() == "hf_secret"
    assert resolved.eval is not None and resolved.eval.dataset_size == 4 and resolved.eval.dataset == str(EVAL)
    assert resolve_config(config, {}) is config
    from_yaml = resolve_config(ROOT / "examples" / "quickstart.yaml", {"eval": {"dataset_size": 4}})
    assert from_yaml.eval is not None and from_yaml.eval.dataset == str(EVAL)  # the `eval: path` shorthand refined


def test_the_package_exports_its_api_lazily_and_ships_its_types():
    for name in replaceme.__all__:
        assert getattr(replaceme, name) is not None
    imported = subprocess.run([sys.executable, "-c", "import sys, replaceme; print('torch' in sys.modules)"],
                              capture_output=True, text=True, cwd=ROOT, check=True)
    assert imported.stdout.strip() == "False"  # `import replaceme` and `replaceme --help` stay fast
    assert (ROOT / "replaceme" / "py.typed").exists()
    assert 'replaceme = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()  # installed with the package
