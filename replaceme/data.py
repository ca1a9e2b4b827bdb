"""Calibration and evaluation text: loading from files, URIs or the Hub, and batching.

``load_texts`` turns a local path, an fsspec URI (``s3://``, ``memory://`` ...) or a Hugging
Face dataset id into a list of strings; ``make_batches`` tokenizes them into right-padded
:class:`Batch` objects. Every failure a user can cause is raised as :class:`ReplaceMeError`
naming the config field and the path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import fsspec
import fsspec.utils
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from replaceme.errors import ReplaceMeError

logger = logging.getLogger("replaceme")

_FORMATS = (".txt", ".jsonl", ".json", ".parquet", ".csv")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_EXT = re.compile(r"\.[A-Za-z]\w*$")
# ShareGPT/SlimOrca speaker names -> chat-template roles; OpenAI roles map to themselves.
_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Batch:
    """One right-padded batch of token ids."""

    input_ids: torch.LongTensor  # [B, T]
    attention_mask: torch.LongTensor  # [B, T], 1 = real token, 0 = padding

    @property
    def num_tokens(self) -> int:
        """Number of real (non-padding) tokens."""
        return int(self.attention_mask.sum())


# --------------------------------------------------------------------------- loading


def load_texts(
    source: str,
    *,
    column: str = "text",
    split: str = "train",
    size: int | None = None,
    tokenizer: Any = None,
    field: str = "dataset",
    storage_options: dict | None = None,
) -> list[str]:
    """Load the first ``size`` non-empty texts from a file, fsspec URI or Hugging Face dataset.

    Files are read by extension (``.txt``, ``.jsonl``, ``.json``, ``.parquet``, ``.csv``; text
    formats may be compressed, e.g. ``.jsonl.gz``). Row formats take ``column``; conversation
    rows (lists of ``{"from", "value"}`` or ``{"role", "content"}`` turns) are rendered with the
    tokenizer's chat template. ``split`` is only used for Hugging Face dataset ids.
    """
    if size is not None and size < 1:
        raise ReplaceMeError(f"{field}: size must be a positive number of texts or empty, got {size}.")
    if not _URI.match(source):
        path = os.path.expanduser(source)
        if not os.path.exists(path):
            if _looks_like_hf_id(source):
                return _finish(_hf_values(source, column, split, field), size, tokenizer, field, source, column)
            relative = "" if os.path.isabs(path) else f" (relative to {os.getcwd()!r})"
            raise ReplaceMeError(
                f"{field}: file {source!r} does not exist{relative}; "
                "fix the path, or give a Hugging Face dataset id as 'name' or 'org/name'."
            )
        if os.path.isdir(path):
            raise ReplaceMeError(f"{field}: {source!r} is a directory; point it at a data file.")
        source = path

    fmt, compression = _detect_format(source, field)
    try:
        opened = fsspec.open(
            source, mode="rb" if fmt in (".parquet", ".csv") else "rt", encoding="utf-8",
            compression=compression, **(storage_options or {}),
        )
    except (ImportError, ValueError) as exc:  # unknown scheme or its backend is not installed
        raise ReplaceMeError(
            f"{field}: cannot open {source!r}: {str(exc).rstrip('.')}. Install the fsspec backend for this URI "
            "scheme (for s3://: pip install 'replaceme[s3]') and check storage_options."
        ) from exc

    try:
        values = _READERS[fmt](opened, column, field, source)
        return _finish(values, size, tokenizer, field, source, None if fmt == ".txt" else column)
    except ReplaceMeError:
        raise
    except FileNotFoundError as exc:
        raise ReplaceMeError(f"{field}: {source!r} not found; check the path or URI.") from exc
    except (OSError, ValueError, EOFError, zlib.error, pa.ArrowException) as exc:
        # Corrupt/truncated files surface as many low-level types; report them all the same way.
        raise ReplaceMeError(
            f"{field}: cannot read {source!r} as {fmt[1:]}: {str(exc).rstrip('.')}. "
            f"Check that it is a valid, complete {fmt[1:]} file."
        ) from exc


def _looks_like_hf_id(source: str) -> bool:
    """``name`` or ``org/name`` with no file extension."""
    return bool(_HF_ID.fullmatch(source)) and not _FILE_EXT.search(source)


def _detect_format(source: str, field: str) -> tuple[str, str | None]:
    """Return (format extension, fsspec compression or None) from the file name."""
    name = PurePosixPath(source.split("?", 1)[0] if _URI.match(source) else source).name.lower()
    compression = fsspec.utils.infer_compression(name)
    stem = name[: name.rfind(".")] if compression else name
    fmt = PurePosixPath(stem).suffix
    if fmt not in _FORMATS or (compression and fmt == ".parquet"):
        raise ReplaceMeError(
            f"{field}: unsupported file type for {source!r}; use one of "
            f"{', '.join(_FORMATS)} (text formats may be compressed, e.g. .jsonl.gz)."
        )
    return fmt, compression


def _key(field: str, setting: str) -> str:
    """The config key of a data setting: ``dataset_column`` for ``dataset``, ``eval.dataset_size`` for
    ``eval.dataset``."""
    return f"{field}_{setting}"


def _missing_column(field: str, where: str, column: str, available: Iterable[str]) -> ReplaceMeError:
    """``where`` is the already-quoted location, e.g. ``'a.jsonl' line 3``."""
    cols = ", ".join(repr(c) for c in available) or "none"
    return ReplaceMeError(
        f"{field}: {where} has no column {column!r} (available: {cols}); set {_key(field, 'column')} to one of them."
    )


def _read_txt(opened: fsspec.core.OpenFile, column: str, field: str, source: str) -> list[str]:
    """Documents separated by blank lines."""
    with opened as f:
        return [doc.strip() for doc in re.split(r"\n\s*\n", f.read())]


def _read_jsonl(opened: fsspec.core.OpenFile, column: str, field: str, source: str) -> Iterator[Any]:
    with opened as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReplaceMeError(
                    f"{field}: {source!r} line {lineno} is not valid JSON ({exc.msg}); "
                    "fix or remove that line."
                ) from exc
            yield _row_value(row, column, field, f"{source!r} line {lineno}")


def _read_json(opened: fsspec.core.OpenFile, column: str, field: str, source: str) -> Iterator[Any]:
    with opened as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as exc:
            raise ReplaceMeError(f"{field}: {source!r} is not valid JSON: {exc}; fix the file.") from exc
    if not isinstance(rows, list):
        raise ReplaceMeError(
            f"{field}: {source!r} must hold a JSON list of objects; use .jsonl for one object per line."
        )
    for i, row in enumerate(rows):
        yield _row_value(row, column, field, f"{source!r} item {i}")


def _row_value(row: Any, column: str, field: str, where: str) -> Any:
    if not isinstance(row, dict):
        raise ReplaceMeError(f"{field}: {where} is not a JSON object; every row must be an object.")
    if column not in row:
        raise _missing_column(field, where, column, row)
    return row[column]


def _read_parquet(opened: fsspec.core.OpenFile, column: str, field: str, source: str) -> Iterator[Any]:
    with opened as f:
        pf = pq.ParquetFile(f)
        if column not in pf.schema_arrow.names:
            raise _missing_column(field, repr(source), column, pf.schema_arrow.names)
        # Read only the needed column, batch by batch, so `size` can stop early on big files.
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            yield from batch.column(0).to_pylist()


def _read_csv(opened: fsspec.core.OpenFile, column: str, field: str, source: str) -> list[Any]:
    with opened as f:
        # Force the text column to string so e.g. numeric-looking rows are not parsed as ints.
        table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types={column: pa.string()}))
    if column not in table.column_names:
        raise _missing_column(field, repr(source), column, table.column_names)
    return table.column(column).to_pylist()


_READERS: dict[str, Callable[[fsspec.core.OpenFile, str, str, str], Iterable[Any]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def _hf_values(source: str, column: str, split: str, field: str) -> Iterator[Any]:
    """Stream ``column`` of a Hugging Face dataset (needs the optional ``datasets`` package)."""
    try:
        import datasets
    except ImportError as exc:
        raise ReplaceMeError(
            f"{field}: {source!r} is not a local file, so it is read as a Hugging Face dataset id, "
            "which needs the 'datasets' package: pip install 'replaceme[hf]', or pass a local file."
        ) from exc
    try:
        ds = datasets.load_dataset(source, split=split, streaming=True)
        for row in ds:
            if column not in row:
                raise _missing_column(field, repr(source), column, row)
            yield row[column]
    except ReplaceMeError:
        raise
    except Exception as exc:  # datasets raises many types (hub, network, bad split); report all alike
        raise ReplaceMeError(
            f"{field}: cannot load Hugging Face dataset {source!r} (split {split!r}): {exc}. "
            "Check the dataset id and split (dataset_subset), or pass a local file."
        ) from exc


def _finish(
    values: Iterable[Any], size: int | None, tokenizer: Any, field: str, source: str, column: str | None
) -> list[str]:
    """Render raw values to text and keep the first ``size`` non-empty ones (``column`` None: .txt)."""
    in_column = f" in column {column!r}" if column else ""
    where = f"{field}: {source!r} column {column!r}"
    column_key = _key(field, "column")
    texts: list[str] = []
    for value in values:
        text = _to_text(value, tokenizer, where, column_key)
        if text.strip():
            texts.append(text)
            if size is not None and len(texts) >= size:
                break
    if not texts:
        raise ReplaceMeError(
            f"{field}: {source!r} contains no text{in_column}; give data with non-empty texts."
        )
    if size is not None and len(texts) < size:
        logger.warning("%s: %d requested but %r has %d non-empty texts; using %d",
                       _key(field, "size"), size, source, len(texts), len(texts))
    return texts


def _to_text(value: Any, tokenizer: Any, where: str, column_key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _render_chat(value, tokenizer, where, column_key) if value else ""
    raise ReplaceMeError(
        f"{where} holds {type(value).__name__} values, not text or conversation turns; "
        f"set {column_key} to a text column."
    )


def _render_chat(turns: list[Any], tokenizer: Any, where: str, column_key: str) -> str:
    """Render ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) turns via the chat template."""
    messages = []
    for turn in turns:
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if role is None or content is None:
            raise ReplaceMeError(
                f"{where} holds a list that is not conversation turns ({{'from', 'value'}} or "
                f"{{'role', 'content'}}); set {column_key} to a text column."
            )
        messages.append({"role": _ROLES.get(str(role).lower(), str(role)), "content": content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise ReplaceMeError(
            f"{where} holds conversations, but the tokenizer has no chat template to render them; "
            "use a plain text column or a model whose tokenizer has a chat template."
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # templates raise arbitrary errors (e.g. "system role not supported")
        raise ReplaceMeError(
            f"{where}: the tokenizer's chat template rejected a conversation: {exc}; "
            "use a plain text column instead."
        ) from exc


# --------------------------------------------------------------------------- batching


def ensure_pad_token(tokenizer: Any) -> None:
    """Use eos for padding when the tokenizer has no pad token (padding is masked out anyway)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ReplaceMeError(
            "tokenizer: has neither a pad token nor an eos token to pad with; "
            "use a tokenizer that defines pad_token or eos_token."
        )
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning(
        "Tokenizer has no pad token; using eos token %r for padding (padding is masked out).",
        tokenizer.eos_token,
    )


def make_batches(
    texts: list[str], tokenizer: Any, *, batch_size: int, max_length: int, field: str = "dataset",
    context: int | None = None, length_key: str = "max_length",
) -> list[Batch]:
    """Tokenize ``texts`` (truncated to ``max_length``) into right-padded batches, in order.

    Texts of fewer than 2 tokens are dropped: they give no next-token context. Each batch is
    padded to its longest row, not to ``max_length``. ``context`` is the model's
    ``max_position_embeddings``: a ``max_length`` (config key ``length_key``) beyond it is capped
    to it, with a warning when a text is actually cut, because positions the model was never
    trained on give meaningless activations and statistics.
    """
    if batch_size < 1:
        raise ReplaceMeError(f"batch_size must be >= 1, got {batch_size}.")
    if max_length < 2:
        raise ReplaceMeError(f"max_length must be >= 2, got {max_length}.")
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"

    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if context is not None and max_length > context:
        longer = sum(len(row) > context for row in encoded)
        if longer:
            logger.warning(
                "%s: %d is longer than the model's context (max_position_embeddings %d): %d of %d texts of %s "
                "have more than %d tokens and are cut to %d tokens (positions past the context give meaningless "
                "statistics)", length_key, max_length, context, longer, len(encoded), field, context, context)
            encoded = [row[:context] for row in encoded]
    ids = [row for row in encoded if len(row) >= 2]
    if not ids:
        raise ReplaceMeError(
            f"{field}: calibration data too short: no text gives at least 2 tokens; "
            "give longer texts or check the column."
        )
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = {"input_ids": ids[start : start + batch_size]}
        enc = tokenizer.pad(chunk, padding="longest", return_tensors="pt")
        batches.append(Batch(input_ids=enc["input_ids"].long(), attention_mask=enc["attention_mask"].long()))
    return batches
