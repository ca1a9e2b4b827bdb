"""The in-process engine: the calibration set through the model one decoder layer at a time.

The batches are taken a chunk at a time, sized to ``engine.memory_budget`` (see
:mod:`replaceme.memory`), and layer-major inside a chunk: memory holds the chunk's hidden states
plus one layer — or every layer, kept resident across chunks when they fit the budget — never
the hidden states of the whole set, and nothing past the last layer a pass needs is loaded.
The passes built on it:

* :meth:`LocalEngine.profile` — angular distance between the stream before and after every
  candidate block (block selection) and, in the same pass, each candidate's least-squares
  statistics, so that a block selected and fitted on the unpruned stream needs no second pass;
* :meth:`LocalEngine.calibrate` — the taps ``X`` (MLP output of layer ``s-1``), ``h_{s-1}`` and
  ``h_{e-1}`` for every block, reduced to float64 statistics per data shard of
  ``batches_per_shard`` batches and summed in shard order, as the Ray engine does (and kept as
  activation rows when an iterative estimator needs them). With an activation store, each shard's
  statistics (and rows) are committed there in the layout the Ray stages write, and each block's
  manifest last, so that ``replaceme solve`` re-solves from the store; shards already committed
  for every block are not run again (resume);
* :meth:`LocalEngine.perplexities` — held-out perplexity of a checkpoint and of pruned copies of
  it, the layers they share run once.

Padding rows are dropped from every statistic and distance.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

import torch

from replaceme.activations import ActivationStore, RowWriter, StoredRows
from replaceme.blocks import Block
from replaceme.config import EngineConfig
from replaceme.data import Batch
from replaceme.errors import ReplaceMeError
from replaceme.layerwise import LayerwiseModel
from replaceme.memory import (
    CALIBRATION_STATES,
    EVALUATION_STATES,
    KWARGS_CACHE_BYTES,
    LOGITS_BYTES,
    BatchShape,
    ChunkPlan,
    gib,
    held_fits,
    plan_pass,
    profile_states,
    release_freed_memory,
    resolve_budget,
)
from replaceme.progress import Progress, progress
from replaceme.stats import AngleSums, BlockStats, CandidateStats

log = logging.getLogger("replaceme")
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


@dataclass
class Profile:
    """What the profile pass measured: every candidate block's distance and, when asked for, its
    least-squares statistics on the unpruned stream (then no second pass is needed to fit it)."""

    distances: list[tuple[int, int, float]]
    candidates: dict[Block, CandidateStats] | None = None


class CalibrationEngine(Protocol):
    """The passes over the calibration set that profile and calibrate need, implemented in this
    process (:class:`LocalEngine`) and on a Ray cluster (:class:`replaceme.distributed.engine.RayEngine`);
    both give the same distances and maps to float64 round-off."""

    def profile(self, block_size: int, *, statistics: bool = False, weighted: bool = False) -> Profile:
        """Mean angular distance of every block of ``block_size`` layers starting at layer 1 or later
        and, with ``statistics`` where the engine can, every such block's statistics (else None);
        ``weighted``: their stream-weighted part too (:class:`CandidateStats`, residual selection)."""

    def calibrate(self, blocks: Sequence[Block], estimator: Estimator, *, sequential: bool = True,
                  keep_activations: bool = False) -> list[tuple[BlockCapture, torch.Tensor]]:
        """Each block's statistics (and rows) and the map ``estimator`` solves from them."""

    def close(self) -> None:
        """Release what the engine holds between passes (the Ray stages)."""


@dataclass
class _Shared:
    """What the chunk views of one engine share: resident layers and cached layer arguments."""

    resident: dict[int, torch.nn.Module] | None = None  # None: weights are streamed
    kwargs: dict[tuple[int, int], dict] = field(default_factory=dict)
    kwargs_bytes: int = 0
    kwargs_limit: int = KWARGS_CACHE_BYTES  # a share of the budget, set by each pass's plan
    logits_limit: int = LOGITS_BYTES  # float32 logits held at once by the evaluation, likewise


class LocalEngine:
    """``store``: the run's activation store, written by :meth:`calibrate` (``save_rows``: the rows
    too, not only the statistics); ``batches_per_shard``: the data shards' size, as on Ray;
    ``memory_budget``: what a pass may hold (``engine.memory_budget``; None or ``auto``: a share of
    the free memory), see :mod:`replaceme.memory`."""

    def __init__(self, model: LayerwiseModel, batches: Sequence[Batch], *, progress: bool = True,
                 store: ActivationStore | None = None, save_rows: bool = False,
                 batches_per_shard: int = BATCHES_PER_SHARD, memory_budget: str | int | None = None) -> None:
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
        self.memory_budget = memory_budget
        self.num_shards = math.ceil(len(self.batches) / batches_per_shard)
        self.batch_ids = list(range(len(self.batches)))  # in the whole calibration set (a chunk holds some)
        self.shard_of = [i // batches_per_shard for i in self.batch_ids]
        self.last_plan: ChunkPlan | None = None  # of the latest pass, for reports and tests
        self._shared = _Shared()

    def close(self) -> None:
        """Free the resident layers (the Ray engine's stages are freed likewise)."""
        self._shared.resident = None

    def _subset(self, positions: Sequence[int]) -> LocalEngine:
        """A view of this engine over some of its batches, sharing its layers and caches."""
        view = copy.copy(self)
        view.batches = [self.batches[i] for i in positions]
        view.batch_ids = [self.batch_ids[i] for i in positions]
        view.shard_of = [self.shard_of[i] for i in positions]
        return view

    # --- building blocks ---------------------------------------------------------------------

    def embed(self) -> list[torch.Tensor]:
        return [self.model.embed(b.input_ids, b.attention_mask) for b in self.batches]

    def run_layer(self, index: int, stream: list[torch.Tensor], *, tap_mlp: bool = False
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Run decoder layer ``index`` over every batch; optionally capture its residual MLP output."""
        outputs: list[torch.Tensor] = []
        taps: list[torch.Tensor] = []
        with self._layer(index) as layer, torch.no_grad():
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
        return outputs, taps if tap_mlp else None

    @contextlib.contextmanager
    def _layer(self, index: int) -> Iterator[torch.nn.Module]:
        """Decoder layer ``index``: kept loaded when the pass's weights are resident, else read for
        this use and freed."""
        resident = self._shared.resident
        if resident is None:
            with self.model.layer(index) as layer:
                yield layer
            return
        if index not in resident:
            resident[index] = self.model.load_layer(index)
        yield resident[index]

    def _layer_kwargs(self, index: int, batch_index: int) -> dict:
        """Masks and position embeddings for one layer and batch, cached while they fit their share of
        the budget (building them costs about as much as a small layer)."""
        shared = self._shared
        key = (self.model.kwargs_key(index), self.batch_ids[batch_index])
        if key in shared.kwargs:
            return shared.kwargs[key]
        kwargs = self.model.layer_kwargs(index, self.batches[batch_index].attention_mask)
        size = sum(_nbytes(v) for v in kwargs.values())
        if shared.kwargs_bytes + size <= shared.kwargs_limit:
            shared.kwargs[key] = kwargs
            shared.kwargs_bytes += size
        return kwargs

    def run_layers(self, layers: Iterable[int], stream: list[torch.Tensor], bar: Progress | None = None) -> list[torch.Tensor]:
        for index in layers:
            stream, _ = self.run_layer(index, stream)
            if bar is not None:
                bar.update()
        return stream

    def rows(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Non-padding token rows of each batch ([n_tokens, hidden]): a view where the batch has no padding."""
        return [_rows(t, b.attention_mask) for b, t in zip(self.batches, tensors, strict=True)]

    def _check_finite(self, index: int, outputs: list[torch.Tensor]) -> None:
        for batch_index, (batch, out) in enumerate(zip(self.batches, outputs, strict=True)):
            check_finite(index, out, batch.attention_mask, f" (calibration batch {self.batch_ids[batch_index]})")

    def _bar(self, total: int, desc: str) -> Progress:
        return progress(total=total, desc=desc, unit="layer", disable=not self.progress)

    # --- chunks ------------------------------------------------------------------------------

    def plan(self, layers: Sequence[int], *, states: int, fixed_bytes: int = 0, what: str = "calibration",
             others: Sequence[LocalEngine] = ()) -> ChunkPlan:
        """How a pass running ``layers`` (of this model, and all of ``others``' layers) with
        ``states`` hidden states per token alive spends the memory budget; makes the weights
        resident or streamed accordingly. Cached layer arguments and (evaluation) logit slices
        take at most an eighth of the budget each."""
        m = self.model
        widest = max(self.batches, key=lambda b: b.input_ids.numel())
        batch_size, length = widest.input_ids.shape
        shape = BatchShape(batch_size, length, hidden=m.hidden_size, intermediate=m.intermediate_size,
                           heads=m.num_heads, dtype_bytes=torch.empty((), dtype=m.dtype).element_size())
        layer_bytes = [m.layer_bytes(i) for i in layers]
        for other in others:
            layer_bytes += [other.model.layer_bytes(i) for i in range(other.model.num_layers)]
        plan = plan_pass(shape, budget=resolve_budget(self.memory_budget, m.device), layer_bytes=layer_bytes,
                         states=states, fixed_bytes=fixed_bytes + m.embedding_bytes(), num_batches=len(self.batches),
                         batches_per_shard=self.batches_per_shard, what=what, kwargs_cache=KWARGS_CACHE_BYTES,
                         logits=LOGITS_BYTES if what == "evaluation" else 0)
        for engine in (self, *others):
            engine._shared.kwargs_limit, engine._shared.logits_limit = plan.kwargs_bytes, plan.logits_bytes
            engine._keep_resident(plan.resident, set(layers) if engine is self else None)
        self.last_plan = plan
        log.info("%s pass: %s", what, plan.describe())
        return plan

    def _keep_resident(self, resident: bool, layers: set[int] | None) -> None:
        """Keep the layers of the coming pass that are loaded already (``layers`` None: all); free the rest."""
        if not resident:
            self._shared.resident = None
            return
        kept = self._shared.resident or {}
        self._shared.resident = {i: m for i, m in kept.items() if layers is None or i in layers}

    def chunks(self, plan: ChunkPlan) -> list[LocalEngine]:
        """Views over consecutive chunks of the batches (this engine itself when one chunk holds all)."""
        if plan.chunk_batches >= len(self.batches):
            return [self]
        step = plan.chunk_batches
        return [self._subset(range(b, min(b + step, len(self.batches)))) for b in range(0, len(self.batches), step)]

    # --- passes ------------------------------------------------------------------------------

    def distances(self, block_size: int) -> list[tuple[int, int, float]]:
        """Mean angular distance ``arccos(cos(h_{s-1}, h_{e-1}))/π`` for every block of ``block_size``
        layers that starts at layer 1 or later: ``[(s, e, distance), …]``."""
        return self.profile(block_size).distances

    def profile(self, block_size: int, *, statistics: bool = False, weighted: bool = False) -> Profile:
        """Every candidate block's distance and, with ``statistics``, its least-squares statistics on
        the unpruned stream (a candidate's X, h_{s-1} and h_{e-1} are all in the window the distance
        slides; ``weighted`` adds their stream-weighted part). Statistics that would take over half the
        budget are not gathered (``candidates`` None: the caller then fits in a second pass).

        Layer-major inside a chunk: the block ending at layer j needs ``h_{j-L}`` (and, for its
        statistics, X of layer j-L) of every batch of the chunk when ``h_j`` is computed, so the
        rows after the last L+1 layers of one chunk stay in memory — never those of the whole set.
        """
        n = self.model.num_layers
        angles = angle_sums(block_size, n)
        candidates = self._candidate_sums(block_size, weighted) if statistics else None
        need = len(candidates or ()) * CandidateStats.nbytes(self.model.hidden_size, weighted=weighted)
        plan = self.plan(range(n), states=profile_states(block_size, candidates is not None), fixed_bytes=need,
                         what="profile")
        chunks = self.chunks(plan)
        with self._bar(n * len(chunks), "profile") as bar:
            for chunk in chunks:
                chunk._profile_chunk(angles, candidates, bar)
                release_freed_memory()
        return Profile(angles.distances(), candidates)

    def _candidate_sums(self, block_size: int, weighted: bool) -> dict[Block, CandidateStats] | None:
        """Empty statistics of every candidate block, or None when they would take over half the budget."""
        hidden, count = self.model.hidden_size, self.model.num_layers - block_size
        need = count * CandidateStats.nbytes(hidden, weighted=weighted)
        budget = resolve_budget(self.memory_budget, self.model.device)
        if not held_fits(need, budget):
            log.warning("not gathering the %d candidate blocks' statistics in the profile pass: they take %s of a %s "
                        "budget (engine.memory_budget); the blocks are fitted in a second pass", count, gib(need),
                        gib(budget))
            return None
        return {(s, s + block_size): CandidateStats.zeros(hidden, self.model.device, weighted=weighted)
                for s in range(1, count + 1)}

    def _profile_chunk(self, angles: AngleSums, candidates: dict[Block, CandidateStats] | None, bar: Progress) -> None:
        n, size = self.model.num_layers, angles.block_size
        window: deque[tuple[list[torch.Tensor], list[torch.Tensor] | None]] = deque()  # rows of h (and X) per layer
        stream = self.embed()
        for index in range(n):
            tap = candidates is not None and index < n - size  # layer s-1 of the candidate starting at index+1
            stream, x = self.run_layer(index, stream, tap_mlp=tap)
            bar.update()
            window.append((self.rows(stream), self.rows(x) if x is not None else None))
            start = angles.start_of_block_ending_at(index)
            if start is None:
                continue
            (before, x_rows), (after, _) = window.popleft(), window[-1]  # h_{s-1} is used for the last time
            for b, a in zip(before, after, strict=True):
                angles.add(start, b, a)
            if candidates is not None and x_rows is not None:
                for xb, b, a in zip(x_rows, before, after, strict=True):
                    candidates[(start, index + 1)].update(xb, b, a)

    def calibrate(self, blocks: Sequence[Block], estimator: Estimator, *, sequential: bool = True,
                  keep_activations: bool = False) -> list[tuple[BlockCapture, torch.Tensor]]:
        """One pass up to the last layer any block needs; returns each block's capture and map.

        With ``sequential`` the stream after a block is the pruned model's (``h_{s-1} − X + X·T``),
        so later blocks are fitted on the model whose earlier blocks are already replaced;
        without it every block sees the original model, as the published least-squares code does.
        When the calibration set takes several chunks, a sequential fit runs one pass per block
        (a block's map needs every chunk's statistics before the next block's stream exists).

        With a store, the shards committed there for every block (a rerun of the same run id) are
        not run: their statistics are read back; a shard committed for some blocks only runs, and
        its committed statistics are read back for those blocks.
        """
        blocks = sorted(blocks)
        if keep_activations and not self.save_rows:
            self.check_rows_fit(len(blocks))
        committed = self._committed(blocks, keep_activations)
        skipped = set.intersection(*committed.values()) if committed else set()
        runner = self._without_shards(skipped)  # None: every shard is committed, no layer runs
        if skipped:
            log.info("resuming: %d of %d data shards already committed to the activation store", len(skipped),
                     self.num_shards)
        sums = {b: _BlockSums(self, b, committed.get(b, set()), keep_activations) for b in blocks}
        try:
            if runner is None:
                return [self._solve(sums[b], estimator) for b in blocks]
            return runner._calibrate_chunks(blocks, sums, estimator, sequential)
        except BaseException:
            for block_sums in sums.values():
                block_sums.abort()
            raise
        finally:
            if runner is not None and runner is not self:
                self.last_plan = runner.last_plan

    def _calibrate_chunks(self, blocks: list[Block], sums: dict[Block, _BlockSums], estimator: Estimator,
                          sequential: bool) -> list[tuple[BlockCapture, torch.Tensor]]:
        last = max(e for _, e in blocks)
        fixed = len(blocks) * BlockStats.nbytes(self.model.hidden_size)
        chunks = self.chunks(self.plan(range(last), states=CALIBRATION_STATES, fixed_bytes=fixed))
        sweeps = len(blocks) if sequential and len(chunks) > 1 else 1
        results: list[tuple[BlockCapture, torch.Tensor]] = []
        transforms: dict[Block, torch.Tensor] = {}
        with self._bar(last * len(chunks) * sweeps, "calibrate") as bar:
            if not sequential:
                for chunk in chunks:
                    chunk._sweep(blocks, sums, transforms, bar, fold=False)
                    release_freed_memory()
                return [self._solve(sums[b], estimator) for b in blocks]
            kept: list[_Sweep | None] = [None] * len(chunks)  # one chunk's state stays in memory from block to block
            for i, block in enumerate(blocks):
                for c, chunk in enumerate(chunks):
                    state = chunk._sweep(blocks[:i + 1], sums, transforms, bar, fold=True, state=kept[c])
                    kept[c] = state if len(chunks) == 1 else None
                    del state  # else this chunk's stream and X stay alive while the next chunk runs
                    release_freed_memory()
                results.append(self._solve(sums[block], estimator))
                transforms[block] = results[-1][1]
        return results

    def _sweep(self, blocks: list[Block], sums: dict[Block, _BlockSums], transforms: dict[Block, torch.Tensor],
               bar: Progress, *, fold: bool, state: _Sweep | None = None) -> _Sweep:
        """Run this chunk through ``blocks`` in order: a block with a map in ``transforms`` is folded
        in (the stream becomes the pruned model's); any other is captured into ``sums``, after which
        the stream goes on unpruned, or (``fold``) the sweep stops there until its map is solved."""
        state = state or _Sweep(self.embed())
        for start, end in blocks[state.done:]:
            x = state.x
            if x is None:  # not yet at layer s-1 of this block
                state.stream = self.run_layers(range(state.next_layer, start - 1), state.stream, bar)
                state.stream, x = self.run_layer(start - 1, state.stream, tap_mlp=True)
                state.x = x
                bar.update()
            assert x is not None
            if (start, end) in transforms:
                state.stream = self._apply(state.stream, x, transforms[(start, end)])
            else:
                target = self.run_layers(range(start, end), state.stream, bar)
                self._accumulate(sums[(start, end)], state.stream, x, target)
                if fold:
                    return state
                state.stream = target
            state.x, state.next_layer, state.done = None, end, state.done + 1
        return state

    def _accumulate(self, sums: _BlockSums, h_before: list[torch.Tensor], x: list[torch.Tensor],
                    h_after: list[torch.Tensor]) -> None:
        for position, shard in enumerate(self.shard_of):
            mask = self.batches[position].attention_mask.to(h_before[position].device).bool()
            hb, xb, ha = h_before[position][mask], x[position][mask], h_after[position][mask]
            sums.add(shard, xb, ha - hb + xb, hb - xb)

    def _solve(self, sums: _BlockSums, estimator: Estimator) -> tuple[BlockCapture, torch.Tensor]:
        capture = sums.finish()
        return capture, estimator(capture)

    def check_rows_fit(self, num_blocks: int) -> None:
        """Rows kept in memory (no activation store) are every calibration token's X, Y and residual
        in float32, per block, and joined into one tensor for the solver: refused, before the pass,
        when they would take over half the budget."""
        tokens = sum(b.num_tokens for b in self.batches)
        need = num_blocks * tokens * self.model.hidden_size * 3 * 4 * 2
        budget = resolve_budget(self.memory_budget, self.model.device)
        if not held_fits(need, budget):
            raise ReplaceMeError(f"method: cosine keeps the X, Y and residual rows of all {tokens:,} calibration tokens "
                                 f"in memory, {gib(need)} for {num_blocks} block(s), over half the "
                                 f"engine.memory_budget of {gib(budget)}; set activations.uri (a folder or s3:// URI) "
                                 "to stream them through the activation store, or raise engine.memory_budget")

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
        """This engine, or a view over the batches of the shards not in ``skipped`` (None when none is left)."""
        if not skipped:
            return self
        kept = [i for i in range(len(self.batches)) if self.shard_of[i] not in skipped]
        return self._subset(kept) if kept else None

    def perplexity(self, skip: AbstractSet[int] = frozenset()) -> tuple[float, int]:
        """Perplexity of next-token prediction over non-padding tokens, and the token count."""
        return self.perplexities(skip=skip)[0]

    def perplexities(self, others: Sequence[LocalEngine] = (), *, shared: int = 0, skip: AbstractSet[int] = frozenset(),
                     include_self: bool = True) -> list[tuple[float, int]]:
        """Perplexity (and token count) of this model (``include_self``) and of each of ``others`` —
        other checkpoints over the same batches whose first ``shared`` layers are this one's, byte
        for byte, so that each chunk runs those layers once for all of them."""
        models = ([self] if include_self else []) + list(others)
        kept = [[i for i in range(shared, e.model.num_layers) if e is not self or i not in skip] for e in models]
        heads = [e.model.head() for e in models]
        head_bytes = sum(_module_bytes(m) for head in heads for m in head)
        plan = self.plan(range(shared if not include_self else self.model.num_layers), states=EVALUATION_STATES,
                         fixed_bytes=head_bytes, what="evaluation", others=others)
        mine = self.chunks(plan)
        views = [mine] + [[o._subset(c.batch_ids) for c in mine] for o in others]
        nll = [0.0] * len(models)
        tokens = [0] * len(models)
        with self._bar(sum(map(len, kept)) * plan.num_chunks + shared * plan.num_chunks, "evaluate") as bar:
            for c, chunk in enumerate(views[0]):
                prefix = chunk.run_layers(range(shared), chunk.embed(), bar)
                engines = ([chunk] if include_self else []) + [v[c] for v in views[1:]]
                for i, (engine, layers, head) in enumerate(zip(engines, kept, heads, strict=True)):
                    chunk_nll, chunk_tokens = engine._nll(engine.run_layers(layers, prefix, bar), head)
                    nll[i] += chunk_nll
                    tokens[i] += chunk_tokens
                release_freed_memory()
        if tokens[0] == 0:
            raise ReplaceMeError("eval.dataset: no tokens to predict; the evaluation texts are too short")
        return [(math.exp(total / count), count) for total, count in zip(nll, tokens, strict=True)]

    # --- helpers -------------------------------------------------------------------------------

    def _nll(self, stream: list[torch.Tensor], head: tuple[torch.nn.Module, torch.nn.Module]) -> tuple[float, int]:
        """Summed next-token loss over the non-padding tokens of every batch, and their count."""
        total, count = 0.0, 0
        with torch.no_grad():
            for batch, hidden in zip(self.batches, stream, strict=True):
                valid = batch.attention_mask[:, 1:].to(hidden.device).bool()
                rows, labels = hidden[:, :-1][valid], batch.input_ids[:, 1:].to(hidden.device)[valid]
                total += self._row_nll(rows, labels, *head)
                count += rows.shape[0]
        return total, count

    def _row_nll(self, rows: torch.Tensor, labels: torch.Tensor, norm: torch.nn.Module, lm_head: torch.nn.Module) -> float:
        """Summed next-token loss of token rows, their logits computed a slice of rows at a time: a
        batch's [tokens × vocab] float32 logits (4 GB for 8 × 1024 tokens of a 128 k vocabulary)
        never exist at once."""
        step = max(1, self._shared.logits_limit // (4 * self.model.vocab_size))
        total = 0.0
        for begin in range(0, rows.shape[0], step):
            logits = self.model.logits(rows[begin:begin + step], norm, lm_head)
            total += float(torch.nn.functional.cross_entropy(logits, labels[begin:begin + step], reduction="sum"))
        return total

    def _apply(self, stream: list[torch.Tensor], x: list[torch.Tensor], transform: torch.Tensor) -> list[torch.Tensor]:
        """The stream after layer s-1 once the map is folded in: ``h − X + X·T``."""
        return [apply_map(h, xb, transform) for h, xb in zip(stream, x, strict=True)]


@dataclass
class _Sweep:
    """Where a chunk's sweep through the blocks stands: its stream after layer ``next_layer - 1``,
    the blocks ``done``, and the tapped X of the block it stopped at (waiting for its map)."""

    stream: list[torch.Tensor]
    next_layer: int = 0
    done: int = 0
    x: list[torch.Tensor] | None = None


class _BlockSums:
    """One block's statistics over the calibration set: summed per data shard and the shards in
    order, as the Ray engine sums them; each shard committed to the store (with its rows) as soon
    as it is complete, so a chunk may end inside a shard. Shards in ``committed`` are read back
    from the store instead (their rows, if any ran, are ignored)."""

    def __init__(self, engine: LocalEngine, block: Block, committed: set[int], keep_activations: bool) -> None:
        self.engine, self.block, self.committed = engine, block, committed
        self.store = engine.store
        self.rows_to_store = engine.save_rows  # (only ever with a store)
        self.hidden = engine.model.hidden_size
        self.device = engine.model.device
        self.keep_activations = keep_activations
        self.in_memory = Activations() if keep_activations and not engine.save_rows else None
        self.total = BlockStats.zeros(self.hidden, device=self.device)
        self.next_shard = 0  # shards before it are in total
        self.current: tuple[BlockStats, RowWriter | None] | None = None

    def add(self, shard: int, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor) -> None:
        """Token rows of one batch of data shard ``shard`` (shards arrive in order)."""
        self._close_before(shard)
        if shard in self.committed:
            return
        if self.current is None:
            writer = self.store.row_writer(self.block, shard) if self.store and self.rows_to_store else None
            self.current = (BlockStats.zeros(self.hidden, device=self.device), writer)
        stats, writer = self.current
        stats.update(x, y)
        if writer is not None:
            writer.write(x, y, residual)
        if self.in_memory is not None:
            self.in_memory.add(x, y, residual)

    def _close_before(self, shard: int) -> None:
        """Add every shard before ``shard`` to the total, in order: committed ones read back, the one in
        progress committed to the store."""
        store = self.store
        while self.next_shard < shard:
            n = self.next_shard
            if n in self.committed and store is not None:  # (shards are committed only to a store)
                self.total += store.load_stats(self.block, n)
            elif self.current is not None:
                stats, writer = self.current
                if store is not None:
                    store.commit_shard(self.block, n, stats, writer.close() if writer is not None else None)
                self.total += stats
                self.current = None
            self.next_shard += 1

    def finish(self) -> BlockCapture:
        """The block's capture once every shard is in: with a store, its manifest is written last."""
        self._close_before(self.engine.num_shards)
        if self.store is None:
            return BlockCapture(self.block, self.total, self.in_memory)
        self.store.write_manifest(self.block, self.hidden, expected_shards=self.engine.num_shards)
        rows = StoredRows(self.store, self.block) if self.keep_activations and self.rows_to_store else self.in_memory
        return BlockCapture(self.block, self.total, rows)

    def abort(self) -> None:
        """Drop the rows of the shard in progress (never committed)."""
        if self.current is not None and self.current[1] is not None:
            self.current[1].abort()
        self.current = None


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def angle_sums(block_size: int, num_layers: int) -> AngleSums:
    """Empty distance sums for blocks of ``block_size`` layers, refused when none fits the model."""
    if block_size >= num_layers:
        raise ReplaceMeError(f"layers_to_skip: {block_size} must be smaller than the model's {num_layers} layers")
    return AngleSums(block_size)


def _rows(tensor: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # A view is safe: the supported families' decoder layers never write into their input.
    mask = attention_mask.to(tensor.device).bool()
    return tensor.flatten(0, 1) if bool(mask.all()) else tensor[mask]


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
