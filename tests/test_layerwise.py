"""The layer-by-layer engine reproduces the model's own forward, family by family."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import FAMILY_CONFIGS, build_tiny_model, texts
from replaceme.checkpoint import Checkpoint
from replaceme.data import make_batches
from replaceme.engine import LocalEngine
from replaceme.layerwise import LayerwiseModel


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_hidden_states_match_hf_forward(family, tmp_path, tokenizer_dir):
    folder = build_tiny_model(tmp_path / family, tokenizer_dir, FAMILY_CONFIGS[family]["model_type"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # uneven lengths, longer than the sliding window, so padding and window masks both matter
    samples = [text[: 30 + 25 * i] for i, text in enumerate(texts(limit=6))]
    batches = make_batches(samples, tokenizer, batch_size=3, max_length=40)
    assert any(b.attention_mask.min() == 0 for b in batches), "test needs padded batches"

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with Checkpoint(str(folder)) as checkpoint:
        engine = LocalEngine(LayerwiseModel(checkpoint, device=torch.device("cpu"), dtype=torch.float32),
                             batches, progress=False)
        stream = engine.embed()
        ours = []
        for index in range(engine.model.num_layers):
            stream, _ = engine.run_layer(index, stream)
            ours.append(stream)
        norm, lm_head = engine.model.head()
        for b, batch in enumerate(batches):
            with torch.no_grad():
                out = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                output_hidden_states=True)
            real = batch.attention_mask.bool()
            # hidden_states[k + 1] is layer k's output, except the last entry (after the final norm)
            for k in range(engine.model.num_layers - 1):
                torch.testing.assert_close(ours[k][b][real], out.hidden_states[k + 1][real], rtol=1e-4, atol=1e-5)
            logits = engine.model.logits(ours[-1][b], norm, lm_head)
            torch.testing.assert_close(logits[real], out.logits[real].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capped logits
def test_perplexity_in_logit_slices_matches_hf_loss(family, tmp_path, tokenizer_dir, monkeypatch):
    from replaceme import engine as engine_module

    folder = build_tiny_model(tmp_path / family, tokenizer_dir, FAMILY_CONFIGS[family]["model_type"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batches = make_batches([text[: 40 + 20 * i] for i, text in enumerate(texts(limit=6))], tokenizer,
                           batch_size=3, max_length=40)
    vocab = AutoModelForCausalLM.from_pretrained(folder).config.vocab_size
    monkeypatch.setattr(engine_module, "LOGITS_BYTES", 4 * vocab * 7)  # 7 token rows of logits at a time
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for batch in batches:
        with torch.no_grad():
            logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        valid = batch.attention_mask[:, 1:].bool()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1][valid], batch.input_ids[:, 1:][valid],
                                                         reduction="sum"))
        tokens += int(valid.sum())
    with Checkpoint(str(folder)) as checkpoint:
        ours, counted = LocalEngine(LayerwiseModel(checkpoint, device=torch.device("cpu"), dtype=torch.float32),
                                    batches, progress=False).perplexity()
    assert counted == tokens > 7 * len(batches)  # several slices per batch
    assert ours == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_evaluation_runs_the_unchanged_first_layers_once_and_reports_the_same_perplexities(tmp_path, tiny_llama,
                                                                                         monkeypatch):
    from conftest import CALIB, EVAL
    from replaceme import recipe
    from replaceme.config import validate_config

    config = validate_config(dict(model_path=str(tiny_llama), dataset=str(CALIB), dataset_size=8,
                                  eval={"dataset": str(EVAL), "cache": False},  # the source is evaluated each time
                                  max_length=32, blocks=[[3, 5]], output_dir=str(tmp_path / "out"),
                                  mlflow={"enabled": False}))
    report = recipe.run(config, progress=False)
    ctx = recipe.Context(config, progress=False)
    for model, key in ((tiny_llama, "perplexity_before"), (tmp_path / "out" / "model", "perplexity_after")):
        with Checkpoint(str(model)) as checkpoint:
            full, tokens = LocalEngine(ctx.layerwise(checkpoint), ctx.eval_batches, progress=False).perplexity()
        assert report[key] == full and report["eval_tokens"] == tokens  # bit for bit
    ran, run_layer = [], LocalEngine.run_layer
    monkeypatch.setattr(LocalEngine, "run_layer", lambda self, index, *a, **k: ran.append(index) or
                        run_layer(self, index, *a, **k))
    recipe.evaluate(ctx, recipe.OutputDir(str(tmp_path / "out")))
    assert ran == [0, 1, 2, 3, 4, 5, 2, 3]  # the source's 6 layers, then the pruned model's from layer 2 on
