"""Config loading: reference keys, overrides, and one clear message per mistake."""

from __future__ import annotations

import os

import pytest

from conftest import write_config
from replaceme.config import load_config, validate_config
from replaceme.errors import ReplaceMeError

BASE = {"model_path": "m", "dataset": "d.jsonl"}


def test_reference_keys_are_accepted(tmp_path):
    reference = dict(BASE, method="cosine", dataset_column="text", dataset_size=100, dataset_subset="train",
                     batch_size=4, max_length=256, layers_to_skip=8, num_A=2, merge_consecutive=True,
                     min_distance_layer=4, alpha=0.5, diag=False, loss="cosine", solver="lbfgs",
                     distances_path="d.csv", save_path="out", save_transform_only=True, use_4bit=False,
                     token="hf_secret")
    config = load_config(write_config(tmp_path / "c.yaml", **reference))
    assert config.output_dir == os.path.abspath("out")  # save_path, made absolute where it is read
    assert config.num_A == 2 and config.solver == "lbfgs"
    assert config.public_dict()["token"] == "***"
    assert "hf_secret" not in repr(config)


# The keys of the reference's own configs (reproduce/*.yaml, examples/*.yaml in mts-ai/ReplaceMe), written here
REFERENCE_CONFIG = """
method: "lstsq"
model_path: "m"
dataset: "d.jsonl"
dataset_column: "text"
batch_size: 8
max_length: 1024
layers_to_skip: 8
dataset_size: 4000
dataset_subset: "train"
use_4bit: True
save_path: null
min_distance_layer: 20
token: null
save_transform_only: True
distances_path: "./distances.csv"
num_A: 1
merge_consecutive: True
activations_save_path: "./activations.pt"
solver: "adam"
loss: "cosine"
diag: False
two_vectors: False
thri: False
accurate: False
alpha: 0
tasks:
  arc_easy: 0
  hellaswag: 10
  mmlu: 5
limit: 100
"""


def test_a_reference_config_is_accepted_with_one_warning_for_what_is_moot(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ref.yaml").write_text(REFERENCE_CONFIG)
    with caplog.at_level("WARNING", logger="replaceme"):
        config = load_config(tmp_path / "ref.yaml")
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "use_4bit (" in warning and "activations_save_path (" in warning and "4-bit loading is unnecessary" in warning
    assert config.output_dir == str(tmp_path / "outputs" / "run")  # save_path: null is the default output folder
    assert config.layers_to_skip == 8 and config.min_distance_layer == 20 and config.save_transform_only
    assert config.eval is not None and config.eval.dataset is None  # lm-eval tasks only, no perplexity
    assert config.eval.lm_eval_tasks == {"arc_easy": 0, "hellaswag": 10, "mmlu": 5}  # task -> few-shot count
    assert config.eval.lm_eval_limit == 100
    assert "use_4bit" not in config.public_dict() and "two_vectors" not in config.public_dict()


def test_reference_keys_that_ask_for_nothing_are_silent(caplog):
    with caplog.at_level("WARNING", logger="replaceme"):
        config = validate_config({**BASE, "use_4bit": False, "activations_save_path": None, "two_vectors": False,
                                  "thri": False, "accurate": False, "output_dir": None,
                                  "eval": "e.jsonl", "tasks": ["piqa", "boolq"]})
    assert not caplog.records
    assert config.eval is not None and config.eval.dataset == "e.jsonl" and config.eval.lm_eval_tasks == ["piqa", "boolq"]
    assert config.eval.lm_eval_limit is None


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write_config(tmp_path / "c.yaml", **BASE, eval="e.jsonl")
    config = load_config(path, ["blocks=[[6,9]]", "alpha=0.1", "output_dir=/tmp/x", "eval.max_length=64", "cosine.steps=5"])
    assert config.blocks == [(6, 9)] and config.alpha == 0.1 and config.output_dir == "/tmp/x"
    assert config.eval.dataset == "e.jsonl" and config.eval.max_length == 64 and config.cosine.steps == 5


@pytest.mark.parametrize("change, message", [
    ({"alpah": 1}, "unknown key 'alpah'; did you mean 'alpha'?"),
    ({"cosine": {"stpes": 3}}, "unknown key 'cosine.stpes'; did you mean 'cosine.steps'?"),
    ({"alpha": -1}, "'alpha': Input should be greater than or equal to 0"),
    ({"method": "svd"}, "'method': Input should be 'lstsq' or 'cosine'"),
    ({"blocks": [[2, 5], [4, 6]]}, "[2, 5] and [4, 6] overlap"),
    ({"blocks": [[0, 3]]}, "must start at layer 1 or later"),
    ({"blocks": [[5, 5]]}, "is empty"),
    ({"two_vectors": True}, "invalid config: 'two_vectors: true' selects a variant of the reference's method"),
    ({"thri": True}, "Remove thri or set it to false"),
    ({"accurate": "yes"}, "'accurate: \"yes\"'"),
    ({"batch_size": 0}, "'batch_size'"),
])
def test_invalid_values_name_the_key(change, message):
    with pytest.raises(ReplaceMeError) as error:
        validate_config({**BASE, **change})
    assert message in str(error.value)


def test_missing_required_key():
    with pytest.raises(ReplaceMeError, match="'dataset' is required"):
        validate_config({"model_path": "m"})


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ReplaceMeError, match="key=value"):
        load_config(write_config(tmp_path / "c.yaml", **BASE), ["alpha"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ReplaceMeError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_from_an_object_store(s3_server, monkeypatch):
    """Pipeline steps read their config from the run's output folder, often on S3."""
    import yaml

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # the way s3fs users point at a server
    bucket = s3_server.create_bucket("configs")
    s3_server.client().put_object(Bucket="configs", Key="run/config.yaml", Body=yaml.safe_dump(dict(BASE, alpha=0.5)))
    config = load_config(f"{bucket}/run/config.yaml", ["batch_size=2"])
    assert (config.alpha, config.batch_size, config.model_path) == (0.5, 2, "m")
    with pytest.raises(ReplaceMeError, match=f"config file {bucket}/run/missing.yaml does not exist"):
        load_config(f"{bucket}/run/missing.yaml")
