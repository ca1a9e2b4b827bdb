"""A damaged or inconsistent source checkpoint is refused up front, through the CLI, in one line that
names the file and says what to do; no layer runs, no output appears, and the source is untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CALIB, write_config
from user_cli import USER_ERROR, assert_one_line_error, replaceme_cli, snapshot


class Unplain:
    """Anything but a tensor: the weights-only unpickler refuses it."""


def job(tmp_path: Path, model: str | Path, **changes) -> Path:
    values = dict(model_path=str(model), dataset=str(CALIB), dataset_size=8, batch_size=4, max_length=32,
                  blocks=[[2, 4]], output_dir=str(tmp_path / "out"), mlflow={"enabled": False})
    return write_config(tmp_path / "job.yaml", **{**values, **changes})


def copy_model(tiny_llama: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def weight_map(model: Path) -> dict[str, str]:
    return json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]


def run_fails(tmp_path: Path, model: Path, *fragments: str, **changes) -> str:
    """``replaceme run`` on the damaged model: exit 2, one error line, nothing written anywhere."""
    before = snapshot(model)
    result = replaceme_cli("run", "--config", str(job(tmp_path, model, **changes)), "--quiet")
    line = assert_one_line_error(result, USER_ERROR, *fragments)
    assert snapshot(model) == before
    assert not (tmp_path / "out").exists()
    return line


def test_a_shard_missing_from_the_folder_is_named(tmp_path, tiny_llama):
    model = copy_model(tiny_llama, tmp_path)
    shard = weight_map(model)["model.layers.5.mlp.down_proj.weight"]
    (model / shard).unlink()
    run_fails(tmp_path, model, shard, "missing", "download")


def test_a_truncated_shard_is_named_before_any_layer_runs(tmp_path, tiny_llama):
    model = copy_model(tiny_llama, tmp_path)
    shard = model / weight_map(model)["model.layers.5.mlp.down_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-100])  # an interrupted download: the data region is cut short
    run_fails(tmp_path, model, shard.name, "truncated", "re-download")


@pytest.mark.parametrize("text, fragment", [("{\"model_type\": \"llama\",", "not valid JSON"),
                                            ("[1, 2]", "not a JSON object")])
def test_a_malformed_config_json_is_named(tmp_path, tiny_llama, text, fragment):
    model = copy_model(tiny_llama, tmp_path)
    (model / "config.json").write_text(text)
    run_fails(tmp_path, model, "config.json", fragment)


@pytest.mark.parametrize("declared", [8, 5])  # more layers than the weights hold; fewer (would drop layer 5)
def test_config_layer_count_must_match_the_weights(tmp_path, tiny_llama, declared):
    model = copy_model(tiny_llama, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": declared}))
    run_fails(tmp_path, model, f"num_hidden_layers: {declared}", "hold 6 decoder layers")


def test_a_pickle_shard_holding_more_than_tensors_is_refused_up_front(tmp_path, tiny_llama):
    """Two .bin shards; the second also pickles a custom object, which the weights-only unpickler
    refuses. Today that surfaced mid-run as an unpickling traceback telling the user to turn the
    guard off; the message must suggest converting, never weights_only=False."""
    model = copy_model(tiny_llama, tmp_path)
    tensors = {}
    for shard in model.glob("*.safetensors"):
        tensors.update(load_file(shard))
        shard.unlink()
    (model / "model.safetensors.index.json").unlink()
    late = {name: tensor for name, tensor in tensors.items() if name.startswith("model.layers.5.")}
    early = {name: tensor for name, tensor in tensors.items() if name not in late}
    torch.save(early, model / "pytorch_model-00001-of-00002.bin")
    torch.save({**late, "extra": Unplain()}, model / "pytorch_model-00002-of-00002.bin")
    index = {name: "pytorch_model-00001-of-00002.bin" for name in early}
    index.update({name: "pytorch_model-00002-of-00002.bin" for name in late})
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    line = run_fails(tmp_path, model, "pytorch_model-00002-of-00002.bin", "not a plain tensor checkpoint",
                     "safetensors", allow_pickle=True)
    assert "weights_only" not in line


def test_missing_tokenizer_files_are_named(tmp_path, tiny_llama):
    model = copy_model(tiny_llama, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    run_fails(tmp_path, model, str(model), "no tokenizer files", "tokenizer.json")


def test_missing_s3_driver_gives_the_install_hint(tmp_path):
    """A model on s3:// without s3fs installed (shadowed here by a package that cannot be imported)."""
    blocker = tmp_path / "blocked" / "s3fs"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 's3fs'\")\n")
    root = Path(__file__).resolve().parents[1]
    result = replaceme_cli("run", "--config", str(job(tmp_path, "s3://models/tiny-llama")), "--quiet",
                           env={"PYTHONPATH": f"{blocker.parent}:{root}"})
    assert_one_line_error(result, USER_ERROR, "model_path: s3://models/tiny-llama", "pip install 'replaceme[s3]'")
    assert not (tmp_path / "out").exists()


def test_a_single_file_checkpoint_runs(tmp_path, tokenizer_dir):
    """model.safetensors without an index: its header is read for the weight map and again for the
    tensors' offsets, through one cached handle."""
    from conftest import build_tiny_model
    from replaceme import recipe
    from replaceme.config import validate_config

    model = build_tiny_model(tmp_path / "single", tokenizer_dir, shard_size="1GB")
    assert (model / "model.safetensors").exists() and not (model / "model.safetensors.index.json").exists()
    report = recipe.run(validate_config(dict(model_path=str(model), dataset=str(CALIB), eval=str(CALIB),
                                             output_dir=str(tmp_path / "out"), dataset_size=8, max_length=32,
                                             blocks=[[2, 4]], mlflow={"enabled": False})), progress=False)
    assert report["perplexity_after"] > 0
    assert load_file(tmp_path / "out" / "model" / "model-00001-of-00001.safetensors")
