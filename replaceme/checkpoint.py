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
import pickle
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import IO, Any

import torch
from fsspec.implementations.local import LocalFileSystem

from replaceme.errors import ReplaceMeError
from replaceme.storage import filesystem

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
PICKLE_SINGLE_FILE = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
# A tokenizer needs one of these vocabularies (fast tokenizer, SentencePiece model, BPE or WordPiece vocab).
TOKENIZER_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")

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
    handle.seek(0)  # handles are cached and shared with tensor reads
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
        self.fs, self.root = filesystem(self.uri, field=field, options=storage_options)
        self._handles: dict[str, IO[bytes]] = {}
        self._pickle_shards: dict[str, dict[str, torch.Tensor]] = {}
        self._check_exists()

    # --- metadata ---------------------------------------------------------------------------

    def _check_exists(self) -> None:
        try:
            exists = self.fs.isdir(self.root)
        except Exception as exc:  # noqa: BLE001 - storage errors (auth, endpoint) surface here first
            raise ReplaceMeError(f"{self.field}: cannot reach {self.uri}: {exc}") from None
        if not exists:
            raise ReplaceMeError(f"{self.field}: {self.uri} is not a directory; point it at a Hugging Face checkpoint folder")
        if not self.fs.exists(join(self.root, "config.json")):
            raise ReplaceMeError(f"{self.field}: {self.uri} has no config.json; is it a Hugging Face checkpoint folder?")

    @cached_property
    def config(self) -> dict[str, Any]:
        config = self._read_json("config.json")
        if not isinstance(config, dict):
            raise ReplaceMeError(f"{self.field}: {join(self.uri, 'config.json')} is not a JSON object "
                                 f"(it holds a {type(config).__name__}); restore the model's config.json")
        return config

    def _read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_text(name))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ReplaceMeError(f"{self.field}: {join(self.uri, name)} is not valid JSON ({exc}); "
                                 "restore or re-download it") from None

    def read_text(self, name: str) -> str:
        with self.fs.open(join(self.root, name), "r") as handle:
            return handle.read()

    def files(self) -> list[str]:
        """Names of the files directly in the checkpoint folder (not its sub-folders, such as the
        ``.cache/`` of ``hf download`` or Llama 3's ``original/``)."""
        return sorted(info["name"].rstrip("/").rsplit("/", 1)[-1] for info in self.fs.ls(self.root, detail=True)
                      if info.get("type") != "directory")

    def non_weight_files(self) -> list[str]:
        """Config, tokenizer and other small files (everything but weights and their index)."""
        skip = {INDEX_FILE, PICKLE_INDEX_FILE, "config.json"}
        return [f for f in self.files() if f not in skip and not f.endswith(WEIGHT_SUFFIXES)]

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name → shard file name."""
        files = set(self.files())
        if INDEX_FILE in files:
            return self._index_weight_map(INDEX_FILE)
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
                return self._index_weight_map(PICKLE_INDEX_FILE)
            return {name: PICKLE_SINGLE_FILE for name in self._pickle_shard(PICKLE_SINGLE_FILE)}
        raise ReplaceMeError(f"{self.field}: {self.uri} has no safetensors weights (model.safetensors or {INDEX_FILE})")

    def _index_weight_map(self, name: str) -> dict[str, str]:
        index = self._read_json(name)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ReplaceMeError(f"{self.field}: {join(self.uri, name)} has no weight_map of tensor names to "
                                 "shard files; restore or re-download it")
        return weight_map

    def validate(self, layer_prefix: str = "model.layers.") -> None:
        """Check, before any layer runs, what would otherwise fail halfway through a run: the config,
        that every shard is there and complete, that the weights hold the layers the config counts,
        that pickle shards hold plain tensors, and that there is a tokenizer."""
        weight_map = self.weight_map  # (refuses folders without weights, and pickles unless allowed)
        sizes = self._file_sizes()
        missing = [shard for shard in self.shards() if shard not in sizes]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ReplaceMeError(f"{self.field}: shard {join(self.uri, missing[0])}{more} named in the weight index "
                                 "is missing; the checkpoint is incomplete, download the missing files")
        ends: dict[str, int] = {}
        for entry in self.entries.values():
            ends[entry.shard] = max(ends.get(entry.shard, 0), entry.end)
        for shard in self.shards():
            if shard.endswith(".safetensors"):
                self._check_complete(shard, ends.get(shard, 0), sizes[shard])
            else:
                self._check_pickle(shard)
        for name, shard in weight_map.items():
            if shard.endswith(".safetensors") and name not in self.entries:
                raise ReplaceMeError(f"{self.field}: tensor {name!r} is listed under {join(self.uri, shard)} in the "
                                     "weight index, but that shard does not hold it; re-download the checkpoint")
        self._check_layer_count(layer_prefix)
        self._check_tokenizer(set(sizes))

    def _file_sizes(self) -> dict[str, int]:
        return {info["name"].rstrip("/").rsplit("/", 1)[-1]: int(info.get("size") or 0)
                for info in self.fs.ls(self.root, detail=True)}

    def _check_complete(self, shard: str, end: int, size: int) -> None:
        """A shard cut short (an interrupted download or copy) ends before its header says it does."""
        if end > size:
            raise ReplaceMeError(f"{self.field}: shard {join(self.uri, shard)} is truncated: its header needs "
                                 f"{end} bytes but the file has {size}; the download or copy is incomplete, "
                                 "re-download it")

    def _check_layer_count(self, layer_prefix: str) -> None:
        declared = self.config.get("num_hidden_layers")
        if not isinstance(declared, int) or isinstance(declared, bool) or declared < 1:
            raise ReplaceMeError(f"{self.field}: {join(self.uri, 'config.json')} has num_hidden_layers "
                                 f"{declared!r}; it must be the model's (positive) number of decoder layers")
        layers = sorted({index for _, index, _ in iter_layer_indices(self.weight_map, layer_prefix)})
        if layers != list(range(len(layers))):
            gap = next(i for i in range(len(layers) + 1) if i not in layers)
            raise ReplaceMeError(f"{self.field}: the weights in {self.uri} have no tensors for decoder layer {gap} "
                                 f"(they hold layers up to {layers[-1]}); the checkpoint is incomplete, re-download it")
        if len(layers) != declared:
            raise ReplaceMeError(f"{self.field}: config.json says num_hidden_layers: {declared} but the weights in "
                                 f"{self.uri} hold {len(layers)} decoder layers; the config and the weights must "
                                 "come from the same model")

    def _check_tokenizer(self, files: set[str]) -> None:
        if not files.intersection(TOKENIZER_VOCABULARIES):
            raise ReplaceMeError(f"{self.field}: {self.uri} has no tokenizer files (none of "
                                 f"{', '.join(TOKENIZER_VOCABULARIES)}); copy the base model's tokenizer into it")

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
            raise ReplaceMeError(f"{self.field}: shard {join(self.uri, shard)} is not a readable safetensors file ({exc}); "
                                 "it may be truncated or corrupt, re-download it") from None

    def _pickle_shard(self, shard: str) -> dict[str, torch.Tensor]:
        if shard not in self._pickle_shards:
            with self.fs.open(join(self.root, shard), "rb") as handle:  # one pickle shard in memory at a time
                self._pickle_shards = {shard: self._torch_load(shard, handle)}
        return self._pickle_shards[shard]

    def _check_pickle(self, shard: str) -> None:
        """Unpickle a shard under the weights-only guard; a local file is memory-mapped, so only its
        pickle is read, not its tensor data."""
        if isinstance(self.fs, LocalFileSystem):
            try:
                self._torch_load(shard, join(self.root, shard), mmap=True)
                return
            except _NotZipFormat:  # the legacy format cannot be memory-mapped: read it whole
                pass
        self._pickle_shard(shard)

    def _torch_load(self, shard: str, source: Any, mmap: bool = False) -> dict[str, torch.Tensor]:
        where = join(self.uri, shard)
        try:
            state = torch.load(source, map_location="cpu", weights_only=True, **({"mmap": True} if mmap else {}))
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f" (it pickles {found.group(1)})" if found else ""
            raise ReplaceMeError(f"{self.field}: {where} is not a plain tensor checkpoint{what}; convert the "
                                 "checkpoint to safetensors with the library that wrote it") from None
        except RuntimeError as exc:
            if mmap and "zipfile" in str(exc).lower():
                raise _NotZipFormat from None
            raise ReplaceMeError(f"{self.field}: {where} is not a readable PyTorch checkpoint "
                                 f"({_first_line(exc)}); re-download it or convert it to safetensors") from None
        except (EOFError, ValueError, OSError) as exc:
            raise ReplaceMeError(f"{self.field}: {where} is not a readable PyTorch checkpoint "
                                 f"({_first_line(exc)}); re-download it or convert it to safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ReplaceMeError(f"{self.field}: {where} is not a plain tensor checkpoint (a dict of tensor names to "
                                 "tensors); convert the checkpoint to safetensors with the library that wrote it")
        return state


class _NotZipFormat(Exception):
    """A legacy (pre-zipfile) torch.save file: it cannot be memory-mapped."""


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip() and "weights_only" not in line]
    return lines[0].split(". ")[0][:200] if lines else type(exc).__name__


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
