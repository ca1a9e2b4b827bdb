"""The activation store: per-shard statistics and (X, Y, residual) rows of every block, on a
``file://`` or ``s3://`` URI, written by calibration workers and read back by the solvers.

Layout under ``{uri}/{run_id}/``::

    blocks/{s}-{e}/stats/shard-{n:05d}.safetensors      BlockStats of data shard n (float64)
    blocks/{s}-{e}/rows/shard-{n:05d}-{attempt}.parquet  rows of shard n, one file per attempt
    blocks/{s}-{e}/shards/{n:05d}.json                   commit record of shard n (written last)
    blocks/{s}-{e}/manifest.json                         the block's committed parts (written last of all)
    transforms/{s}-{e}.safetensors                       optional solved map

Why it is shaped like this:

* A shard counts as done only once its commit record exists, and the record is written after
  the files it names, so a worker that dies mid-write leaves nothing that looks finished; a
  retry writes a new part (``attempt`` in the name) and the old one is simply never referenced.
  Records are deterministic, so committing a shard twice is harmless (resume, duplicate tasks).
* The manifest pins every part's size and SHA-256, so a truncated, corrupted or missing part is
  found before a solver trusts it; parts the manifest does not name are leftovers and ignored.
* Rows are Parquet with ``fixed_size_list<float16>[hidden]`` columns: half the bytes of float32,
  readable row group by row group, by any Parquet tool. float16 holds magnitudes up to 65504 only:
  a value beyond that (or a NaN/inf) is refused with an error naming the block and the column
  rather than silently written as inf.
* The object holds plain data only and opens its fsspec filesystem lazily, so it pickles cheaply
  to Ray actors, each of which opens its own connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from replaceme.blocks import Block
from replaceme.errors import ReplaceMeError
from replaceme.stats import BlockStats
from replaceme.storage import filesystem

log = logging.getLogger("replaceme")

COLUMNS = ("x", "y", "residual")
FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FORMAT_VERSION = 1
HASH_CHUNK = 8 * 2**20


def block_name(block: Block) -> str:
    return f"{block[0]}-{block[1]}"


class ActivationStore:
    """One run's activation store. Picklable; the filesystem is opened on first use in each process."""

    def __init__(self, uri: str, run_id: str, *, endpoint_url: str | None = None,
                 options: dict[str, Any] | None = None, row_group_rows: int = 8192,
                 field: str = "activations.uri") -> None:
        if row_group_rows < 1:
            raise ValueError("row_group_rows must be at least 1")
        self.uri = uri.rstrip("/")
        self.run_id = run_id
        self.endpoint_url = endpoint_url
        self.options = dict(options or {})
        self.row_group_rows = row_group_rows
        self.field = field
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root: str | None = None

    # --- plumbing ----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_root": None}

    def __repr__(self) -> str:  # options may hold secrets: never shown
        return f"ActivationStore({self.location!r})"

    @property
    def location(self) -> str:
        """The run's URI, as shown in messages."""
        return f"{self.uri}/{self.run_id}"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, root = filesystem(self.location, field=self.field, endpoint_url=self.endpoint_url,
                                        options=self.options)
            self._root = root.rstrip("/")
        return self._fs

    def _path(self, relative: str) -> str:
        self.fs  # noqa: B018 - opens the filesystem and sets the root
        return f"{self._root}/{relative}"

    @contextlib.contextmanager
    def _io(self, what: str, relative: str = "") -> Iterator[None]:
        """Turn any storage failure into one line naming the URI (never the options: they may hold keys)."""
        uri = f"{self.location}/{relative}".rstrip("/")
        try:
            yield
        except ReplaceMeError:
            raise
        except PermissionError:
            raise ReplaceMeError(f"{self.field}: no permission to {what} {uri}; check the credentials and the "
                                 "bucket policy") from None
        except FileNotFoundError:
            raise ReplaceMeError(f"{self.field}: cannot {what} {uri}: it does not exist (is the bucket created?); "
                                 f"create it or point {self.field} elsewhere") from None
        except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
            raise ReplaceMeError(f"{self.field}: cannot {what} {uri} ({type(exc).__name__}: {_first_line(exc)}); "
                                 "check that the storage endpoint is reachable") from None

    def _put(self, relative: str, data: bytes) -> None:
        """Write a whole small file so that readers see either nothing or all of it: object stores
        publish a PUT atomically; on a local disk write aside and rename."""
        path = self._path(relative)
        with self._io("write", relative):
            if isinstance(self.fs, LocalFileSystem):
                self.fs.makedirs(self.fs._parent(path), exist_ok=True)
                temporary = f"{path}.tmp-{uuid.uuid4().hex}"
                self.fs.pipe_file(temporary, data)
                os.replace(temporary, path)
            else:
                self.fs.pipe_file(path, data)

    def _get(self, relative: str) -> bytes:
        with self._io("read", relative):
            return self.fs.cat_file(self._path(relative))

    def _exists(self, relative: str) -> bool:
        with self._io("read", relative):
            return self.fs.exists(self._path(relative))

    def check(self) -> None:
        """Write and delete a probe file now, so that a down endpoint, a missing bucket or missing
        permissions stop the run before calibration rather than after it.

        Object stores have no directories, so nothing is created there first — in particular a
        missing bucket is reported, not created (s3fs ``makedirs`` would create it)."""
        probe = f".replaceme-write-probe-{uuid.uuid4().hex}"
        with self._io("write to", ""):
            if isinstance(self.fs, LocalFileSystem):
                self.fs.makedirs(self._root, exist_ok=True)
            self.fs.pipe_file(self._path(probe), b"ok")
            self.fs.rm_file(self._path(probe))

    # --- paths -------------------------------------------------------------------------------

    @staticmethod
    def stats_relpath(block: Block, shard: int) -> str:
        return f"blocks/{block_name(block)}/stats/shard-{shard:05d}.safetensors"

    @staticmethod
    def part_relpath(block: Block, shard: int, attempt: int) -> str:
        return f"blocks/{block_name(block)}/rows/shard-{shard:05d}-{attempt}.parquet"

    @staticmethod
    def record_relpath(block: Block, shard: int) -> str:
        return f"blocks/{block_name(block)}/shards/{shard:05d}.json"

    @staticmethod
    def manifest_relpath(block: Block) -> str:
        return f"blocks/{block_name(block)}/manifest.json"

    @staticmethod
    def transform_relpath(block: Block) -> str:
        return f"transforms/{block_name(block)}.safetensors"

    # --- writing (workers) ---------------------------------------------------------------------

    def row_writer(self, block: Block, shard: int, attempt: int = 0) -> RowWriter:
        """A streaming Parquet writer for the rows of one attempt at one data shard."""
        return RowWriter(self, block, self.part_relpath(block, shard, attempt))

    def commit_shard(self, block: Block, shard: int, stats: BlockStats, part: dict[str, Any] | None = None) -> dict:
        """Publish a shard: its statistics first, then the commit record naming them and the part.

        Idempotent: the record holds no timestamps, so committing the same shard again (a resumed
        run, a task that ran twice) rewrites the same meaning."""
        if part is not None and part["rows"] != stats.tokens:
            raise ValueError(f"block {block_name(block)} shard {shard}: the part holds {part['rows']} rows but the "
                             f"statistics count {stats.tokens} tokens")
        raw = stats.to_bytes()
        record: dict[str, Any] = {
            "format": FORMAT_VERSION, "block": list(block), "shard": shard, "tokens": stats.tokens,
            "stats": {"path": self.stats_relpath(block, shard), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()},
            "part": part,
        }
        self._put(record["stats"]["path"], raw)
        self._put(self.record_relpath(block, shard), json.dumps(record, indent=1, sort_keys=True).encode())
        return record

    def committed_shards(self, block: Block) -> dict[int, dict]:
        """The shards of ``block`` whose commit record exists (what a resumed run can skip)."""
        folder = self._path(f"blocks/{block_name(block)}/shards")
        with self._io("list", f"blocks/{block_name(block)}/shards"):
            self.fs.invalidate_cache(folder)  # other processes commit: never trust a cached listing
            try:
                names = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")]
            except FileNotFoundError:
                return {}
        records = {}
        for name in sorted(names):
            relative = f"blocks/{block_name(block)}/shards/{name.rsplit('/', 1)[-1]}"
            try:
                record = json.loads(self._get(relative))
            except ValueError:
                log.warning("ignoring unreadable commit record %s/%s; that shard will be recomputed", self.location, relative)
                continue
            records[int(record["shard"])] = record
        return records

    def load_stats(self, block: Block, shard: int) -> BlockStats:
        record = self._record(block, shard)
        raw = self._get(record["stats"]["path"])
        if hashlib.sha256(raw).hexdigest() != record["stats"]["sha256"]:
            raise ReplaceMeError(f"{self.location}/{record['stats']['path']} does not match its commit record "
                                 f"(checksum); re-run calibration for block {block_name(block)}")
        return BlockStats.from_bytes(raw)

    def reduce_stats(self, block: Block) -> BlockStats:
        """The sum of every committed shard's statistics."""
        shards = self.committed_shards(block)
        if not shards:
            raise ReplaceMeError(f"{self.location}: no committed statistics for block {block_name(block)}; "
                                 "run calibration for that block")
        first, *rest = sorted(shards)
        total = self.load_stats(block, first)
        for shard in rest:
            total += self.load_stats(block, shard)
        return total

    def write_manifest(self, block: Block, hidden: int, *, expected_shards: int | None = None) -> dict:
        """Seal a block from its commit records (driver, after every shard is committed).

        ``expected_shards`` makes a missing shard an error instead of a silently smaller set."""
        records = self.committed_shards(block)
        if expected_shards is not None:
            missing = sorted(set(range(expected_shards)) - set(records))
            if missing:
                raise ReplaceMeError(f"{self.location}: block {block_name(block)} has no commit for shards {missing}; "
                                     "re-run calibration to finish them")
        parts = [{**records[n]["part"], "shard": n} for n in sorted(records) if records[n]["part"] is not None]
        for part in parts:
            if part["hidden"] != hidden:
                raise ReplaceMeError(f"{self.location}/{part['path']} holds rows of width {part['hidden']}, not the "
                                     f"model's hidden size {hidden}; re-run calibration for block {block_name(block)}")
        manifest = {
            "format": FORMAT_VERSION, "block": list(block), "hidden": hidden, "dtype": "float16",
            "columns": list(COLUMNS), "shards": sorted(records),
            "stats": [records[n]["stats"] for n in sorted(records)],
            "tokens": sum(r["tokens"] for r in records.values()),
            "parts": parts, "rows": sum(p["rows"] for p in parts),
        }
        self._put(self.manifest_relpath(block), json.dumps(manifest, indent=1, sort_keys=True).encode())
        return manifest

    # --- reading (driver, solvers) ---------------------------------------------------------------

    def read_manifest(self, block: Block) -> dict:
        relative = self.manifest_relpath(block)
        if not self._exists(relative):
            raise ReplaceMeError(f"{self.location}: block {block_name(block)} has no manifest, so its calibration "
                                 "did not finish; re-run calibration for that block")
        try:
            return json.loads(self._get(relative))
        except ValueError:
            raise ReplaceMeError(f"{self.location}/{relative} is not valid JSON; re-run calibration for block "
                                 f"{block_name(block)}") from None

    def verify(self, block: Block) -> dict:
        """Check every part the manifest names — present, full size, SHA-256 — streaming each file
        once; returns the manifest. Call once before solving rather than on every pass."""
        manifest = self.read_manifest(block)
        for part in manifest["parts"]:
            self._check_size(block, part)
            digest = hashlib.sha256()
            with self._io("read", part["path"]), self.fs.open(self._path(part["path"]), "rb") as handle:
                while chunk := handle.read(HASH_CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != part["sha256"]:
                raise self._bad_part(block, part, "its checksum does not match the manifest (corrupted)")
        return manifest

    def iter_rows(self, block: Block, batch_rows: int = 8192, *, verify: bool = True
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Stream ``(x, y, residual)`` float32 batches of at most ``batch_rows`` rows, part by part and
        row group by row group, never the whole set.

        With ``verify`` every part is checksummed first (see :meth:`verify`), so no row is yielded
        from a damaged set; without it only sizes and row counts are checked (cheap, for the
        repeated passes of an iterative solver after one verified pass)."""
        manifest = self.verify(block) if verify else self.read_manifest(block)
        hidden = manifest["hidden"]
        for part in manifest["parts"]:
            if not verify:
                self._check_size(block, part)
            with self._io("read", part["path"]), self.fs.open(self._path(part["path"]), "rb") as handle:
                try:
                    reader = pq.ParquetFile(handle)
                    if reader.metadata.num_rows != part["rows"]:
                        raise self._bad_part(block, part, f"it holds {reader.metadata.num_rows} rows, the manifest "
                                                          f"says {part['rows']}")
                    for batch in reader.iter_batches(batch_size=batch_rows, columns=list(COLUMNS)):
                        x, y, residual = (_to_tensor(batch.column(name), hidden) for name in COLUMNS)
                        yield x, y, residual
                except (pa.ArrowException, KeyError, ValueError) as exc:
                    raise self._bad_part(block, part, f"it is not readable Parquet ({_first_line(exc)})") from None

    def _check_size(self, block: Block, part: dict) -> None:
        with self._io("read", part["path"]):
            path = self._path(part["path"])
            self.fs.invalidate_cache(path)  # s3fs may answer from a listing made before the part changed
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                raise self._bad_part(block, part, "it is missing") from None
        if size != part["bytes"]:
            raise self._bad_part(block, part, f"it has {size} bytes, the manifest says {part['bytes']} (truncated?)")

    def _bad_part(self, block: Block, part: dict, why: str) -> ReplaceMeError:
        return ReplaceMeError(f"activation part {self.location}/{part['path']} is unusable: {why}; re-run "
                              f"calibration for block {block_name(block)}")

    def _record(self, block: Block, shard: int) -> dict:
        relative = self.record_relpath(block, shard)
        if not self._exists(relative):
            raise ReplaceMeError(f"{self.location}: shard {shard} of block {block_name(block)} is not committed; "
                                 "re-run calibration for that block")
        return json.loads(self._get(relative))

    # --- transforms ------------------------------------------------------------------------------

    def save_transform(self, block: Block, transform: torch.Tensor) -> None:
        tensor = transform.detach().to("cpu", torch.float32).contiguous()
        self._put(self.transform_relpath(block), save_tensors({block_name(block): tensor}))

    def load_transform(self, block: Block) -> torch.Tensor | None:
        """The saved map of ``block``, or None when none was saved."""
        relative = self.transform_relpath(block)
        if not self._exists(relative):
            return None
        return load_tensors(self._get(relative))[block_name(block)]


class RowWriter:
    """Streams one part: rows are converted to float16, buffered up to one row group and written
    straight into the store's file, hashing the bytes on the way (no second read to checksum).

    ``close()`` returns the part description for :meth:`ActivationStore.commit_shard`, or None when
    no row was written (no file is created then). Used as a context manager, an exception discards
    the partial file."""

    def __init__(self, store: ActivationStore, block: Block, relative: str) -> None:
        self.store, self.block, self.relative = store, block, relative
        self.rows = 0
        self.hidden: int | None = None
        self._pending: list[list[torch.Tensor]] = [[] for _ in COLUMNS]
        self._pending_rows = 0
        self._file: _HashingFile | None = None
        self._writer: pq.ParquetWriter | None = None
        self._part: dict[str, Any] | None = None
        self._closed = False

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor) -> None:
        """Append token rows (float tensors ``[n, hidden]``, any device)."""
        n, hidden = x.shape
        if self.hidden is None:
            self.hidden = hidden
        if any(t.shape != (n, self.hidden) for t in (x, y, residual)):
            raise ValueError(f"rows must all be [n, {self.hidden}]; got {[tuple(t.shape) for t in (x, y, residual)]}")
        halves = [self._half(name, rows) for name, rows in zip(COLUMNS, (x, y, residual), strict=True)]
        for pending, half in zip(self._pending, halves, strict=True):
            pending.append(half)
        self._pending_rows += n
        self.rows += n
        if self._pending_rows >= self.store.row_group_rows:
            self._flush(final=False)

    def close(self) -> dict[str, Any] | None:
        """Finish the file; returns its part description (the same one again if called twice)."""
        if self._closed:
            return self._part
        self._flush(final=True)
        if self._writer is not None and self._file is not None:  # (opened together by the first flush)
            with self.store._io("write", self.relative):
                self._writer.close()
                self._file.close()
            self._part = {"path": self.relative, "rows": self.rows, "hidden": self.hidden,
                          "bytes": self._file.size, "sha256": self._file.digest.hexdigest()}
        self._closed = True
        return self._part

    def abort(self) -> None:
        """Drop the part (best effort: an uncommitted part is ignored by readers anyway)."""
        with contextlib.suppress(Exception):
            if self._file is not None:
                self._file.handle.close()
            self.store.fs.rm_file(self.store._path(self.relative))
        self._writer, self._closed = None, True

    def _half(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.detach()
        # amax on the input is ~10× cheaper than isfinite on the half copy; NaN propagates through it,
        # and values below 65520 round to at most 65504 (float16's largest finite value).
        if rows.numel() and not float(rows.abs().amax()) < 65520.0:
            if not torch.isfinite(rows).all():
                what = "holds non-finite values (NaN or inf)"
            else:
                what = (f"holds values up to {rows.detach().abs().max().item():.6g} in magnitude, beyond float16's "
                        f"maximum {FLOAT16_MAX:.0f}")
            raise ReplaceMeError(f"block {block_name(self.block)}, column {name}: {what}; the activation store keeps "
                                 "rows in float16 and will not write them as inf — use method: lstsq with "
                                 "activations.save_rows: false, which keeps only the float64 statistics")
        return rows.to("cpu", torch.float16)

    def _flush(self, final: bool) -> None:
        """Write whole row groups from the buffer (and the remainder when ``final``)."""
        size = self.store.row_group_rows
        take = self._pending_rows if final else self._pending_rows // size * size
        if take == 0:
            return
        columns = [torch.cat(pending) for pending in self._pending]
        table = pa.table({name: _to_arrow(col[:take]) for name, col in zip(COLUMNS, columns, strict=True)})
        if self._writer is None:
            with self.store._io("write", self.relative):
                path = self.store._path(self.relative)
                if isinstance(self.store.fs, LocalFileSystem):
                    self.store.fs.makedirs(self.store.fs._parent(path), exist_ok=True)
                self._file = _HashingFile(self.store.fs.open(path, "wb"))
            # Dictionary encoding and min/max page statistics buy nothing on float activations (nobody
            # filters them); they cost memory and about 40% of the encoding time.
            self._writer = pq.ParquetWriter(self._file, table.schema, use_dictionary=False, write_statistics=False)
        with self.store._io("write", self.relative):
            self._writer.write_table(table, row_group_size=size)
        # clone: a view of the remainder would keep the whole concatenated buffer alive
        self._pending = [[col[take:].clone()] if take < len(col) else [] for col in columns]
        self._pending_rows -= take


class _HashingFile:
    """A write-only file wrapper that hashes and counts the bytes passing through to ``handle``."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        self.handle.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        if not self.closed:
            self.handle.close()
            self.closed = True


def _to_arrow(rows: torch.Tensor) -> pa.FixedSizeListArray:
    values = pa.array(rows.numpy().reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, rows.shape[1])


def _to_tensor(column: pa.ChunkedArray | pa.Array, hidden: int) -> torch.Tensor:
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    flat = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in chunks]) if chunks else np.empty(0, np.float16)
    return torch.from_numpy(flat.reshape(-1, hidden).astype(np.float32))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no detail"


class StoredRows:
    """A block's rows in the store, as a re-iterable stream for the iterative solvers: the parts are
    checksummed once here, later passes only check sizes and row counts."""

    def __init__(self, store: ActivationStore, block: Block, batch_rows: int = 65536) -> None:
        self.store, self.block, self.batch_rows = store, block, batch_rows
        manifest = store.verify(block)
        if not manifest["parts"] and manifest["tokens"]:
            raise ReplaceMeError(f"activations.save_rows: {store.location} holds only the statistics of block "
                                 f"{block_name(block)}, no rows; method: cosine needs them: re-run calibration with "
                                 "activations.save_rows: true")

    def stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self.store.iter_rows(self.block, self.batch_rows, verify=False)
