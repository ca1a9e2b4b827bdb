"""The output checkpoint tells the truth about itself: our own model card (never the source's, never a
number that was not measured), and ``output.push_to_hub`` (upload after publishing; a missing token
refused before any model pass). No network: the Hub client is replaced by a recorder."""

from __future__ import annotations

import json
import shutil
import sys

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from conftest import CALIB, EVAL
from replaceme import cli, recipe
from replaceme.card import command_line, demote_headings, split_front_matter
from replaceme.config import validate_config
from replaceme.errors import ReplaceMeError
from user_cli import USER_ERROR, assert_one_line_error, replaceme_cli

SOURCE_CARD = """---
license: llama3
language: [en]
pipeline_tag: text-generation
tags: [facebook, meta]
---
# Meta Llama 3

Scores **68.4** on MMLU.

```python
# not a heading
```
"""
SECRET = "hf_never_print_this_0123456789"


@pytest.fixture
def source(tmp_path, tiny_llama):
    folder = tmp_path / "source"
    shutil.copytree(tiny_llama, folder)
    (folder / "README.md").write_text(SOURCE_CARD)
    (folder / "TRAINING.json").write_text("{}")
    return folder


def settings(model, out, **changes) -> dict:
    return {"model_path": str(model), "dataset": str(CALIB), "eval": {"dataset": str(EVAL), "dataset_size": 8},
            "output_dir": str(out), "blocks": [[2, 4]], "dataset_size": 8, "max_length": 32, "batch_size": 4,
            "mlflow": {"enabled": False}, **changes}


def read_card(out) -> tuple[ModelCard, str]:
    text = (out / "model" / "README.md").read_text()
    return ModelCard(text), text


def test_a_run_writes_our_card_with_what_it_measured_and_quotes_the_source_card(tmp_path, source):
    out = tmp_path / "out"
    report = recipe.run(validate_config(settings(source, out, token=SECRET,
                                                 output={"base_model": "meta-llama/Meta-Llama-3-8B"})), progress=False)
    card, text = read_card(out)
    data = card.data.to_dict()
    assert data["base_model"] == "meta-llama/Meta-Llama-3-8B" and "base_model_relation" not in data
    assert data["library_name"] == "transformers" and data["tags"] == ["replaceme", "depth-pruning"]
    assert data["license"] == "llama3" and data["language"] == ["en"]  # the source's licence still binds
    assert "[2, 4)" in card.text and "6 → 4" in card.text
    assert f"{report['perplexity_before']:.4f}" in card.text and f"{report['perplexity_after']:.4f}" in card.text
    assert f"{report['calibration_tokens']:,}" in card.text
    assert report["lineage"]["datasets"]["calibration"]["digest"] in card.text
    assert report["lineage"]["datasets"]["evaluation"]["digest"] in card.text
    assert f"{report['solver'][0]['relative_residual']:.4g}" in card.text
    assert "alpha: 0.0" in card.text
    ours, _, theirs = card.text.partition("## Original model card")
    assert "68.4" not in ours and "68.4" in theirs  # the source's claims only under its heading
    assert "\n### Meta Llama 3\n" in theirs and "# not a heading" in theirs  # demoted; code untouched
    assert "facebook" not in text and text.count("\n---\n") == 1  # its front matter is not ours
    assert SECRET not in text and "token: '***'" in text
    assert not (out / "model" / "TRAINING.json").exists()


def test_a_card_states_no_perplexity_until_evaluate_measured_it(tmp_path, source, monkeypatch):
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(settings(source, out)))
    main = str(recipe.__file__).replace("recipe.py", "__main__.py")
    for step in ("profile", "calibrate", "merge"):
        monkeypatch.setattr(sys, "argv", [main, step, "--config", str(config), "--set", f"token={SECRET}"])
        assert cli.main([step, "--config", str(config), "--quiet"]) == 0
    card, text = read_card(out)
    assert "Not measured" in card.text and "| this model |" not in card.text and "perplexity_after" not in text
    assert f"python -m replaceme merge --config {config} --set 'token=***'" in card.text and SECRET not in text
    assert "base_model" not in card.data.to_dict()  # a local folder is no Hub model
    assert cli.main(["evaluate", "--config", str(config), "--quiet"]) == 0
    card, _ = read_card(out)
    report = json.loads((out / "report.json").read_text())
    assert "Not measured" not in card.text and f"| this model | {report['perplexity_after']:.4f} |" in card.text


def test_a_card_without_eval_data_claims_no_perplexity(tmp_path, source):
    out = tmp_path / "out"
    recipe.run(validate_config(settings(source, out, eval=None)), progress=False)
    card, _ = read_card(out)
    assert "Not measured" in card.text and "perplexity |" not in card.text


def test_card_helpers():
    meta, body = split_front_matter(SOURCE_CARD)
    assert meta["license"] == "llama3" and body.startswith("# Meta Llama 3")
    assert split_front_matter("# no front matter") == ({}, "# no front matter")
    assert demote_headings("# a\n```\n# b\n```\n###### c\n#nope", 2) == "### a\n```\n# b\n```\n###### c\n#nope"
    assert command_line(["/x/replaceme/__main__.py", "run", "--set", "storage.options.secret_key=abc",
                         "--set", "mlflow.tracking_uri=http://u:pw@host"]) == (
        "python -m replaceme run --set 'storage.options.secret_key=***' --set 'mlflow.tracking_uri=http://u:***@host'")
    assert command_line(["/x/ops/merge.py", "--config", "c.yaml"]) == "python -m ops.merge --config c.yaml"
    assert command_line(["/usr/bin/pytest", "-q"]) is None  # not our command line: the card says so


# --- push to the Hub -------------------------------------------------------------------------------


class RecordingHub:
    """Stands in for ``huggingface_hub.HfApi``: records each call and what the uploaded folder held."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", {"repo_id": repo_id, **options}))

    def create_branch(self, repo_id, **options):
        self.calls.append(("create_branch", {"repo_id": repo_id, **options}))

    def upload_folder(self, **options):
        from pathlib import Path

        folder = Path(options["folder_path"])
        files = sorted(p.name for p in folder.iterdir())
        self.calls.append(("upload_folder", {**options, "files": files, "card": (folder / "README.md").read_text()}))


@pytest.fixture
def hub(monkeypatch):
    RecordingHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    return RecordingHub.calls


def test_push_to_hub_uploads_the_published_model_folder_with_its_card(tmp_path, source, hub, caplog):
    out = tmp_path / "out"
    caplog.set_level("DEBUG")
    recipe.run(validate_config(settings(source, out, token=SECRET, output={
        "push_to_hub": "my-org/llama-pruned", "revision": "minus2", "shard_size": "1GB"})), progress=False)
    assert [name for name, _ in hub] == ["init", "create_repo", "create_branch", "upload_folder"]
    assert hub[0][1]["token"] == SECRET
    assert hub[1][1] == {"repo_id": "my-org/llama-pruned", "repo_type": "model", "private": True, "exist_ok": True}
    assert hub[2][1] == {"repo_id": "my-org/llama-pruned", "branch": "minus2", "repo_type": "model", "exist_ok": True}
    upload = hub[3][1]
    assert upload["folder_path"] == str(out / "model")  # the published folder, not the staging one
    assert upload["repo_id"] == "my-org/llama-pruned" and upload["revision"] == "minus2"
    assert "model-00001-of-00001.safetensors" in upload["files"] and "config.json" in upload["files"]
    assert "Original model card" in upload["card"] and "| this model |" in upload["card"]
    assert SECRET not in caplog.text and SECRET not in (out / "report.json").read_text()


def test_push_to_hub_without_a_token_is_refused_before_any_model_pass(tmp_path, source, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # and nothing stored by `hf auth login`
    monkeypatch.setattr(recipe, "Context", lambda *a, **k: pytest.fail("the model was opened"))
    with pytest.raises(ReplaceMeError, match=r"^output\.push_to_hub: no Hugging Face token to upload to my-org/x"):
        recipe.run(validate_config(settings(source, tmp_path / "out", output={"push_to_hub": "my-org/x"})),
                   progress=False)
    assert not (tmp_path / "out").exists() and hub == []


def test_push_to_hub_without_a_token_is_one_line_from_the_command_line(tmp_path, source):
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(settings(source, tmp_path / "out", output={"push_to_hub": "my-org/x"})))
    home = tmp_path / "hf-home"  # no stored token there
    result = replaceme_cli("run", "--config", str(config), "--quiet",
                           env={"HF_TOKEN": "", "HF_HOME": str(home), "HF_TOKEN_PATH": str(home / "token")})
    assert_one_line_error(result, USER_ERROR, "output.push_to_hub: no Hugging Face token", "hf auth login")
    assert "step: profile" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("output", "message"), [
    ({"shard_size": "5 parsecs"}, "'output.shard_size': must be a positive size"),
    ({"shard_size": 0}, "'output.shard_size': must be a positive size"),
    ({"dtype": "int8"}, "'output.dtype': Input should be 'source', 'bfloat16', 'float16' or 'float32'"),
    ({"push_to_hub": "no-org"}, "'output.push_to_hub': must be a Hugging Face repo id"),
    ({"privat": True}, "unknown key 'output.privat'; did you mean 'output.private'?"),
])
def test_bad_output_settings_name_the_field(tmp_path, output, message):
    with pytest.raises(ReplaceMeError, match=message.replace("(", r"\(").replace("?", r"\?").replace(".", r"\.")):
        validate_config({"model_path": "org/model", "dataset": "data.jsonl", "output": output})


def test_push_to_hub_with_save_transform_only_is_refused(tmp_path):
    from replaceme.hub import hub_token

    config = validate_config(settings("org/model", tmp_path / "out", token=SECRET, save_transform_only=True,
                                      output={"push_to_hub": "my-org/x"}))
    with pytest.raises(ReplaceMeError, match=r"^output\.push_to_hub: my-org/x would get no model: save_transform_only"):
        hub_token(config)


def test_a_failed_upload_says_the_outputs_are_complete_and_never_shows_the_token(tmp_path, monkeypatch):
    from replaceme.hub import push_model

    class FailingHub(RecordingHub):
        def upload_folder(self, **options):
            raise OSError(f"403 Forbidden for token {SECRET}")

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingHub)
    (tmp_path / "out" / "model").mkdir(parents=True)
    config = validate_config(settings("org/model", tmp_path / "out", output={"push_to_hub": "my-org/x"}))
    with pytest.raises(ReplaceMeError) as failed:
        push_model(config, SECRET)
    message = str(failed.value)
    assert message.startswith(f"output.push_to_hub: the run is complete in {tmp_path / 'out'}, but uploading")
    assert "403 Forbidden" in message and SECRET not in message
    assert f"hf upload my-org/x {tmp_path / 'out' / 'model'}" in message
