"""The in-process engine: every calibration batch through one decoder layer at a time.

Layer-major order means each layer's weights are read once and freed before the next, so
memory holds one layer plus the hidden states of the calibration set — never the whole model —
and nothing past the last layer a block needs is loaded. Three passes are built on it:

* :meth:`LocalEngine.distances` — angular distance between the stream before and after every
  candidate block (block selection);
* :meth:`LocalEngine.calibrate` — the taps ``X`` (MLP output of layer ``s-1``), ``h_{s-1}`` and
  ``h_{e-1}`` for every block, reduced to float64 statistics (and kept as activation rows when an
  iterative estimator needs them);
* :meth:`LocalEngine.perplexity` — held-out perplexity of a checkpoint, optionally with layers
  skipped.

Padding rows are dropped from every statistic and distance.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from replaceme.data import Batch
from replaceme.errors import ReplaceMeError
from replaceme.layerwise import LayerwiseModel
from replaceme.stats import AngleSums, BlockStats

Block = tuple[int, int]
KWARGS_CACHE_BYTES = 512 * 2**20


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
    activations: Activations | None


# Given a block's captured statistics/activations, return its map T ([hidden, hidden]).
Estimator = Callable[[BlockCapture], torch.Tensor]


class LocalEngine:
    def __init__(self, model: LayerwiseModel, batches: Sequence[Batch], *, progress: bool = True) -> None:
        if not batches:
            raise ReplaceMeError("dataset: no calibration batches; the calibration set is empty")
        self.model = model
        self.batches = list(batches)
        self.progress = progress
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
            check_finite(index, out, batch.attention_mask, f" (calibration batch {batch_index})")

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
        """
        results = []
        stream = self.embed()
        next_layer = 0
        with self._bar(max(e for _, e in blocks), "calibrate") as bar:
            for start, end in sorted(blocks):
                stream = self.run_layers(range(next_layer, start - 1), stream, bar)
                stream, x = self.run_layer(start - 1, stream, tap_mlp=True)
                bar.update()
                target = self.run_layers(range(start, end), stream, bar)
                capture = self._capture((start, end), stream, x, target, keep_activations)
                transform = estimator(capture)
                results.append((capture, transform))
                stream = self._apply(stream, x, transform) if sequential else target
                next_layer = end
        return results

    def perplexity(self, skip: set[int] = frozenset()) -> tuple[float, int]:
        """Perplexity of next-token prediction over non-padding tokens, and the token count."""
        stream = self.embed()
        kept = [i for i in range(self.model.num_layers) if i not in skip]
        with self._bar(len(kept), "evaluate") as bar:
            for index in kept:
                stream, _ = self.run_layer(index, stream)
                bar.update()
        norm, lm_head = self.model.head()
        total_nll, total_tokens = 0.0, 0
        with torch.no_grad():
            for batch, hidden in zip(self.batches, stream):
                logits = self.model.logits(hidden[:, :-1], norm, lm_head)
                labels = batch.input_ids[:, 1:].to(logits.device)
                valid = batch.attention_mask[:, 1:].to(logits.device).bool()
                nll = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
                total_nll += float(nll)
                total_tokens += int(valid.sum())
        if total_tokens == 0:
            raise ReplaceMeError("eval.dataset: no tokens to predict; the evaluation texts are too short")
        return math.exp(total_nll / total_tokens), total_tokens

    # --- helpers -------------------------------------------------------------------------------

    def _capture(self, block: Block, h_before: list[torch.Tensor], x: list[torch.Tensor],
                 h_after: list[torch.Tensor], keep_activations: bool) -> BlockCapture:
        stats = BlockStats.zeros(self.model.hidden_size, device=h_before[0].device)
        activations = Activations() if keep_activations else None
        for hb, xb, ha in zip(self.rows(h_before), self.rows(x), self.rows(h_after)):
            y = ha - hb + xb
            stats.update(xb, y)
            if activations is not None:
                activations.add(xb, y, hb - xb)
        return BlockCapture(block, stats, activations)

    def _apply(self, stream: list[torch.Tensor], x: list[torch.Tensor], transform: torch.Tensor) -> list[torch.Tensor]:
        """The stream after layer s-1 once the map is folded in: ``h − X + X·T``."""
        return [apply_map(h, xb, transform) for h, xb in zip(stream, x)]


def angle_sums(block_size: int, num_layers: int) -> AngleSums:
    """Empty distance sums for blocks of ``block_size`` layers, refused when none fits the model."""
    if block_size >= num_layers:
        raise ReplaceMeError(f"layers_to_skip: {block_size} must be smaller than the model's {num_layers} layers")
    return AngleSums(block_size)


def check_finite(index: int, out: torch.Tensor, attention_mask: torch.Tensor, where: str = "") -> None:
    """Stop with the layer named when a non-padding activation is NaN or inf (padding may overflow harmlessly)."""
    if not torch.isfinite(out).all() and not torch.isfinite(out[attention_mask.to(out.device).bool()]).all():
        raise ReplaceMeError(
            f"non-finite activations after decoder layer {index}{where}; the checkpoint may be corrupt or "
            f"compute_dtype={out.dtype} may overflow: try compute_dtype: float32"
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
