"""Write the pruned checkpoint by streaming the source, one tensor at a time.

Each source shard becomes one output shard: removed layers are dropped, later layers renumbered,
and the fold tensor of layer ``s-1`` replaced by its folded version. Every other tensor is copied
byte for byte, so peak memory is one tensor, whatever the model's size. The config gets the new
layer count and shortened per-layer lists; tokenizer and other small files are copied.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from replaceme.checkpoint import DTYPE_NAMES, Checkpoint, SafetensorsWriter, iter_layer_indices, tensor_to_bytes
from replaceme.families import Family, family_for, prune_config

Block = tuple[int, int]


@dataclass(frozen=True)
class _Planned:
    source: str  # tensor name in the source checkpoint
    target: str  # tensor name in the output
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def kept_layers(num_layers: int, blocks: Sequence[Block]) -> list[int]:
    removed = {i for s, e in blocks for i in range(s, e)}
    return [i for i in range(num_layers) if i not in removed]


def fold_targets(family: Family, transforms: dict[Block, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source tensor name → map folded into it."""
    return {f"{family.layer_prefix}{s - 1}.{family.fold_tensor}": t for (s, _), t in transforms.items()}


def merge_checkpoint(source: Checkpoint, transforms: dict[Block, torch.Tensor], out_fs, out_root: str,
                     *, progress: bool = True) -> dict:
    """Write the pruned model into ``out_root`` (an existing empty folder); returns the new config."""
    family = family_for(source.config, source.field)
    blocks = sorted(transforms)
    kept = kept_layers(source.config["num_hidden_layers"], blocks)
    renumber = {old: new for new, old in enumerate(kept)}
    folds = fold_targets(family, transforms)
    plan = _plan(source, family.layer_prefix, renumber)
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=sum(len(p) for p in plan), desc="merge", unit="tensor", disable=not progress, leave=False) as bar:
        for number, tensors in enumerate(plan, start=1):
            shard = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
            with out_fs.open(f"{out_root}/{shard}", "wb") as handle:
                writer = SafetensorsWriter(handle, [(p.target, p.dtype, p.shape, p.nbytes) for p in tensors])
                for planned in tensors:
                    writer.write(planned.target, _output_bytes(source, planned, folds, family))
                    weight_map[planned.target] = shard
                    total += planned.nbytes
                    bar.update()
                writer.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_text(out_fs, f"{out_root}/model.safetensors.index.json", json.dumps(index, indent=2))
    for name in source.non_weight_files():
        out_fs.pipe_file(f"{out_root}/{name}", source.fs.cat_file(f"{source.root}/{name}"))
    config = prune_config(source.config, kept)
    _write_text(out_fs, f"{out_root}/config.json", json.dumps(config, indent=2))  # last: marks the folder usable
    return config


def _plan(source: Checkpoint, prefix: str, renumber: dict[int, int]) -> list[list[_Planned]]:
    """Output shards (one per non-empty source shard) and the tensors each will hold, in order."""
    by_shard: dict[str, list[_Planned]] = {}
    layer_of = {name: index for name, index, _ in iter_layer_indices(source.weight_map, prefix)}
    for name, shard in sorted(source.weight_map.items()):
        index = layer_of.get(name)
        if index is not None and index not in renumber:
            continue
        target = name if index is None else f"{prefix}{renumber[index]}.{name[len(prefix):].partition('.')[2]}"
        dtype, shape, nbytes = _describe(source, name)
        by_shard.setdefault(shard, []).append(_Planned(name, target, dtype, shape, nbytes))
    return [tensors for _, tensors in sorted(by_shard.items()) if tensors]


def _describe(source: Checkpoint, name: str) -> tuple[str, tuple[int, ...], int]:
    entry = source.entries.get(name)
    if entry is not None:
        return entry.dtype, entry.shape, entry.nbytes
    tensor = source.load(name)  # pickle checkpoints: no header to read shapes from
    return DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), tensor.numel() * tensor.element_size()


def _output_bytes(source: Checkpoint, planned: _Planned, folds: dict[str, torch.Tensor], family: Family) -> bytes:
    if planned.source in folds:
        return tensor_to_bytes(family.fold(source.load(planned.source), folds[planned.source]))
    entry = source.entries.get(planned.source)
    return source.read_bytes(entry) if entry is not None else tensor_to_bytes(source.load(planned.source))


def _write_text(fs, path: str, text: str) -> None:
    with fs.open(path, "w") as handle:
        handle.write(text + "\n")
