"""Write the pruned checkpoint by streaming the source, one tensor at a time.

Each source shard becomes one output shard: removed layers are dropped, later layers renumbered,
and the fold tensor of layer ``s-1`` replaced by its folded version. Every other tensor is copied
byte for byte, so peak memory is one tensor, whatever the model's size. The config gets the new
layer count and shortened per-layer lists; tokenizer and other small files are copied.

The work is split in three so that the shards can be written by any process, in any order
(:mod:`replaceme.distributed.merge` writes them on Ray workers): :func:`plan_merge` decides what
goes where from the source's metadata alone, :func:`write_shard` writes one output shard from
scratch, and :func:`finish_merge` writes the index, the small files and, last, the config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from replaceme.checkpoint import (
    DTYPE_NAMES,
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

Block = tuple[int, int]


@dataclass(frozen=True)
class PlannedTensor:
    source: str  # tensor name in the source checkpoint
    target: str  # tensor name in the output
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    entry: TensorEntry | None  # byte range in the source shard, so a writer needs no headers; None for pickles


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
                     *, progress: bool = True) -> dict:
    """Write the pruned model into ``out_root`` (an existing empty folder); returns the new config."""
    plan = plan_merge(source, transforms)
    with progress_display(total=sum(s.nbytes for s in plan.shards), desc="merge", unit="B", unit_scale=True,
                          disable=not progress) as bar:
        for shard in plan.shards:
            write_shard(source, shard, plan.folds_for(shard), plan.family, out_fs, out_root)
            bar.update(shard.nbytes)
    return finish_merge(source, plan, out_fs, out_root)


def plan_merge(source: Checkpoint, transforms: dict[Block, torch.Tensor]) -> MergePlan:
    """Output shards (one per non-empty source shard) and the tensors each will hold, in order."""
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
        by_shard.setdefault(shard, []).append(_planned(source, name, target))
    groups = [tensors for _, tensors in sorted(by_shard.items()) if tensors]
    shards = [ShardPlan(f"model-{number:05d}-of-{len(groups):05d}.safetensors", tuple(tensors))
              for number, tensors in enumerate(groups, start=1)]
    return MergePlan(family, kept, fold_targets(family, transforms), shards)


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
    for name in source.non_weight_files():
        out_fs.pipe_file(f"{out_root}/{name}", source.fs.cat_file(f"{source.root}/{name}"))
    config = prune_config(source.config, plan.kept)
    _write_text(out_fs, f"{out_root}/config.json", json.dumps(config, indent=2))
    return config


def _planned(source: Checkpoint, name: str, target: str) -> PlannedTensor:
    entry = source.entries.get(name)
    if entry is not None:
        return PlannedTensor(name, target, entry.dtype, entry.shape, entry.nbytes, entry)
    tensor = source.load(name)  # pickle checkpoints: no header to read shapes from
    return PlannedTensor(name, target, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape),
                         tensor.numel() * tensor.element_size(), None)


def _output_bytes(source: Checkpoint, planned: PlannedTensor, folds: dict[str, torch.Tensor], family: Family) -> bytes:
    if planned.source in folds:
        return tensor_to_bytes(family.fold(_load(source, planned), folds[planned.source]))
    return source.read_bytes(planned.entry) if planned.entry is not None else tensor_to_bytes(source.load(planned.source))


def _load(source: Checkpoint, planned: PlannedTensor) -> torch.Tensor:
    """The tensor from its planned byte range: a writer never reads the other shards' headers."""
    entry = planned.entry
    if entry is None:
        return source.load(planned.source)
    return tensor_from_bytes(source.read_bytes(entry), entry.dtype, entry.shape)


def _write_text(fs, path: str, text: str) -> None:
    with fs.open(path, "w") as handle:
        handle.write(text + "\n")
