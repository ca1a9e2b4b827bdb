"""Write the pruned checkpoint by streaming the source, one tensor at a time.

Removed layers are dropped, later layers renumbered, and the fold tensor of layer ``s-1`` replaced
by its folded version. Every other tensor is copied byte for byte (or cast, with an output dtype),
so peak memory is one tensor, whatever the model's size. Output shards hold at most ``shard_size``
bytes (as ``save_pretrained``'s ``max_shard_size``), or mirror the source's shards when it is None.
The config gets the new layer count and shortened per-layer lists; the tokenizer, generation config,
chat template and licence files are copied (:func:`files_to_copy`), never the source's model card,
sub-folders or weights of other formats.

The work is split in three so that the shards can be written by any process, in any order
(:mod:`replaceme.distributed.merge` writes them on Ray workers): :func:`plan_merge` decides what
goes where from the source's metadata alone, :func:`write_shard` writes one output shard from
scratch, and :func:`finish_merge` writes the index, the small files and, last, the config.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from replaceme.blocks import Block
from replaceme.checkpoint import (
    DTYPE_NAMES,
    DTYPES,
    INDEX_FILE,
    Checkpoint,
    SafetensorsWriter,
    TensorEntry,
    iter_layer_indices,
    tensor_from_bytes,
    tensor_to_bytes,
)
from replaceme.families import Family, family_for, prune_config
from replaceme.progress import progress as progress_display

OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # output.dtype → safetensors name
CASTABLE = {"BF16", "F16", "F32", "F64"}  # floating-point weights an output dtype applies to (not int, bool, fp8)
# Small files a checkpoint needs next to its weights (matched case-insensitively): tokenizer, generation
# config, chat template, licence and notices. The source's README.md is not among them: the pruned
# model gets its own card (:mod:`replaceme.card`), which quotes the source's.
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "spiece.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt", "sentencepiece*.model",
    "generation_config.json", "chat_template.json", "chat_template.jinja", "*.jinja", "preprocessor_config.json",
    "processor_config.json", "license", "license.*", "licence", "licence.*", "notice", "notice.*", "use_policy*",
    "*license*.txt", "*license*.md", "*notice*.txt", "*notice*.md",
)


@dataclass(frozen=True)
class PlannedTensor:
    source: str  # tensor name in the source checkpoint
    target: str  # tensor name in the output
    dtype: str  # in the output (safetensors name)
    shape: tuple[int, ...]
    nbytes: int  # in the output
    entry: TensorEntry | None  # byte range in the source shard, so a writer needs no headers; None for pickles
    source_dtype: str = ""  # in the source, when it differs from ``dtype`` (the tensor is cast)


@dataclass(frozen=True)
class ShardPlan:
    name: str  # output file name
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class MergePlan:
    family: Family
    kept: list[int]  # source layer indices that remain, in order
    folds: dict[str, torch.Tensor]  # source tensor name → map folded into it
    shards: list[ShardPlan]
    dtype: str = "source"  # output.dtype: the config names it (transformers loads dtype="auto" by it)

    def folds_for(self, shard: ShardPlan) -> dict[str, torch.Tensor]:
        """The maps one shard needs: a writer elsewhere gets only these, not all of them."""
        return {t.source: self.folds[t.source] for t in shard.tensors if t.source in self.folds}


def kept_layers(num_layers: int, blocks: Sequence[Block]) -> list[int]:
    removed = {i for s, e in blocks for i in range(s, e)}
    return [i for i in range(num_layers) if i not in removed]


def fold_targets(family: Family, transforms: dict[Block, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source tensor name → map folded into it."""
    return {f"{family.layer_prefix}{s - 1}.{family.fold_tensor}": t for (s, _), t in transforms.items()}


def merge_checkpoint(source: Checkpoint, transforms: dict[Block, torch.Tensor], out_fs, out_root: str,
                     *, progress: bool = True, shard_size: int | None = None, dtype: str = "source") -> dict:
    """Write the pruned model into ``out_root`` (an existing empty folder); returns the new config.
    ``shard_size``: the largest output shard in bytes (None: one output shard per source shard);
    ``dtype``: ``source`` or the floating-point dtype of the output weights (see :func:`plan_merge`)."""
    plan = plan_merge(source, transforms, shard_size=shard_size, dtype=dtype)
    with progress_display(total=sum(s.nbytes for s in plan.shards), desc="merge", unit="B", unit_scale=True,
                          disable=not progress) as bar:
        for shard in plan.shards:
            write_shard(source, shard, plan.folds_for(shard), plan.family, out_fs, out_root)
            bar.update(shard.nbytes)
    return finish_merge(source, plan, out_fs, out_root)


def plan_merge(source: Checkpoint, transforms: dict[Block, torch.Tensor], *, shard_size: int | None = None,
               dtype: str = "source") -> MergePlan:
    """Output shards and the tensors each will hold, in order: one per non-empty source shard, or,
    with ``shard_size``, the tensors in source order packed into shards of at most that many bytes
    (a tensor larger than it gets a shard of its own, as with ``save_pretrained``). ``dtype``
    (``bfloat16``, ``float16``, ``float32``) casts every floating-point tensor; ``source`` keeps each one's."""
    if dtype != "source" and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be source or one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    family = family_for(source.config, source.field)
    kept = kept_layers(source.config["num_hidden_layers"], sorted(transforms))
    renumber = {old: new for new, old in enumerate(kept)}
    prefix = family.layer_prefix
    layer_of = {name: index for name, index, _ in iter_layer_indices(source.weight_map, prefix)}
    by_shard: dict[str, list[PlannedTensor]] = {}
    for name, shard in sorted(source.weight_map.items()):
        index = layer_of.get(name)
        if index is not None and index not in renumber:
            continue
        target = name if index is None else f"{prefix}{renumber[index]}.{name[len(prefix):].partition('.')[2]}"
        by_shard.setdefault(shard, []).append(_planned(source, name, target, OUTPUT_DTYPES.get(dtype)))
    groups = [tensors for _, tensors in sorted(by_shard.items()) if tensors]
    if shard_size is not None:
        groups = _pack([t for tensors in groups for t in tensors], shard_size)
    shards = [ShardPlan(f"model-{number:05d}-of-{len(groups):05d}.safetensors", tuple(tensors))
              for number, tensors in enumerate(groups, start=1)]
    return MergePlan(family, kept, fold_targets(family, transforms), shards, dtype)


def write_shard(source: Checkpoint, shard: ShardPlan, folds: dict[str, torch.Tensor], family: Family,
                out_fs, out_root: str) -> None:
    """Write one output shard from scratch (``"wb"``), so writing it again gives the same file."""
    with out_fs.open(f"{out_root}/{shard.name}", "wb") as handle:
        writer = SafetensorsWriter(handle, [(t.target, t.dtype, t.shape, t.nbytes) for t in shard.tensors])
        for planned in shard.tensors:
            writer.write(planned.target, _output_bytes(source, planned, folds, family))
        writer.close()


def finish_merge(source: Checkpoint, plan: MergePlan, out_fs, out_root: str) -> dict:
    """Write the index, the small files and, last, the config, which marks the folder usable;
    call it once every shard is written. Returns the new config."""
    weight_map = {t.target: shard.name for shard in plan.shards for t in shard.tensors}
    index = {"metadata": {"total_size": sum(s.nbytes for s in plan.shards)}, "weight_map": dict(sorted(weight_map.items()))}
    _write_text(out_fs, f"{out_root}/{INDEX_FILE}", json.dumps(index, indent=2))
    for name in files_to_copy(source.files()):
        out_fs.pipe_file(f"{out_root}/{name}", source.fs.cat_file(f"{source.root}/{name}"))
    config = prune_config(source.config, plan.kept)
    if plan.dtype != "source":
        for key in ("dtype", "torch_dtype"):  # transformers 5 writes dtype, 4.x torch_dtype
            if key in config or (key == "dtype" and "torch_dtype" not in config):
                config[key] = plan.dtype
    _write_text(out_fs, f"{out_root}/config.json", json.dumps(config, indent=2))
    return config


def files_to_copy(names: Iterable[str]) -> list[str]:
    """Which of the source folder's top-level files go into the output next to the weights: those a
    checkpoint needs (:data:`COPIED_FILES`). Never the source's model card, its weights in other
    formats (``.bin``, ``.pth``, ``.gguf``, ``consolidated.*``), caches or anything else."""
    return sorted(name for name in names
                  if any(fnmatch.fnmatchcase(name.lower(), pattern) for pattern in COPIED_FILES))


def _pack(tensors: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    return [group for group in groups if group]


def _planned(source: Checkpoint, name: str, target: str, cast: str | None) -> PlannedTensor:
    entry = source.entries.get(name)
    if entry is not None:
        dtype, shape, nbytes = entry.dtype, entry.shape, entry.nbytes
    else:
        tensor = source.load(name)  # pickle checkpoints: no header to read shapes from
        dtype, shape, nbytes = DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), tensor.numel() * tensor.element_size()
    if cast is None or cast == dtype or dtype not in CASTABLE:
        return PlannedTensor(name, target, dtype, shape, nbytes, entry)
    size = nbytes // DTYPES[dtype].itemsize * DTYPES[cast].itemsize
    return PlannedTensor(name, target, cast, shape, size, entry, source_dtype=dtype)


def _output_bytes(source: Checkpoint, planned: PlannedTensor, folds: dict[str, torch.Tensor], family: Family) -> bytes:
    if planned.source not in folds and not planned.source_dtype:
        return source.read_bytes(planned.entry) if planned.entry is not None else tensor_to_bytes(source.load(planned.source))
    tensor = _load(source, planned)
    if planned.source_dtype:  # cast to the output dtype first: the fold rounds once, into it
        tensor = tensor.to(DTYPES[planned.dtype])
    if planned.source in folds:
        tensor = family.fold(tensor, folds[planned.source])
    return tensor_to_bytes(tensor)


def _load(source: Checkpoint, planned: PlannedTensor) -> torch.Tensor:
    """The tensor from its planned byte range: a writer never reads the other shards' headers."""
    entry = planned.entry
    if entry is None:
        return source.load(planned.source)
    return tensor_from_bytes(source.read_bytes(entry), entry.dtype, entry.shape)


def _write_text(fs, path: str, text: str) -> None:
    with fs.open(path, "w") as handle:
        handle.write(text + "\n")
