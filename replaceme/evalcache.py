"""A cache of the source model's perplexity on an evaluation set.

Comparing compressions of one model (ten alphas, other blocks) evaluates the same source model on
the same texts every time. Its perplexity is kept here, under a key made of everything that
shapes it:

- the source checkpoint: the digest of its config and weight index (:func:`lineage.model_identity`)
  and, for every shard, what the filesystem says identifies its bytes (size, mtime, ctime and inode
  locally; ETag, size and version on object stores), because the index alone does not change when a
  shard is rewritten with other weights of the same shapes;
- the evaluation batches themselves (token ids and masks: the texts, the tokenizer, ``max_length``
  and the batch size);
- the compute dtype, the device type, and the versions of replaceme, torch and transformers.

An entry is one small JSON file, ``<cache>/source-perplexity/<key>.json``, written atomically (a
temporary file renamed into place on local disks, a single PUT on object stores) and checked when
read (it carries its key and a digest of its content): an entry that is missing, half-written or
corrupt is recomputed, with a warning, never trusted and never fatal. The cache is
``eval.cache`` (a folder or URI; ``false`` turns it off), else ``$REPLACEME_CACHE``, else
``$XDG_CACHE_HOME/replaceme`` (``~/.cache/replaceme``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem

from replaceme import __version__
from replaceme.checkpoint import Checkpoint, join
from replaceme.config import _redact_input, redact_uri
from replaceme.data import Batch
from replaceme.errors import ReplaceMeError
from replaceme.lineage import model_identity
from replaceme.storage import filesystem

log = logging.getLogger("replaceme")

ENV = "REPLACEME_CACHE"
FORMAT = 1
FOLDER = "source-perplexity"
# What a filesystem's info() may say about a file that changes when its bytes do.
_FILE_IDENTITY = ("size", "mtime", "created", "ino", "ETag", "etag", "VersionId", "version_id", "generation",
                  "md5Hash", "crc32c", "LastModified", "last_modified")


def location(setting: bool | str) -> str | None:
    """The cache folder or URI for ``eval.cache``: ``false`` is no cache, ``true`` the default
    (``$REPLACEME_CACHE``, else ``$XDG_CACHE_HOME/replaceme``, else ``~/.cache/replaceme``)."""
    if setting is False:
        return None
    if setting is True:
        setting = os.environ.get(ENV) or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "replaceme")
    if not setting.strip():
        raise ReplaceMeError("eval.cache: is empty; give a folder or URI, true for the default location "
                             "or false for no cache")
    if "://" in setting:
        return setting.rstrip("/")
    return os.path.abspath(os.path.expanduser(setting))


class PerplexityCache:
    """The source perplexities under one cache folder or URI."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        try:
            self.fs, root = filesystem(self.uri, field="eval.cache", options=storage_options)
        except ValueError as exc:  # an unknown URI scheme
            raise ReplaceMeError(f"eval.cache: cannot open {redact_uri(self.uri)} ({_redact_input(str(exc))}); give a "
                                 "local folder or a URI such as s3://bucket/cache, or false for no cache") from None
        self.root = root.rstrip("/")

    def __repr__(self) -> str:  # storage options may hold secrets: never shown
        return f"PerplexityCache({redact_uri(self.uri)!r})"

    def key(self, checkpoint: Checkpoint, batches: Sequence[Batch], *, dtype: torch.dtype,
            device: torch.device) -> str | None:
        """The entry's key, or None when the filesystem says nothing that identifies a shard's bytes."""
        shards = shard_fingerprints(checkpoint)
        if shards is None:
            log.info("eval.cache: %s tells no modification time or ETag of its shards; the source perplexity is "
                     "computed, not cached", redact_uri(checkpoint.uri))
            return None
        import transformers

        settings = {"format": FORMAT, "model": model_identity(checkpoint)["digest"], "shards": shards,
                    "batches": batches_digest(batches), "dtype": str(dtype), "device": device.type,
                    "versions": {"replaceme": __version__, "torch": torch.__version__,
                                 "transformers": transformers.__version__}}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()

    def entry_uri(self, key: str) -> str:
        return f"{redact_uri(self.uri)}/{FOLDER}/{key}.json"

    def _path(self, key: str) -> str:
        return f"{self.root}/{FOLDER}/{key}.json"

    def get(self, key: str) -> tuple[float, int] | None:
        """(perplexity, tokens) of a valid entry, else None (a bad entry is reported and ignored)."""
        try:
            raw = self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be read must not stop the run
            log.warning("eval.cache: cannot read %s (%s); computing the source perplexity", self.entry_uri(key),
                        _describe(exc))
            return None
        try:
            return _parse(raw, key)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("eval.cache: ignoring the corrupt entry %s (%s); computing the source perplexity and "
                        "replacing it", self.entry_uri(key), exc)
            return None

    def put(self, key: str, perplexity: float, tokens: int, *, source: str) -> None:
        """Store an entry atomically; a cache that cannot be written is reported, not fatal."""
        entry = {"format": FORMAT, "key": key, "perplexity": perplexity, "tokens": tokens,
                 "source_model": redact_uri(source), "replaceme_version": __version__,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        data = json.dumps({"entry": entry, "sha256": _checksum(entry)}, indent=1).encode()
        path = self._path(key)
        try:
            if isinstance(self.fs, LocalFileSystem):
                _write_atomically(path, data)
            else:  # one PUT: an object store shows the whole object or none of it
                self.fs.pipe_file(path, data)
        except Exception as exc:  # noqa: BLE001 - the result is known; only its reuse is lost
            log.warning("eval.cache: cannot write %s (%s); the next evaluation computes the source perplexity again",
                        self.entry_uri(key), _describe(exc))
            return
        log.info("eval.cache: source perplexity stored in %s", self.entry_uri(key))


def shard_fingerprints(checkpoint: Checkpoint) -> dict[str, dict[str, str]] | None:
    """Per weight shard, the fields of its file info that change when its bytes do (one listing of
    the folder: one request on object stores)."""
    fs = checkpoint.fs
    fs.invalidate_cache(checkpoint.root)  # an object store's listing may be cached from before a rewrite
    listing = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info for info in fs.ls(checkpoint.root, detail=True)}
    prints = {}
    for shard in checkpoint.shards():
        info = listing.get(shard) or fs.info(join(checkpoint.root, shard))
        fields = {name: str(info[name]) for name in _FILE_IDENTITY if info.get(name) is not None}
        if set(fields) <= {"size"}:  # the size alone does not tell one set of weights from another
            return None
        prints[shard] = fields
    return prints


def batches_digest(batches: Sequence[Batch]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for tensor in (batch.input_ids, batch.attention_mask):
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _checksum(entry: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def _parse(raw: bytes, key: str) -> tuple[float, int]:
    record = json.loads(raw)
    entry = record["entry"]
    if record.get("sha256") != _checksum(entry):
        raise ValueError("its checksum does not match its content")
    if entry.get("format") != FORMAT or entry.get("key") != key:
        raise ValueError("it was written for another key or format")
    perplexity, tokens = entry["perplexity"], entry["tokens"]
    if not isinstance(perplexity, float) or not math.isfinite(perplexity) or perplexity <= 0:
        raise ValueError(f"perplexity {perplexity!r}")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens {tokens!r}")
    return perplexity, tokens


def _write_atomically(path: str, data: bytes) -> None:
    """A temporary file in the same folder, synced, then renamed over the entry: a reader sees the
    old entry, the new one, or none, never part of one."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_redact_input(str(exc))}" if str(exc) else type(exc).__name__
