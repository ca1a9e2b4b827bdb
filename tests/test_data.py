"""Tests for replaceme.data: text loading from every format, errors, and batching."""

from __future__ import annotations

import gzip
import json
import logging
import sys
import uuid

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from replaceme.data import Batch, ensure_pad_token, load_texts, make_batches
from replaceme.errors import ReplaceMeError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes whole decoder layers from a language model.",
    "A linear map replaces the pruned block of layers.",
    "Calibration data is a few thousand short texts.",
]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
SHAREGPT = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Hi?"},
    {"from": "gpt", "value": "Hello."},
]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """Tiny byte-level BPE that prepends <s> like Llama; no pad token, no chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def chat_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_rows(path, rows: list[dict]) -> None:
    """Write rows in the format given by the file extension."""
    name = str(path)
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".csv"):
        pacsv.write_csv(pa.Table.from_pylist(rows), path)
    else:
        raise AssertionError(name)


# --------------------------------------------------------------------------- formats

ROWS = [{"id": i, "text": s} for i, s in enumerate(SENTENCES)]


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet", ".csv"])
def test_row_formats(tmp_path, ext):
    path = tmp_path / f"data{ext}"
    write_rows(path, ROWS)
    assert load_texts(str(path)) == SENTENCES


def test_parquet_reads_only_the_column(tmp_path):
    path = tmp_path / "data.parquet"
    write_rows(path, [{"body": s, "n": i} for i, s in enumerate(SENTENCES)])
    assert load_texts(str(path), column="body") == SENTENCES


def test_csv_numeric_looking_text_stays_text(tmp_path):
    path = tmp_path / "nums.csv"
    path.write_text("text\n12\n3.5\n")
    assert load_texts(str(path)) == ["12", "3.5"]


def test_txt_blank_line_separated(tmp_path):
    path = tmp_path / "docs.TXT"  # extension matching is case-insensitive
    path.write_text("  first doc\nline two  \n\n\n second doc \n   \n\nthird\n")
    assert load_texts(str(path)) == ["first doc\nline two", "second doc", "third"]


def test_jsonl_gz_and_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    lines = [json.dumps(r) for r in ROWS[:2]]
    with gzip.open(path, "wt") as f:
        f.write(lines[0] + "\n\n" + lines[1] + "\n")
    assert load_texts(str(path)) == SENTENCES[:2]


def test_memory_uri():
    uri = f"memory://replaceme-test-{uuid.uuid4().hex}/calib.jsonl"
    with fsspec.open(uri, "w") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS))
    assert load_texts(uri, size=2) == SENTENCES[:2]


def test_file_uri(tmp_path):
    path = tmp_path / "data.json"
    write_rows(path, ROWS)
    assert load_texts(path.as_uri()) == SENTENCES


def test_size_keeps_first_non_empty(tmp_path):
    path = tmp_path / "data.jsonl"
    texts = ["", "a b", "  ", None, "c d", "e"]
    write_rows(path, [{"text": t} for t in texts])
    assert load_texts(str(path), size=2) == ["a b", "c d"]
    assert load_texts(str(path)) == ["a b", "c d", "e"]


# --------------------------------------------------------------------------- conversations


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
def test_sharegpt_conversations_rendered(tmp_path, chat_tokenizer, ext):
    path = tmp_path / f"orca{ext}"
    write_rows(path, [{"conversations": SHAREGPT}])
    texts = load_texts(str(path), column="conversations", tokenizer=chat_tokenizer)
    assert texts == ["<|system|>Be brief.\n<|user|>Hi?\n<|assistant|>Hello.\n"]


def test_openai_style_conversations_in_any_column(tmp_path, chat_tokenizer):
    path = tmp_path / "chat.json"
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    write_rows(path, [{"messages": msgs}])
    texts = load_texts(str(path), column="messages", tokenizer=chat_tokenizer)
    assert texts == ["<|user|>Q\n<|assistant|>A\n"]


@pytest.mark.parametrize("use_tokenizer", [True, False])
def test_conversations_without_chat_template(tmp_path, tokenizer, use_tokenizer):
    path = tmp_path / "orca.jsonl"
    write_rows(path, [{"conversations": SHAREGPT}])
    with pytest.raises(ReplaceMeError, match="no chat template") as err:
        load_texts(str(path), column="conversations", tokenizer=tokenizer if use_tokenizer else None)
    assert "plain text column" in str(err.value)


def test_non_text_column(tmp_path):
    path = tmp_path / "data.jsonl"
    write_rows(path, ROWS)
    with pytest.raises(ReplaceMeError, match="int values"):
        load_texts(str(path), column="id")


# --------------------------------------------------------------------------- load errors


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ReplaceMeError, match="eval.dataset") as err:
        load_texts(missing, field="eval.dataset")
    assert missing in str(err.value) and "does not exist" in str(err.value)


def test_missing_memory_uri():
    uri = f"memory://replaceme-test-{uuid.uuid4().hex}/absent.parquet"
    with pytest.raises(ReplaceMeError, match="not found") as err:
        load_texts(uri)
    assert uri in str(err.value)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet", ".csv"])
def test_missing_column_lists_available(tmp_path, ext):
    path = tmp_path / f"data{ext}"
    write_rows(path, ROWS)
    with pytest.raises(ReplaceMeError, match="no column 'content'") as err:
        load_texts(str(path), column="content")
    msg = str(err.value)
    assert "'id'" in msg and "'text'" in msg and str(path) in msg and msg.startswith("dataset:")


@pytest.mark.parametrize("name", ["data.xlsx", "data.parquet.gz", "data"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("x")
    with pytest.raises(ReplaceMeError, match="unsupported file type") as err:
        load_texts(str(path))
    assert ".jsonl" in str(err.value)


def test_corrupt_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ReplaceMeError, match="line 2 is not valid JSON"):
        load_texts(str(path))


@pytest.mark.parametrize("name", ["bad.parquet", "bad.json", "bad.jsonl.gz"])
def test_corrupt_file_is_wrapped(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not a valid file \xff")
    with pytest.raises(ReplaceMeError) as err:
        load_texts(str(path), field="eval.dataset")
    assert str(err.value).startswith("eval.dataset:") and str(path) in str(err.value)


def test_json_must_be_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"text": "x"}')
    with pytest.raises(ReplaceMeError, match="list of objects"):
        load_texts(str(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_txt(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ReplaceMeError, match="contains no text"):
        load_texts(str(path))


def test_empty_column(tmp_path):
    path = tmp_path / "blank.parquet"
    write_rows(path, [{"text": ""}, {"text": "   "}])
    with pytest.raises(ReplaceMeError, match="contains no text in column 'text'"):
        load_texts(str(path))


def test_hf_id_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ReplaceMeError, match=r"pip install 'replaceme\[hf\]'") as err:
        load_texts("Open-Orca/SlimOrca", split="train")
    assert "Open-Orca/SlimOrca" in str(err.value)


# --------------------------------------------------------------------------- batching


def test_pad_token_falls_back_to_eos(tokenizer, caplog):
    assert tokenizer.pad_token is None
    with caplog.at_level(logging.WARNING, logger="replaceme"):
        ensure_pad_token(tokenizer)
        ensure_pad_token(tokenizer)  # second call: already set, no second warning
    assert tokenizer.pad_token == "</s>"
    warnings = [r for r in caplog.records if r.name == "replaceme" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no pad token" in warnings[0].getMessage()


def test_no_pad_and_no_eos(tokenizer):
    tokenizer.eos_token = None
    with pytest.raises(ReplaceMeError, match="eos"):
        ensure_pad_token(tokenizer)


def test_batches_right_padded_with_masks(tokenizer):
    texts = ["hi", SENTENCES[0], "A linear map", SENTENCES[1], "ok"]
    tokenizer.padding_side = "left"  # make_batches must switch to right padding
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    batches = make_batches(texts, tokenizer, batch_size=2, max_length=512)

    assert [b.input_ids.shape[0] for b in batches] == [2, 2, 1]
    pad_id = tokenizer.pad_token_id
    for i, batch in enumerate(batches):
        assert isinstance(batch, Batch)
        assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
        rows = lengths[2 * i : 2 * i + 2]
        assert batch.input_ids.shape[1] == max(rows)  # padded to longest in batch, not max_length
        assert batch.attention_mask.sum(dim=1).tolist() == rows
        assert batch.num_tokens == sum(rows)
        for r, n in enumerate(rows):
            assert batch.attention_mask[r, :n].eq(1).all() and batch.attention_mask[r, n:].eq(0).all()
            assert batch.input_ids[r, n:].eq(pad_id).all()
            assert batch.input_ids[r, 0] == tokenizer.bos_token_id  # special tokens kept
            assert batch.input_ids[r, :n].tolist() == tokenizer(texts[2 * i + r])["input_ids"]


def test_truncation_to_max_length(tokenizer):
    batches = make_batches([SENTENCES[0], SENTENCES[1]], tokenizer, batch_size=8, max_length=5)
    assert len(batches) == 1
    assert batches[0].input_ids.shape == (2, 5) and batches[0].attention_mask.eq(1).all()
    assert batches[0].num_tokens == 10


def test_short_texts_dropped_in_order(tokenizer):
    # "" tokenizes to just <s> (1 token) and is dropped; order of the rest is kept.
    texts = ["", SENTENCES[2], "", SENTENCES[3]]
    batches = make_batches(texts, tokenizer, batch_size=1, max_length=64)
    got = [b.input_ids[0, : b.num_tokens].tolist() for b in batches]
    assert got == [tokenizer(SENTENCES[2])["input_ids"], tokenizer(SENTENCES[3])["input_ids"]]


def test_all_texts_too_short(tokenizer):
    with pytest.raises(ReplaceMeError, match="too short") as err:
        make_batches(["", ""], tokenizer, batch_size=2, max_length=8, field="eval.dataset")
    assert "eval.dataset" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"batch_size": 0, "max_length": 8}, "batch_size"), ({"batch_size": 1, "max_length": 1}, "max_length")],
)
def test_invalid_batch_args(tokenizer, kwargs, name):
    with pytest.raises(ReplaceMeError, match=name):
        make_batches(SENTENCES, tokenizer, **kwargs)
