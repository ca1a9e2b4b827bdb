"""Sharded Hugging Face checkpoints, read and written one tensor at a time.

A checkpoint is a folder (local path or fsspec URI) with ``config.json``, tokenizer files and
safetensors shards (``model.safetensors`` or ``model-*.safetensors`` + an index). We read each
shard's header once and then fetch single tensors by byte range, so a stage touches only its own
layers and the merge never holds more than one tensor. Writing goes through
:class:`SafetensorsWriter`, which knows every tensor's shape up front and streams the data
after the header (the ``safetensors`` library itself only writes whole dicts).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import IO, Any, Iterable, Iterator

import fsspec
import torch

from replaceme.errors import ReplaceMeError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
PICKLE_SINGLE_FILE = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its shard, dtype, shape and byte range within the shard."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def read_safetensors_header(handle: IO[bytes], shard: str) -> list[TensorEntry]:
    (length,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    data_start = 8 + length
    return [
        TensorEntry(name, shard, info["dtype"], tuple(info["shape"]),
                    data_start + info["data_offsets"][0], data_start + info["data_offsets"][1])
        for name, info in header.items()
    ]


def tensor_from_bytes(raw: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype]).reshape(shape)


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


class Checkpoint:
    """Read-only view of a Hugging Face checkpoint folder; never writes to it."""

    def __init__(self, uri: str, *, storage_options: dict[str, Any] | None = None,
                 allow_pickle: bool = False, field: str = "model_path") -> None:
        self.uri = uri.rstrip("/")
        self.field = field
        self.allow_pickle = allow_pickle
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self._handles: dict[str, IO[bytes]] = {}
        self._pickle_shards: dict[str, dict[str, torch.Tensor]] = {}
        self._check_exists()

    # --- metadata ---------------------------------------------------------------------------

    def _check_exists(self) -> None:
        try:
            exists = self.fs.isdir(self.root)
        except Exception as exc:  # storage errors (auth, endpoint) surface here first
            raise ReplaceMeError(f"{self.field}: cannot reach {self.uri}: {exc}") from None
        if not exists:
            raise ReplaceMeError(f"{self.field}: {self.uri} is not a directory; point it at a Hugging Face checkpoint folder")
        if not self.fs.exists(join(self.root, "config.json")):
            raise ReplaceMeError(f"{self.field}: {self.uri} has no config.json; is it a Hugging Face checkpoint folder?")

    @cached_property
    def config(self) -> dict[str, Any]:
        return json.loads(self.read_text("config.json"))

    def read_text(self, name: str) -> str:
        with self.fs.open(join(self.root, name), "r") as handle:
            return handle.read()

    def files(self) -> list[str]:
        """Names of the files directly in the checkpoint folder."""
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def non_weight_files(self) -> list[str]:
        """Config, tokenizer and other small files (everything but weights and their index)."""
        skip = {INDEX_FILE, PICKLE_INDEX_FILE, "config.json"}
        return [f for f in self.files() if f not in skip and not f.endswith(WEIGHT_SUFFIXES)]

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name → shard file name."""
        files = set(self.files())
        if INDEX_FILE in files:
            return json.loads(self.read_text(INDEX_FILE))["weight_map"]
        if SINGLE_FILE in files:
            return {entry.name: SINGLE_FILE for entry in self._header(SINGLE_FILE)}
        if PICKLE_INDEX_FILE in files or PICKLE_SINGLE_FILE in files:
            if not self.allow_pickle:
                raise ReplaceMeError(
                    f"{self.field}: {self.uri} holds only PyTorch pickle weights (.bin), which can run "
                    "arbitrary code when loaded. Convert the checkpoint to safetensors, or set "
                    "allow_pickle: true if you trust its source."
                )
            if PICKLE_INDEX_FILE in files:
                return json.loads(self.read_text(PICKLE_INDEX_FILE))["weight_map"]
            return {name: PICKLE_SINGLE_FILE for name in self._pickle_shard(PICKLE_SINGLE_FILE)}
        raise ReplaceMeError(f"{self.field}: {self.uri} has no safetensors weights (model.safetensors or {INDEX_FILE})")

    @cached_property
    def entries(self) -> dict[str, TensorEntry]:
        """Every tensor's location, from the shard headers (safetensors checkpoints only)."""
        result: dict[str, TensorEntry] = {}
        for shard in sorted(set(self.weight_map.values())):
            if shard.endswith(".safetensors"):
                result.update((e.name, e) for e in self._header(shard))
        return result

    @cached_property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype the weights are stored in."""
        for entry in self.entries.values():
            if DTYPES[entry.dtype].is_floating_point:
                return DTYPES[entry.dtype]
        return torch.float32

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    # --- tensors ----------------------------------------------------------------------------

    def load(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise ReplaceMeError(f"{self.field}: tensor {name!r} is not in {self.uri}; the checkpoint is incomplete or of another architecture")
        if not shard.endswith(".safetensors"):
            return self._pickle_shard(shard)[name]
        entry = self.entries[name]
        return tensor_from_bytes(self.read_bytes(entry), entry.dtype, entry.shape)

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with ``prefix``, keyed by the rest of the name."""
        names = [n for n in self.weight_map if n.startswith(prefix)]
        return {n[len(prefix):]: self.load(n) for n in names}

    def read_bytes(self, entry: TensorEntry) -> bytes:
        handle = self._handle(entry.shard)
        handle.seek(entry.begin)
        return handle.read(entry.nbytes)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._pickle_shards.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, shard: str) -> IO[bytes]:
        if shard not in self._handles:
            self._handles[shard] = self.fs.open(join(self.root, shard), "rb")
        return self._handles[shard]

    def _header(self, shard: str) -> list[TensorEntry]:
        try:
            return read_safetensors_header(self._handle(shard), shard)
        except (OSError, ValueError, struct.error) as exc:
            raise ReplaceMeError(f"{self.field}: shard {join(self.uri, shard)} is not a readable safetensors file ({exc})") from None

    def _pickle_shard(self, shard: str) -> dict[str, torch.Tensor]:
        if shard not in self._pickle_shards:
            with self.fs.open(join(self.root, shard), "rb") as handle:  # one pickle shard in memory at a time
                self._pickle_shards = {shard: torch.load(handle, map_location="cpu", weights_only=True)}
        return self._pickle_shards[shard]


class SafetensorsWriter:
    """Writes one safetensors file whose tensor list is known before any data is written."""

    def __init__(self, handle: IO[bytes], layout: Iterable[tuple[str, str, tuple[int, ...], int]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape, nbytes in layout:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep data 8-byte aligned, as the format recommends
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        self._handle = handle
        self._next = 0

    def write(self, name: str, raw: bytes) -> None:
        expected, nbytes = self._order[self._next]
        if name != expected or len(raw) != nbytes:
            raise RuntimeError(f"safetensors writer expected {expected} ({nbytes} bytes), got {name} ({len(raw)} bytes)")
        self._handle.write(raw)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"safetensors writer closed after {self._next} of {len(self._order)} tensors")


def iter_layer_indices(names: Iterable[str], prefix: str) -> Iterator[tuple[str, int, str]]:
    """Yield (name, layer index, rest) for names like ``{prefix}{i}.{rest}``."""
    for name in names:
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index.isdigit():
                yield name, int(index), rest
