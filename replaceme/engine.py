"""The in-process engine: every calibration batch through one decoder layer at a time.

Layer-major order means each layer's weights are read once and freed before the next, so
memory holds one layer plus the hidden states of the calibration set — never the whole model —
and nothing past the last layer a block needs is loaded. Three passes are built on it:

* :meth:`LocalEngine.distances` — angular distance between the stream before and after every
  candidate block (block selection);
* :meth:`LocalEngine.calibrate` — the taps ``X`` (MLP output of layer ``s-1``), ``h_{s-1}`` and
  ``h_{e-1}`` for every block, reduced to float64 statistics per data shard of
  ``batches_per_shard`` batches and summed in shard order, as the Ray engine does (and kept as
  activation rows when an iterative estimator needs them). With an activation store, each shard's
  statistics (and rows) are committed there in the layout the Ray stages write, and each block's
  manifest last, so that ``replaceme solve`` re-solves from the store; shards already committed
  for every block are not run again (resume);
* :meth:`LocalEngine.perplexity` — held-out perplexity of a checkpoint, optionally with layers
  skipped.

Padding rows are dropped from every statistic and distance.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from replaceme.activations import ActivationStore, StoredRows
from replaceme.config import EngineConfig
from replaceme.data import Batch
from replaceme.errors import ReplaceMeError
from replaceme.layerwise import LayerwiseModel
from replaceme.stats import AngleSums, BlockStats

log = logging.getLogger("replaceme")
Block = tuple[int, int]
KWARGS_CACHE_BYTES = 512 * 2**20
LOGITS_BYTES = 64 * 2**20  # float32 logits held at once by the perplexity pass
BATCHES_PER_SHARD = EngineConfig.model_fields["batches_per_shard"].default


@dataclass
class Activations:
    """Token rows of one block: ``x`` (MLP output of layer s-1), ``y`` (its target) and
    ``residual`` (the stream after layer s-1 without its MLP output, ``h_{s-1} − X``)."""

    x: list[torch.Tensor] = field(default_factory=list)
    y: list[torch.Tensor] = field(default_factory=list)
    residual: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor) -> None:
        for store, rows in ((self.x, x), (self.y, y), (self.residual, residual)):
            store.append(rows.detach().float().cpu())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.x), torch.cat(self.y), torch.cat(self.residual)

    def stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The rows as one chunk (the interface of rows kept in an activation store)."""
        return iter([self.tensors()])


@dataclass
class BlockCapture:
    block: Block
    stats: BlockStats
    activations: Activations | StoredRows | None


# Given a block's captured statistics/activations, return its map T ([hidden, hidden]).
Estimator = Callable[[BlockCapture], torch.Tensor]


class CalibrationEngine(Protocol):
    """The passes over the calibration set that profile and calibrate need, implemented in this
    process (:class:`LocalEngine`) and on a Ray cluster (:class:`replaceme.distributed.engine.RayEngine`);
    both give the same distances and maps to float64 round-off."""

    def distances(self, block_size: int) -> list[tuple[int, int, float]]:
        """Mean angular distance of every block of ``block_size`` layers starting at layer 1 or later."""

    def calibrate(self, blocks: Sequence[Block], estimator: Estimator, *, sequential: bool = True,
                  keep_activations: bool = False) -> list[tuple[BlockCapture, torch.Tensor]]:
        """Each block's statistics (and rows) and the map ``estimator`` solves from them."""

    def close(self) -> None:
        """Release what the engine holds between passes (the Ray stages)."""


class LocalEngine:
    """``store``: the run's activation store, written by :meth:`calibrate` (``save_rows``: the rows
    too, not only the statistics); ``batches_per_shard``: the data shards' size, as on Ray."""

    def __init__(self, model: LayerwiseModel, batches: Sequence[Batch], *, progress: bool = True,
                 store: ActivationStore | None = None, save_rows: bool = False,
                 batches_per_shard: int = BATCHES_PER_SHARD) -> None:
        if not batches:
            raise ReplaceMeError("dataset: no calibration batches; the calibration set is empty")
        if batches_per_shard < 1:
            raise ValueError("batches_per_shard must be at least 1")
        self.model = model
        self.batches = list(batches)
        self.progress = progress
        self.store = store
        self.save_rows = save_rows and store is not None
        self.batches_per_shard = batches_per_shard
        self.num_shards = math.ceil(len(self.batches) / batches_per_shard)
        self.batch_ids = list(range(len(self.batches)))  # in the whole calibration set (a resumed pass runs some)
        self.shard_of = [i // batches_per_shard for i in self.batch_ids]
        self._kwargs_cache: dict[tuple[int, int], dict] = {}
        self._kwargs_cache_bytes = 0

    def close(self) -> None:
        """Nothing held between passes (the Ray engine's stages are)."""

    # --- building blocks ---------------------------------------------------------------------

    def embed(self) -> list[torch.Tensor]:
        return [self.model.embed(b.input_ids, b.attention_mask) for b in self.batches]

    def run_layer(self, index: int, stream: list[torch.Tensor], *, tap_mlp: bool = False
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Run decoder layer ``index`` over every batch; optionally capture its residual MLP output."""
        outputs, taps = [], [] if tap_mlp else None
        with self.model.layer(index) as layer, torch.no_grad():
            hook = None
            if tap_mlp:
                tapped = layer.get_submodule(self.model.family.residual_mlp_module)
                hook = tapped.register_forward_hook(lambda _m, _i, out: taps.append(out))
            try:
                for batch_index, hidden in enumerate(stream):
                    out = layer(hidden, **self._layer_kwargs(index, batch_index))
                    outputs.append(out[0] if isinstance(out, tuple) else out)
            finally:
                if hook is not None:
                    hook.remove()
        self._check_finite(index, outputs)
        return outputs, taps

    def _layer_kwargs(self, index: int, batch_index: int) -> dict:
        """Masks and position embeddings for one layer and batch, cached while they fit the budget
        (building them costs about as much as a small layer; for long sequences they are large)."""
        key = (self.model.kwargs_key(index), batch_index)
        if key in self._kwargs_cache:
            return self._kwargs_cache[key]
        kwargs = self.model.layer_kwargs(index, self.batches[batch_index].attention_mask)
        size = sum(_nbytes(v) for v in kwargs.values())
        if self._kwargs_cache_bytes + size <= KWARGS_CACHE_BYTES:
            self._kwargs_cache[key] = kwargs
            self._kwargs_cache_bytes += size
        return kwargs

    def run_layers(self, layers: range, stream: list[torch.Tensor], bar: tqdm | None = None) -> list[torch.Tensor]:
        for index in layers:
            stream, _ = self.run_layer(index, stream)
            if bar is not None:
                bar.update()
        return stream

    def rows(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Non-padding token rows of each batch ([n_tokens, hidden])."""
        return [t[b.attention_mask.to(t.device).bool()] for b, t in zip(self.batches, tensors)]

    def _check_finite(self, index: int, outputs: list[torch.Tensor]) -> None:
        for batch_index, (batch, out) in enumerate(zip(self.batches, outputs)):
            check_finite(index, out, batch.attention_mask, f" (calibration batch {self.batch_ids[batch_index]})")

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="layer", disable=not self.progress, leave=False)

    # --- passes ------------------------------------------------------------------------------

    def distances(self, block_size: int) -> list[tuple[int, int, float]]:
        """Mean angular distance ``arccos(cos(h_{s-1}, h_{e-1}))/π`` for every block of ``block_size``
        layers that starts at layer 1 or later: ``[(s, e, distance), …]``.

        Layer-major like every pass here, so each layer's weights are read once; the price is that
        the block ending at layer j needs ``h_{j-L}`` of *every* batch when ``h_j`` is computed, so
        the token rows of the whole set after the last L+1 layers stay in memory. Holding only L+1
        states of one batch needs batch-major order, which would reload every layer for every batch
        here; the Ray stages do that with their layers resident (``engine.backend: ray``).
        """
        angles = angle_sums(block_size, self.model.num_layers)
        window: deque[list[torch.Tensor]] = deque()  # per-batch rows after layers index-L … index
        stream = self.embed()
        with self._bar(self.model.num_layers, "profile") as bar:
            for index in range(self.model.num_layers):
                stream, _ = self.run_layer(index, stream)
                bar.update()
                window.append(self.rows(stream))
                start = angles.start_of_block_ending_at(index)
                if start is not None:  # h_{index-L} is used for the last time: drop it before the next layer
                    for before, after in zip(window.popleft(), window[-1]):
                        angles.add(start, before, after)
        return angles.distances()

    def calibrate(self, blocks: Sequence[Block], estimator: Estimator, *, sequential: bool = True,
                  keep_activations: bool = False) -> list[tuple[BlockCapture, torch.Tensor]]:
        """One pass up to the last layer any block needs; returns each block's capture and map.

        With ``sequential`` the stream after a block is the pruned model's (``h_{s-1} − X + X·T``),
        so later blocks are fitted on the model whose earlier blocks are already replaced;
        without it every block sees the original model, as the published least-squares code does.

        With a store, the shards committed there for every block (a rerun of the same run id) are
        not run: their statistics are read back; a shard committed for some blocks only runs, and
        its committed statistics are read back for those blocks.
        """
        blocks = sorted(blocks)
        committed = self._committed(blocks, keep_activations)
        skipped = set.intersection(*committed.values()) if committed else set()
        runner = self._without_shards(skipped)  # None: every shard is committed, no layer runs
        if skipped:
            log.info("resuming: %d of %d data shards already committed to the activation store", len(skipped),
                     self.num_shards)
        results = []
        stream = runner.embed() if runner else []
        next_layer = 0
        with self._bar(max(e for _, e in blocks) if runner else 0, "calibrate") as bar:
            for start, end in blocks:
                x, target = [], []
                if runner:
                    stream = runner.run_layers(range(next_layer, start - 1), stream, bar)
                    stream, x = runner.run_layer(start - 1, stream, tap_mlp=True)
                    bar.update()
                    target = runner.run_layers(range(start, end), stream, bar)
                capture = self._capture((start, end), runner, stream, x, target, keep_activations,
                                        committed.get((start, end), set()))
                transform = estimator(capture)
                results.append((capture, transform))
                if runner:
                    stream = runner._apply(stream, x, transform) if sequential else target
                next_layer = end
        return results

    def _committed(self, blocks: Sequence[Block], keep_activations: bool) -> dict[Block, set[int]]:
        """Per block, the shards whose statistics (and rows, when rows are saved) the store already
        holds. None are reused when the estimator needs rows that are kept in memory only."""
        if self.store is None or (keep_activations and not self.save_rows):
            return {}
        committed = {}
        for block in blocks:
            records = self.store.committed_shards(block)
            committed[block] = {n for n, r in records.items() if n < self.num_shards and (
                not self.save_rows or r["part"] is not None or r["tokens"] == 0)}
        return committed

    def _without_shards(self, skipped: set[int]) -> LocalEngine | None:
        """This engine, or one over the batches of the shards not in ``skipped`` (None when none is left)."""
        if not skipped:
            return self
        kept = [i for i in self.batch_ids if self.shard_of[i] not in skipped]
        if not kept:
            return None
        runner = LocalEngine(self.model, [self.batches[i] for i in kept], progress=self.progress, store=self.store,
                             save_rows=self.save_rows, batches_per_shard=self.batches_per_shard)
        runner.batch_ids, runner.shard_of = kept, [self.shard_of[i] for i in kept]
        return runner

    def perplexity(self, skip: set[int] = frozenset(), *, start: int = 0,
                   stream: list[torch.Tensor] | None = None) -> tuple[float, int]:
        """Perplexity of next-token prediction over non-padding tokens, and the token count.
        ``stream``: the hidden states after layers ``0 … start-1``, when they are known already
        (another checkpoint whose first ``start`` layers are these, byte for byte)."""
        stream = self.embed() if stream is None else stream
        kept = [i for i in range(start, self.model.num_layers) if i not in skip]
        with self._bar(len(kept), "evaluate") as bar:
            for index in kept:
                stream, _ = self.run_layer(index, stream)
                bar.update()
        norm, lm_head = self.model.head()
        total_nll, total_tokens = 0.0, 0
        with torch.no_grad():
            for batch, hidden in zip(self.batches, stream):
                valid = batch.attention_mask[:, 1:].to(hidden.device).bool()
                rows, labels = hidden[:, :-1][valid], batch.input_ids[:, 1:].to(hidden.device)[valid]
                total_nll += self._nll(rows, labels, norm, lm_head)
                total_tokens += rows.shape[0]
        if total_tokens == 0:
            raise ReplaceMeError("eval.dataset: no tokens to predict; the evaluation texts are too short")
        return math.exp(total_nll / total_tokens), total_tokens

    # --- helpers -------------------------------------------------------------------------------

    def _nll(self, rows: torch.Tensor, labels: torch.Tensor, norm: torch.nn.Module, lm_head: torch.nn.Module) -> float:
        """Summed next-token loss of token rows, their logits computed a slice of rows at a time: a
        batch's [tokens × vocab] float32 logits (4 GB for 8 × 1024 tokens of a 128 k vocabulary)
        never exist at once."""
        step = max(1, LOGITS_BYTES // (4 * lm_head.weight.shape[0]))
        total = 0.0
        for begin in range(0, rows.shape[0], step):
            logits = self.model.logits(rows[begin:begin + step], norm, lm_head)
            total += float(torch.nn.functional.cross_entropy(logits, labels[begin:begin + step], reduction="sum"))
        return total

    def _capture(self, block: Block, runner: LocalEngine | None, h_before: list[torch.Tensor], x: list[torch.Tensor],
                 h_after: list[torch.Tensor], keep_activations: bool, committed: set[int]) -> BlockCapture:
        """The block's statistics: per data shard (committed to the store when there is one, rows
        streamed into it), summed in shard order; shards in ``committed`` are read back instead.
        With the rows in the store the estimator reads them from there (as after a Ray run, and as
        ``replaceme solve`` does), else they are kept in memory when it needs them."""
        hidden = self.model.hidden_size
        device = h_before[0].device if h_before else torch.device("cpu")
        in_memory = Activations() if keep_activations and not self.save_rows else None
        positions: dict[int, list[int]] = {}  # shard → positions of its batches in the runner's stream
        for position, shard in enumerate(runner.shard_of if runner else []):
            positions.setdefault(shard, []).append(position)
        total = BlockStats.zeros(hidden, device=device)
        for shard in range(self.num_shards):
            if shard in committed:
                total += self.store.load_stats(block, shard)
                continue
            stats = BlockStats.zeros(hidden, device=device)
            writer = self.store.row_writer(block, shard) if self.save_rows else None
            with writer if writer is not None else contextlib.nullcontext():
                for position in positions.get(shard, []):
                    mask = runner.batches[position].attention_mask.to(device).bool()
                    hb, xb, ha = h_before[position][mask], x[position][mask], h_after[position][mask]
                    y = ha - hb + xb
                    stats.update(xb, y)
                    if writer is not None:
                        writer.write(xb, y, hb - xb)
                    if in_memory is not None:
                        in_memory.add(xb, y, hb - xb)
            if self.store is not None:
                self.store.commit_shard(block, shard, stats, writer.close() if writer is not None else None)
            total += stats
        if self.store is not None:  # written last: the block's statistics and rows are complete
            self.store.write_manifest(block, hidden, expected_shards=self.num_shards)
        rows = StoredRows(self.store, block) if keep_activations and self.save_rows else in_memory
        return BlockCapture(block, total, rows)

    def _apply(self, stream: list[torch.Tensor], x: list[torch.Tensor], transform: torch.Tensor) -> list[torch.Tensor]:
        """The stream after layer s-1 once the map is folded in: ``h − X + X·T``."""
        return [apply_map(h, xb, transform) for h, xb in zip(stream, x)]


def angle_sums(block_size: int, num_layers: int) -> AngleSums:
    """Empty distance sums for blocks of ``block_size`` layers, refused when none fits the model."""
    if block_size >= num_layers:
        raise ReplaceMeError(f"layers_to_skip: {block_size} must be smaller than the model's {num_layers} layers")
    return AngleSums(block_size)


def check_finite(index: int, out: torch.Tensor, attention_mask: torch.Tensor, where: str = "") -> None:
    """Stop with the layer named when a non-padding activation is NaN or inf (padding may overflow harmlessly).
    float32 is advised only where the stream is narrower; in float32 (or wider) it is the weights or inputs."""
    if not torch.isfinite(out).all() and not torch.isfinite(out[attention_mask.to(out.device).bool()]).all():
        dtype = str(out.dtype).removeprefix("torch.")
        if out.dtype in (torch.float32, torch.float64):
            raise ReplaceMeError(
                f"non-finite activations after decoder layer {index}{where} in {dtype}: the checkpoint's weights "
                f"(or the inputs) produce NaN or inf there; check layer {index}'s weights in the checkpoint"
            )
        raise ReplaceMeError(
            f"non-finite activations after decoder layer {index}{where}: compute_dtype {dtype} may overflow, or "
            "the checkpoint may be corrupt; try compute_dtype: float32"
        )


def apply_map(h: torch.Tensor, x: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """``h − X + X·T`` in float64, rounded once to the stream's dtype: maps that differ by round-off
    (solved from sums added in another order, e.g. by another engine) give the same stream."""
    t = transform.to(device=h.device, dtype=torch.float64)
    x64 = x.to(torch.float64)
    return (h.to(torch.float64) - x64 + x64 @ t).to(h.dtype)


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0
