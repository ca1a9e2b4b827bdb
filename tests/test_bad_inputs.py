"""Bad input ends in one clear message, before any work, and never in a half-written output."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CALIB, EVAL, build_tiny_model, write_config
from replaceme import cli, recipe
from replaceme.config import load_config, validate_config
from replaceme.data import load_texts
from replaceme.errors import ReplaceMeError
from user_cli import INTERRUPTED, ROOT, TRACKING_FAILED, USER_ERROR, assert_one_line_error, replaceme_cli, snapshot


def config_for(model, tmp_path, **changes):
    values = dict(model_path=str(model), dataset=str(CALIB), eval=str(EVAL), output_dir=str(tmp_path / "out"),
                  max_length=32, dataset_size=16, blocks=[[2, 4]])
    return validate_config({**values, **changes})


def fails(config, message):
    with pytest.raises(ReplaceMeError) as error:
        recipe.run(config, progress=False)
    assert message in str(error.value)
    return str(error.value)


def test_missing_model_or_dataset(tmp_path, tiny_llama):
    fails(config_for(tmp_path / "nowhere", tmp_path), "model_path:")
    fails(config_for(tiny_llama, tmp_path, dataset=str(tmp_path / "none.jsonl")), "dataset:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("blocks, message", [
    ([[4, 7]], "ends past the model's last layer"),
    ([[1, 7]], "would remove 6 of the model's 6 layers"),
])
def test_blocks_checked_against_the_model(tmp_path, tiny_llama, blocks, message):
    fails(config_for(tiny_llama, tmp_path, blocks=blocks), message)


def test_block_size_checked_against_the_model(tmp_path, tiny_llama):
    fails(config_for(tiny_llama, tmp_path, blocks=None, layers_to_skip=6), "layers_to_skip")


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_llama):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_llama, model)
    tensors = {}
    for shard in model.glob("*.safetensors"):
        tensors.update(load_file(shard))
        shard.unlink()
    (model / "model.safetensors.index.json").unlink()
    torch.save(tensors, model / "pytorch_model.bin")
    fails(config_for(model, tmp_path), "allow_pickle: true")
    report = recipe.run(config_for(model, tmp_path, allow_pickle=True), progress=False)
    assert report["perplexity_after"] > 0 and (tmp_path / "out" / "model" / "config.json").exists()


def test_output_inside_the_source_model_refused(tmp_path, tiny_llama):
    fails(config_for(tiny_llama, tmp_path, output_dir=str(tiny_llama / "pruned")), "inside the source model")


def test_existing_output_refused_without_overwrite(tmp_path, tiny_llama):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    fails(config_for(tiny_llama, tmp_path), "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_crash_leaves_nothing_that_looks_finished(tmp_path, tiny_llama, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(recipe, "merge_checkpoint", broken)
    with pytest.raises(RuntimeError):
        recipe.run(config_for(tiny_llama, tmp_path), progress=False)
    assert not (tmp_path / "out").exists()


def test_non_finite_activations_name_the_layer(tmp_path, tokenizer_dir):
    model = build_tiny_model(tmp_path / "nan", tokenizer_dir)
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.3.mlp.down_proj.weight"
    shard = model / index[name]
    tensors = load_file(shard)
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, shard, metadata={"format": "pt"})
    fails(config_for(model, tmp_path, blocks=[[5, 6]]), "non-finite activations after decoder layer 3")


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, tiny_llama):
    model = tmp_path / "gpt"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    message = fails(config_for(model, tmp_path), "model_type 'gpt2' is not supported")
    assert "gemma2" in message and "llama" in message and "qwen3" in message


def test_gemma_full_map_refused_with_the_reason(tmp_path, tokenizer_dir):
    model = build_tiny_model(tmp_path / "gemma", tokenizer_dir, "gemma2", head_dim=16, query_pre_attn_scalar=16)
    message = fails(config_for(model, tmp_path), "diag: true")
    assert "post_feedforward_layernorm" in message
    report = recipe.run(config_for(model, tmp_path, diag=True), progress=False)
    assert report["perplexity_after"] > 0


def test_lm_eval_tasks_need_lm_eval(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    config = config_for(tiny_llama, tmp_path, eval={"dataset": str(EVAL), "lm_eval_tasks": ["hellaswag"]})
    fails(config, "pip install 'replaceme[eval]'")
    assert not (tmp_path / "out").exists()


# --- interrupted runs --------------------------------------------------------------------------


@contextmanager
def sigint_as_in_a_terminal() -> Iterator[None]:
    """Children started here get SIGINT's default action, as a terminal's foreground job does. The
    tests may run as a shell's background job (``cmd &`` without job control), which starts with
    SIGINT ignored; a child inherits that through exec and rightly keeps ignoring it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handled signal is reset on exec
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_run_is_one_line_and_publishes_nothing(tmp_path, tiny_llama):
    """SIGINT to the whole process group, as a terminal sends it: the run and its MLflow tracking child
    both stop without a traceback, exit 130, and no output folder appears."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", model_path=str(tiny_llama), dataset=str(CALIB), eval=str(EVAL),
                          output_dir=str(out), max_length=128, dataset_size=256, batch_size=4, blocks=[[2, 4]],
                          mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    with sigint_as_in_a_terminal():
        process = subprocess.Popen([sys.executable, "-m", "replaceme", "run", "--config", str(config), "--quiet"],
                                   cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "out.incomplete").exists():  # the run is under way
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    assert_one_line_error(result, INTERRUPTED, "interrupted", "nothing was published")
    assert not out.exists()
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the tracking child is gone too
        os.killpg(process.pid, 0)


def test_ctrl_c_in_a_pipeline_step_is_one_line(monkeypatch, capsys):
    from ops.common import Step

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    step = Step("calibrate", help="")
    monkeypatch.setattr(Step, "run", interrupted)
    try:
        code = step.main(["--set", "model_path=m", "--set", "dataset=d"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped Step.main")
    assert code == INTERRUPTED
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: interrupted") and "steps/calibrate.json" in line


# --- warnings with the numbers -----------------------------------------------------------------


def replaceme_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "replaceme" and r.levelno == logging.WARNING]


def test_more_texts_requested_than_the_data_holds_warns_once(tmp_path, tiny_llama, caplog):
    config = config_for(tiny_llama, tmp_path, dataset_size=8000, eval={"dataset": str(EVAL), "dataset_size": 1000})
    with caplog.at_level(logging.WARNING, logger="replaceme"):
        ctx = recipe.Context(config, progress=False)
    assert (len(ctx.texts), len(ctx.eval_texts)) == (256, 128)
    warned = replaceme_warnings(caplog)
    calibration = [w for w in warned if w.startswith("dataset_size: 8000 requested but")]
    evaluation = [w for w in warned if w.startswith("eval.dataset_size: 1000 requested but")]
    assert len(calibration) == 1 and "256 non-empty texts; using 256" in calibration[0] and str(CALIB) in calibration[0]
    assert len(evaluation) == 1 and "128 non-empty texts; using 128" in evaluation[0]


def test_texts_longer_than_the_model_context_are_cut_to_it_with_a_warning(tmp_path, tiny_llama, caplog):
    model = tmp_path / "short-context"
    shutil.copytree(tiny_llama, model)
    settings = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "max_position_embeddings": 16}))
    config = config_for(model, tmp_path, max_length=64, eval={"dataset": str(EVAL), "max_length": 48})
    with caplog.at_level(logging.WARNING, logger="replaceme"):
        ctx = recipe.Context(config, progress=False)
        assert max(b.input_ids.shape[1] for b in ctx.batches) == 16
        assert max(b.input_ids.shape[1] for b in ctx.eval_batches) == 16
    warned = replaceme_warnings(caplog)
    calibration = [w for w in warned if w.startswith("max_length: 64 ")]
    evaluation = [w for w in warned if w.startswith("eval.max_length: 48 ")]
    assert len(calibration) == 1 and len(evaluation) == 1, warned
    assert "max_position_embeddings 16" in calibration[0] and "of 16 texts" in calibration[0]
    assert "cut to 16 tokens" in calibration[0]


def test_texts_within_the_context_give_no_warning(tmp_path, tiny_llama, caplog):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": f"a short text, number {i}"}) + "\n" for i in range(16)))
    config = config_for(tiny_llama, tmp_path, dataset=str(short), eval=str(short), max_length=4096)  # context: 256
    with caplog.at_level(logging.WARNING, logger="replaceme"):
        ctx = recipe.Context(config, progress=False)
        assert ctx.batches and ctx.eval_batches
    assert not [w for w in replaceme_warnings(caplog) if "max_length" in w or "requested" in w]


# --- messages ----------------------------------------------------------------------------------


def test_missing_column_names_the_config_key(tmp_path, tiny_llama):
    fails(config_for(tiny_llama, tmp_path, dataset_column="content"), "set dataset_column")
    message = fails(config_for(tiny_llama, tmp_path, eval={"dataset": str(EVAL), "dataset_column": "body"}),
                    "set eval.dataset_column")
    assert message.startswith("eval.dataset:") and "'text'" in message
    rows = tmp_path / "ids.jsonl"
    rows.write_text('{"id": 1, "text": "a b c"}\n')
    with pytest.raises(ReplaceMeError, match="set eval.dataset_column to a text column"):
        load_texts(str(rows), column="id", field="eval.dataset")


def test_config_that_is_a_folder_is_one_clear_line(tmp_path):
    result = replaceme_cli("run", "--config", str(tmp_path), cwd=tmp_path)
    line = assert_one_line_error(result, USER_ERROR, str(tmp_path), "is a folder")
    assert "does not exist" not in line


def test_type_errors_never_echo_secrets(tmp_path):
    settings = ["mlflow.tracking_uri=[http://alice:pa55word@mlflow.example:5000]",
                "storage.endpoint_url={url: 'https://bob:hunter2-secret@s3.example', aws_secret_access_key: k3y-s3cret}",
                "mlflow.experiment={token: t0ken-s3cret}"]
    with pytest.raises(ReplaceMeError) as error:
        load_config(None, ["model_path=m", "dataset=d", *settings])
    message = str(error.value)
    assert "'mlflow.tracking_uri'" in message and "'storage.endpoint_url'" in message
    assert "alice:***@mlflow.example" in message
    for secret in ("pa55word", "hunter2", "k3y-s3cret", "t0ken-s3cret"):
        assert secret not in message, message


def test_compare_creates_no_store_where_there_is_none(tmp_path):
    missing = tmp_path / "nothing-here" / "mlflow.db"
    result = replaceme_cli("compare", "--tracking-uri", f"sqlite:///{missing}", cwd=tmp_path)
    assert_one_line_error(result, USER_ERROR, "no runs", str(missing), "--tracking-uri")
    result = replaceme_cli("compare", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})  # the default store
    assert_one_line_error(result, USER_ERROR, "no runs", "MLFLOW_TRACKING_URI")
    assert list(tmp_path.iterdir()) == []


def dead_server(user: str = "alice", password: str = "pa55word-secret") -> str:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://{user}:{password}@127.0.0.1:{sock.getsockname()[1]}"


def test_tracking_hint_and_relog_never_replay_a_redacted_uri(tmp_path, tiny_llama, capsys):
    uri = dead_server()
    out = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", model_path=str(tiny_llama), dataset=str(CALIB), output_dir=str(out),
                          max_length=32, dataset_size=8, blocks=[[2, 4]], save_transform_only=True,
                          mlflow={"tracking_uri": uri})
    assert cli.main(["run", "--config", str(config), "--quiet"]) == TRACKING_FAILED
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "pa55word" not in line and "MLFLOW_TRACKING_PASSWORD" in line
    assert f"mlflow.tracking_uri=http://127.0.0.1:{uri.rsplit(':', 1)[1]}" in line  # no user, no password
    assert not any("***@" in part for part in line.split("`")[1::2]), line  # no redacted URI to copy

    before = snapshot(out)
    assert cli.main(["log", str(out)]) == USER_ERROR  # report.json keeps no password to record with
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "mlflow.tracking_uri" in line and "MLFLOW_TRACKING_PASSWORD" in line and "pa55word" not in line
    assert "--set mlflow.tracking_uri=" in line and "=http://alice:***" not in line
    assert snapshot(out) == before


def test_calibration_and_eval_data_on_s3_use_the_configured_endpoint(tmp_path, tiny_llama, s3_server):
    bucket = s3_server.create_bucket("texts")
    for path in (CALIB, EVAL):
        s3_server.client().put_object(Bucket="texts", Key=f"data/{path.name}", Body=path.read_bytes())
    assert "AWS_ENDPOINT_URL" not in os.environ  # only the config says where the server is
    config = config_for(tiny_llama, tmp_path, dataset=f"{bucket}/data/{CALIB.name}", dataset_size=8,
                        eval={"dataset": f"{bucket}/data/{EVAL.name}", "dataset_size": 4},
                        storage={"endpoint_url": s3_server.endpoint_url})
    ctx = recipe.Context(config, progress=False)
    assert len(ctx.texts) == 8 and len(ctx.eval_texts) == 4
