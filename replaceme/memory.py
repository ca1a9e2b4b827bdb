"""The in-process engine's memory budget, and how a pass spends it.

A pass over the calibration (or evaluation) set holds three things: the decoder layers' weights,
the hidden states of the batches it is working on, and fixed costs (statistics accumulators,
cached layer arguments, one layer's temporaries). Only the second grows with the data, so the
batches are taken a *chunk* at a time — layer-major inside a chunk — and the chunk is sized to
what the budget leaves:

* **resident** weights: every layer the pass runs fits the budget next to a chunk. Each layer is
  read once and kept, and the chunks run one after the other through them (batch-major, like the
  paper's code). A chunk is then capped at :data:`RESIDENT_CHUNK_BYTES`: larger buys nothing.
* **streamed** weights: they do not fit. One layer at a time is read, and re-read for every
  chunk, so the chunk takes all the room that is left (fewer re-reads).

The same arithmetic prints the in-process memory need in ``replaceme plan``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from replaceme.errors import ReplaceMeError

AUTO_SHARE = 0.6  # of the memory free when a pass starts, for engine.memory_budget: auto
RESIDENT_CHUNK_BYTES = 2 * 2**30
KWARGS_CACHE_BYTES = 512 * 2**20  # cached per-layer arguments (masks, rotary tables), at most
LOGITS_BYTES = 64 * 2**20  # float32 logits held at once by the evaluation, at most
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")


def parse_size(value: str | int | float, field: str = "engine.memory_budget") -> int:
    """``64GB``, ``512MiB``, ``1.5e9`` or a number of bytes, as bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if not match or match.group(2) not in _UNITS:
            raise ReplaceMeError(f"{field}: {value!r} is not a size; write e.g. 64GB, 512MiB or auto")
        size = float(match.group(1)) * _UNITS[match.group(2)]
    if size <= 0:
        raise ReplaceMeError(f"{field}: {value!r} must be positive")
    return int(size)


def free_bytes(device: torch.device) -> int:
    """Memory free for this process now: the device's, or the host's within any cgroup limit (a pod)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    free = _meminfo_available()
    limit = _cgroup_room()
    return min(free, limit) if limit is not None else free


def resolve_budget(setting: str | int | None, device: torch.device) -> int:
    """``engine.memory_budget`` in bytes: as set, or :data:`AUTO_SHARE` of what is free now."""
    if setting is None or setting == "auto":
        return int(AUTO_SHARE * free_bytes(device))
    return parse_size(setting)


def held_fits(held: int, room: int) -> bool:
    """Whether memory held through a whole pass (candidate statistics, rows kept for a solver) fits
    ``room`` (a budget, or the memory free): it may take half, the other half is the pass's own."""
    return held <= room // 2


@dataclass(frozen=True)
class ChunkPlan:
    """How a pass over ``num_batches`` batches spends ``budget`` bytes."""

    budget: int
    weights_bytes: int  # every layer the pass runs, at the compute dtype
    largest_layer_bytes: int
    resident: bool  # the weights stay loaded across chunks
    fixed_bytes: int  # accumulators, cached arguments, one layer's temporaries
    batch_bytes: int  # hidden states one batch holds during the pass
    chunk_batches: int
    num_batches: int
    kwargs_bytes: int = 0  # of fixed_bytes: cached layer arguments
    logits_bytes: int = 0  # of fixed_bytes: one slice of float32 logits (evaluation)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_batches / self.chunk_batches)

    @property
    def peak_bytes(self) -> int:
        """The estimate of what the pass holds at its peak."""
        weights = self.weights_bytes if self.resident else self.largest_layer_bytes
        return weights + self.fixed_bytes + self.chunk_batches * self.batch_bytes

    def describe(self) -> str:
        mode = "weights resident" if self.resident else "weights streamed (re-read per chunk)"
        return (f"{self.num_chunks} chunk(s) of {self.chunk_batches} batch(es), {mode}; "
                f"about {gib(self.peak_bytes)} of a {gib(self.budget)} budget")


@dataclass(frozen=True)
class BatchShape:
    """What one batch of a pass holds, from the model's shape and the batches' size."""

    batch_size: int
    length: int
    hidden: int
    intermediate: int
    heads: int
    dtype_bytes: int

    def state_bytes(self) -> int:
        """One hidden state of the batch (every token, padding included)."""
        return self.batch_size * self.length * self.hidden * self.dtype_bytes

    def layer_temporaries(self) -> int:
        """What one decoder layer allocates while it runs the batch: the MLP's gate, up and
        activation outputs, Q/K/V/attention outputs, and the attention scores (float32 when not fused)."""
        tokens = self.batch_size * self.length
        return (tokens * (3 * self.intermediate + 4 * self.hidden) * self.dtype_bytes
                + self.batch_size * self.heads * self.length ** 2 * 4)


def profile_states(block_size: int, statistics: bool) -> int:
    """Hidden states per token the profile pass holds: the window of the last L+1 layers' rows (and
    their X taps, for the candidates' statistics), the layer's input and its output."""
    return block_size + 3 + (block_size + 1 if statistics else 0)


CALIBRATION_STATES = 4  # h_{s-1}, X, the block's output, the layer's output
EVALUATION_STATES = 3  # the shared prefix, the stream, the layer's output


def plan_pass(shape: BatchShape, *, budget: int, layer_bytes: list[int], states: int, fixed_bytes: int,
              num_batches: int, batches_per_shard: int = 1, what: str = "calibration",
              kwargs_cache: int = KWARGS_CACHE_BYTES, logits: int = 0) -> ChunkPlan:
    """A pass's chunk plan: ``states`` hidden states per token alive, ``fixed_bytes`` of its own
    (accumulators, LM heads) next to one layer's temporaries, and cached layer arguments and logit
    slices that take at most an eighth of the budget each."""
    kwargs_bytes, logits_bytes = min(kwargs_cache, budget // 8), min(logits, budget // 8)
    fixed = fixed_bytes + shape.layer_temporaries() + kwargs_bytes + 2 * logits_bytes
    return plan_chunks(budget=budget, layer_bytes=layer_bytes, batch_bytes=states * shape.state_bytes(),
                       fixed_bytes=fixed, num_batches=num_batches, batches_per_shard=batches_per_shard, what=what,
                       kwargs_bytes=kwargs_bytes, logits_bytes=logits_bytes)


def plan_chunks(*, budget: int, layer_bytes: list[int], batch_bytes: int, fixed_bytes: int, num_batches: int,
                batches_per_shard: int = 1, what: str = "calibration", kwargs_bytes: int = 0,
                logits_bytes: int = 0) -> ChunkPlan:
    """The chunk size (in batches) for a pass, and whether its weights stay resident."""
    weights, largest = sum(layer_bytes), max(layer_bytes, default=0)
    resident = weights + fixed_bytes + batch_bytes <= budget
    if resident:
        room = min(budget - weights - fixed_bytes, max(RESIDENT_CHUNK_BYTES, batch_bytes))
    else:
        room = budget - largest - fixed_bytes
        if room < batch_bytes:
            need = largest + fixed_bytes + batch_bytes
            raise ReplaceMeError(
                f"engine.memory_budget: {gib(budget)} cannot hold one layer ({gib(largest)}), the pass's fixed "
                f"{gib(fixed_bytes)} and one {what} batch ({gib(batch_bytes)}); raise it to at least {gib(need)}, "
                "or lower batch_size or max_length")
    chunk = max(1, min(num_batches, room // max(batch_bytes, 1)))
    if batches_per_shard < chunk < num_batches:  # whole data shards, so a chunk never splits one
        chunk -= chunk % batches_per_shard
    return ChunkPlan(budget, weights, largest, resident, fixed_bytes, batch_bytes, int(chunk), num_batches,
                     kwargs_bytes, logits_bytes)


def release_freed_memory() -> None:
    """Hand the host memory freed since the last call back to the kernel (glibc's ``malloc_trim``;
    nothing elsewhere). Called between chunks: glibc raises its mmap threshold each time a large
    block is freed, after which blocks of that size come from the heap, and what a chunk frees
    there would otherwise stay resident and add up chunk after chunk (benchmarks/memory_budget.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)


def gib(nbytes: float) -> str:
    """A size for people: GiB, or MiB / KiB below one (a 10 kB budget is not "0.00 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes / 2**10:,.2f} KiB"


def _meminfo_available() -> int:
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 (or v1) memory limit, None when there is no limit."""
    for limit_file, usage_file in ((_CGROUP / "memory.max", _CGROUP / "memory.current"),
                                   (_CGROUP / "memory/memory.limit_in_bytes", _CGROUP / "memory/memory.usage_in_bytes")):
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None
