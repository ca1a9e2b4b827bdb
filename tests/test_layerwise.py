"""The layer-by-layer engine reproduces the model's own forward, family by family."""

from __future__ import annotations

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
