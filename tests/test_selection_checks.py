"""Block selection settings that cannot fit the model are refused before any layer runs, naming the
key and the numbers; a non-finite activation names the layer and advises float32 only when the
stream is not already float32."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CALIB, build_tiny_model
from replaceme import recipe
from replaceme.blocks import check_selection
from replaceme.config import validate_config
from replaceme.engine import LocalEngine, check_finite
from replaceme.errors import ReplaceMeError

LAYERS = 6  # the tiny test models


def config_for(model, tmp_path, **changes):
    values = dict(model_path=str(model), dataset=str(CALIB), output_dir=str(tmp_path / "out"), max_length=32,
                  dataset_size=8, save_transform_only=True)
    return validate_config({**values, **changes})


@pytest.fixture
def no_layer_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the selection must be refused before any layer runs")

    for name in ("embed", "run_layer", "distances", "calibrate"):
        monkeypatch.setattr(LocalEngine, name, refuse)


@pytest.mark.parametrize("settings, message", [
    # 5 layers (1..5) hold two 2-layer blocks, not three
    (dict(layers_to_skip=2, num_A=3), "num_A: 3 blocks of layers_to_skip=2 layers do not fit in layers 1..5 "
                                      "(min_distance_layer 1, 6 layers): at most 2 fit; lower num_A or layers_to_skip"),
    # layers 2..5 hold two touching 2-layer blocks, but only one when a layer must stay between them
    (dict(layers_to_skip=2, num_A=2, min_distance_layer=2, merge_consecutive=False),
     "at most 1 fit, a layer apart as merge_consecutive is false"),
    (dict(layers_to_skip=2, min_distance_layer=5), "min_distance_layer: 5 leaves no candidate block of "
                                                   "layers_to_skip=2 layers in the model's 6 layers (the last starts "
                                                   "at layer 4)"),
    (dict(layers_to_skip=6), "layers_to_skip: 6 must be smaller than the model's 6 layers"),
])
def test_impossible_selection_refused_before_any_layer_runs(tmp_path, tiny_llama, no_layer_runs, settings, message):
    with pytest.raises(ReplaceMeError) as error:
        recipe.run(config_for(tiny_llama, tmp_path, **settings), progress=False)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_explicit_blocks_are_not_held_to_the_selection_settings(tmp_path, tiny_llama):
    config = config_for(tiny_llama, tmp_path, blocks=[[2, 4]], layers_to_skip=2, num_A=3)
    assert recipe.Context(config, progress=False).blocks == [(2, 4)]


@pytest.mark.parametrize("args", [
    (LAYERS, 2, 2, 1, True), (LAYERS, 2, 2, 2, True), (LAYERS, 2, 2, 1, False),  # exactly fit
    (LAYERS, 1, 5, 1, True), (LAYERS, 1, 3, 1, False), (LAYERS, 2, 1, 4, True), (LAYERS, 5, 1, 1, True),
])
def test_settings_that_fit_pass(args):
    check_selection(*args)


@pytest.mark.parametrize("args, key", [
    ((LAYERS, 1, 6, 1, True), "num_A: 6"), ((LAYERS, 1, 4, 1, False), "num_A: 4"),
    ((LAYERS, 2, 1, 5, True), "min_distance_layer: 5"), ((LAYERS, 1, 1, 6, True), "min_distance_layer: 6"),
])
def test_settings_that_cannot_fit_fail(args, key):
    with pytest.raises(ReplaceMeError, match=f"^{key}"):
        check_selection(*args)


def test_selected_blocks_at_the_limit_still_calibrate(tmp_path, tiny_llama):
    report = recipe.run(config_for(tiny_llama, tmp_path, layers_to_skip=1, num_A=2, min_distance_layer=4),
                        progress=False)
    assert sorted(report["blocks"]) in ([[4, 6]], [[4, 5], [5, 6]])


# --- non-finite activations ----------------------------------------------------------------------


def inf_model(tmp_path, tokenizer_dir):
    model = build_tiny_model(tmp_path / "inf", tokenizer_dir)
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.3.mlp.down_proj.weight"
    tensors = load_file(model / index[name])
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, model / index[name], metadata={"format": "pt"})
    return model


def test_non_finite_in_float32_blames_the_weights_not_the_dtype(tmp_path, tokenizer_dir):
    config = config_for(inf_model(tmp_path, tokenizer_dir), tmp_path, blocks=[[5, 6]], compute_dtype="float32")
    with pytest.raises(ReplaceMeError) as error:
        recipe.run(config, progress=False)
    message = str(error.value)
    assert message.startswith("non-finite activations after decoder layer 3 (calibration batch 0) in float32")
    assert "checkpoint's weights" in message and "layer 3" in message
    assert "try compute_dtype: float32" not in message


@pytest.mark.parametrize("dtype, advised", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, True),
                                            (torch.float16, True)])
def test_float32_advised_only_for_narrower_streams(dtype, advised):
    out = torch.ones(1, 3, 4, dtype=dtype)
    out[0, 1, 2] = float("nan")
    with pytest.raises(ReplaceMeError, match="non-finite activations after decoder layer 7") as error:
        check_finite(7, out, torch.ones(1, 3, dtype=torch.long))
    assert ("try compute_dtype: float32" in str(error.value)) == advised
    assert ("checkpoint's weights" in str(error.value)) != advised
