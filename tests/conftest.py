"""Shared fixtures: tiny random models of every supported family, built from configs here.

Nothing is downloaded: the configs are written out, weights initialised with a fixed seed and
saved as several safetensors shards, and a small byte-level BPE tokenizer is trained on the
bundled calibration text.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from mlflow_server import mlflow_server  # noqa: F401 - session fixture, defined once here
from ray_cluster import ray_head, use_ray_token_auth  # noqa: F401 - session fixture, defined once here
from s3_server import read_only_s3, s3_server  # noqa: F401 - session fixtures, defined once here

use_ray_token_auth()  # before any test module imports Ray
# Runs record themselves in MLflow by default (sqlite:///mlflow.db in the working directory): point
# them at a store of the session's own, also for Ray heads and jobs started from here.
_MLFLOW_STORE = tempfile.mkdtemp(prefix="replaceme-tests-mlflow-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_MLFLOW_STORE}/mlflow.db"
atexit.register(shutil.rmtree, _MLFLOW_STORE, ignore_errors=True)
# Evaluations cache the source model's perplexity (replaceme.evalcache): in a folder of the session's
# own, never the user's ~/.cache; tests of the cache itself point eval.cache at their tmp_path.
_EVAL_CACHE = tempfile.mkdtemp(prefix="replaceme-tests-cache-")
os.environ["REPLACEME_CACHE"] = _EVAL_CACHE
atexit.register(shutil.rmtree, _EVAL_CACHE, ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = ROOT / "examples" / "shakespeare-llama-16l"
CALIB = ROOT / "examples" / "data" / "calib.jsonl"
EVAL = ROOT / "examples" / "data" / "eval.jsonl"
VOCAB = 320

COMMON = dict(vocab_size=VOCAB + 64,  # room for tokens a family's tokenizer class adds
              hidden_size=64, intermediate_size=96, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)

FAMILY_CONFIGS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=8),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=3),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False),
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                        sliding_window_pattern=3),
}


def texts(path: Path = CALIB, limit: int | None = None) -> list[str]:
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def build_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE tokenizer (no pad token, like Llama's) trained on bundled text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(limit=200), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def build_tiny_model(folder: Path, tokenizer_dir: Path, model_type: str = "llama", *,
                     dtype: torch.dtype = torch.float32, shard_size: str = "60KB", **overrides) -> Path:
    """A random model of ``model_type`` saved as several shards, with the test tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    family = next(k for k, v in FAMILY_CONFIGS.items() if v["model_type"] == model_type)
    settings = {**COMMON, **FAMILY_CONFIGS[family], **overrides}
    config = AutoConfig.for_model(**settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # make every layer matter: default init leaves norms at one and tiny updates
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, max_shard_size=shard_size)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


def write_config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path
