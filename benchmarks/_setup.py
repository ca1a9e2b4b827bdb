"""What several benchmarks set up: a random bfloat16 Llama saved as a checkpoint, a local Ray, and a point
measured in a fresh interpreter."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "shakespeare-llama-16l"


def random_llama(folder: Path, *, hidden: int, layers: int, vocab: int, kv_heads: int, shard_size: str) -> Path:
    """A random Llama (seed 0, MLP 4× wide, heads of 64) saved in bfloat16 with the bundled tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard_size)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return folder


def start_ray(cpus: int, gpus: int = 0):
    """A local Ray on loopback for one benchmark, with a token of its own in the environment (Ray would
    otherwise write one to ~/.ray/auth_token, where every later `ray start` on the machine finds it)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when Ray is imported
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray

    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    return ray


def run_child(script: str, spec: dict, env: dict[str, str] | None = None) -> dict:
    """``python script --child SPEC`` in a fresh interpreter (``env``: its whole environment); the JSON
    object it prints last. A failed child stops the benchmark with its error."""
    result = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], check=False, capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"child failed ({spec}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
