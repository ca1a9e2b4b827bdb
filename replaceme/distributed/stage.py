"""A pipeline stage: a contiguous range of decoder layers, resident on one worker.

The stage loads its own layers straight from the checkpoint shards (local path or fsspec URI),
so the driver never touches weights. Micro-batches arrive as :class:`Payload` and leave for the
next stage; a block's taps (``h_{s-1}`` and ``X`` rows) travel with the payload until the stage
holding layer ``e-1`` turns them into statistics. A profile pass (block selection) instead
carries the token rows after the last L layers, and each stage adds the angular distance of every
block ending on it; with statistics, the X rows of each open candidate block travel with that
window and the stage holding its layer ``e-1`` adds them to the candidate's statistics (on the
stage's device). Partials accumulate per (shard, attempt): a retried shard starts from zero, so a
shard's partials count once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from replaceme.blocks import Block
from replaceme.checkpoint import Checkpoint
from replaceme.engine import apply_map, check_finite
from replaceme.layerwise import LayerwiseModel
from replaceme.memory import free_bytes, gib, held_fits
from replaceme.stats import AngleSums, BlockStats, CandidateStats

if TYPE_CHECKING:
    from replaceme.activations import RowWriter

log = logging.getLogger("replaceme")
Partial = TypeVar("Partial", BlockStats, CandidateStats)  # what the driver's reductions sum


class StageRestarted(RuntimeError):
    """The stage was restarted during the shard (its partials or the pass's plan are gone): the
    driver redoes the shard."""


@dataclass(frozen=True)
class PhasePlan:
    """What one pass over the calibration set computes (identical for every stage)."""

    blocks: tuple[Block, ...]  # fitted in this pass (profile: the candidates whose statistics are gathered)
    applied: dict[Block, torch.Tensor]  # solved earlier: their layers skipped, their map applied
    end_layer: int  # the pass stops before this layer
    save_rows: bool  # stream (X, Y, residual) rows to the activation store
    profile: int = 0  # L > 0: measure the distances of L-layer blocks (block selection) instead
    weighted: bool = False  # profile: gather the candidates' stream-weighted statistics too (residual selection)

    @property
    def skipped(self) -> set[int]:
        return {i for s, e in self.applied for i in range(s, e)}


@dataclass
class Payload:
    shard: int
    attempt: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    hidden: torch.Tensor | None = None
    taps: dict[Block, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    window: list[torch.Tensor] = field(default_factory=list)  # profile: rows after the last L layers, oldest first
    candidate_x: dict[Block, torch.Tensor] = field(default_factory=dict)  # profile: X rows of the open candidates


class Stage:
    """Layers ``layers`` of the model at ``model_uri`` (stage 0 also embeds the tokens)."""

    def __init__(self, model_uri: str, layers: range, *, device: str, dtype: str, allow_pickle: bool = False,
                 storage_options: dict | None = None, store=None) -> None:
        self.checkpoint = Checkpoint(model_uri, allow_pickle=allow_pickle, storage_options=storage_options)
        self.device = torch.device(device)
        self.model = LayerwiseModel(self.checkpoint, device=self.device, dtype=getattr(torch, dtype))
        self.layers = layers
        self.modules = {i: self.model.load_layer(i) for i in layers}
        self.store = store
        self.plan: PhasePlan | None = None
        self._stats: dict[tuple[Block, int, int], BlockStats] = {}  # (block, shard, attempt) → calibration partials
        self._candidates: dict[tuple[Block, int, int], CandidateStats] = {}  # same keys → profile statistics
        self._angles: dict[tuple[int, int], AngleSums] = {}  # (shard, attempt) → profile partials
        self._writers: dict[tuple[Block, int, int], RowWriter] = {}

    def ready(self) -> bool:
        return True

    def set_plan(self, plan: PhasePlan) -> None:
        """Once per pass (it carries the earlier blocks' maps, too large to send with every batch)."""
        self.plan = plan

    @torch.no_grad()  # (grad mode is per thread, and Ray may call methods on another thread)
    def forward(self, payload: Payload) -> Payload:
        plan = self.plan
        if plan is None:
            raise StageRestarted(f"stage {self.layers} has no plan for this pass (restarted since)")
        mask = payload.attention_mask.to(self.device)
        # the first stage (no hidden states yet): the pipeline starts from the token ids
        hidden = self.model.embed(payload.input_ids, mask) if payload.hidden is None else payload.hidden.to(self.device)
        if plan.profile:  # created even when no block ends here: a missing entry means a restart
            self._angles.setdefault((payload.shard, payload.attempt), AngleSums(plan.profile))
            for block in self.ending_blocks(plan):
                if (block, payload.shard, payload.attempt) not in self._candidates:
                    self._candidates[(block, payload.shard, payload.attempt)] = CandidateStats.zeros(
                        self.model.hidden_size, self.device, weighted=plan.weighted)
            payload.window = [rows.to(self.device) for rows in payload.window]
            payload.candidate_x = {b: rows.to(self.device) for b, rows in payload.candidate_x.items()}
        kwargs_by_key: dict[int, dict] = {}
        skipped = plan.skipped
        for index in self.layers:
            if index >= plan.end_layer:
                break
            if index in skipped:
                continue
            key = self.model.kwargs_key(index)
            if key not in kwargs_by_key:
                kwargs_by_key[key] = self.model.layer_kwargs(index, mask)
            hidden = self._run_layer(index, hidden, kwargs_by_key[key], payload, plan, mask)
        last = self.layers.stop >= plan.end_layer  # nothing but small results goes back to the driver
        payload.hidden = None if last else hidden.cpu()
        payload.window = [] if last else [rows.cpu() for rows in payload.window]
        payload.candidate_x = {} if last else {b: rows.cpu() for b, rows in payload.candidate_x.items()}
        return payload

    def _run_layer(self, index: int, hidden: torch.Tensor, kwargs: dict, payload: Payload, plan: PhasePlan,
                   mask: torch.Tensor) -> torch.Tensor:
        opened = [b for b in (*plan.blocks, *plan.applied) if b[0] - 1 == index]
        taps: list[torch.Tensor] = []
        hook = None
        if opened:
            tapped = self.modules[index].get_submodule(self.model.family.residual_mlp_module)
            hook = tapped.register_forward_hook(lambda _m, _i, out: taps.append(out))
        try:
            out = self.modules[index](hidden, **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        out = out[0] if isinstance(out, tuple) else out
        check_finite(index, out, mask)
        rows = mask.bool()
        for block in opened:
            if block in plan.applied:  # the pruned model's stream
                out = apply_map(out, taps[0], plan.applied[block])
            elif plan.profile:  # a candidate's h_{s-1} is in the window already
                payload.candidate_x[block] = taps[0][rows]
            else:
                payload.taps[block] = (out[rows].float().cpu(), taps[0][rows].float().cpu())
        if plan.profile:
            self._add_angles(index, out[rows], payload, plan)
            return out
        for block in plan.blocks:
            if block[1] - 1 == index:
                self._close_block(block, out[rows].float().cpu(), payload, plan)
        return out

    def _add_angles(self, index: int, rows: torch.Tensor, payload: Payload, plan: PhasePlan) -> None:
        """Slide the payload's window on by layer ``index`` and add the block ending there (its
        ``h_{s-1}`` leaves the window: L rows per micro-batch cross a stage boundary, never more),
        and its statistics when the pass gathers them (X, ``h_{s-1}`` and ``h_{e-1}`` in the
        model's dtype, as the in-process engine adds them)."""
        payload.window.append(rows)
        angles = self._angles[(payload.shard, payload.attempt)]
        start = angles.start_of_block_ending_at(index)
        if start is not None:
            before = payload.window.pop(0)
            angles.add(start, before, rows)
            block = (start, index + 1)
            if block in payload.candidate_x:
                self._candidates[(block, payload.shard, payload.attempt)].update(
                    payload.candidate_x.pop(block), before, rows)

    def _close_block(self, block: Block, h_after: torch.Tensor, payload: Payload, plan: PhasePlan) -> None:
        h_before, x = payload.taps.pop(block)
        y = h_after - h_before + x
        key = (block, payload.shard, payload.attempt)
        self._stats.setdefault(key, BlockStats.zeros(x.shape[1])).update(x, y)
        if plan.save_rows and self.store is not None:
            if key not in self._writers:
                self._writers[key] = self.store.row_writer(block, payload.shard, payload.attempt)
            self._writers[key].write(x, y, h_before - x)

    def ending_blocks(self, plan: PhasePlan) -> list[Block]:
        return [b for b in plan.blocks if b[1] - 1 in self.layers]

    def finish_shard(self, shard: int, attempt: int) -> list:
        """Statistics of the blocks ending on this stage for one shard attempt (in
        :meth:`ending_blocks` order), then the token count; committed to the store with the rows
        part when there is one. Stale attempts of the shard are dropped."""
        finished: list[BlockStats] = []
        for block in self.ending_blocks(self._plan_of(shard, attempt)):
            stats = self._take(self._stats, "block", block, shard, attempt)
            writer = self._writers.pop((block, shard, attempt), None)
            part = writer.close() if writer is not None else None
            if self.store is not None:
                self.store.commit_shard(block, shard, stats, part)
            finished.append(stats)
        self._drop_stale(shard, attempt)
        return [*finished, sum(s.tokens for s in finished)]

    def finish_profile(self, shard: int, attempt: int) -> AngleSums | list:
        """Angle sums of the blocks ending on this stage for one shard attempt (a float and a count
        per block, returned to the driver); when the pass gathers statistics and candidates end
        here, a list: the angle sums, then those candidates' statistics (host memory, in
        :meth:`ending_blocks` order). Stale attempts of the shard are dropped."""
        angles = self._angles.pop((shard, attempt), None)
        if angles is None:
            raise StageRestarted(f"stage {self.layers} has no distances for shard {shard}, attempt {attempt} "
                                 "(restarted since)")
        finished: list[CandidateStats] = []
        for block in self.ending_blocks(self._plan_of(shard, attempt)):
            finished.append(self._take(self._candidates, "candidate", block, shard, attempt).cpu())
        self._drop_stale(shard, attempt)
        return [angles, *finished] if finished else angles

    def _take(self, partials: dict[tuple[Block, int, int], Partial], what: str, block: Block, shard: int,
              attempt: int) -> Partial:
        """A block's (or candidate's) partial statistics of one shard attempt, removed from ``partials``;
        a restart since the shard's forward has lost them (the driver then redoes the shard)."""
        partial = partials.pop((block, shard, attempt), None)
        if partial is None:
            raise StageRestarted(f"stage {self.layers} has no statistics for {what} {block}, shard {shard}, "
                                 f"attempt {attempt} (restarted since)")
        return partial

    def _plan_of(self, shard: int, attempt: int) -> PhasePlan:
        """The pass's plan, which a restart since the shard's forward has lost (the driver then redoes
        the shard)."""
        plan = self.plan
        if plan is None:
            raise StageRestarted(f"stage {self.layers} has no plan for shard {shard}, attempt {attempt} "
                                 "(restarted since)")
        return plan

    def statistics_room(self, blocks: tuple[Block, ...], shards: int, *, weighted: bool = False) -> str | None:
        """None when this stage can gather the statistics of the candidates among ``blocks`` ending
        on it for ``shards`` shards at once within half its device's free memory
        (:func:`~replaceme.memory.held_fits`); else why not."""
        count = sum(1 for b in blocks if b[1] - 1 in self.layers)
        need = count * CandidateStats.nbytes(self.model.hidden_size, weighted=weighted) * shards
        free = free_bytes(self.device)
        if held_fits(need, free):
            return None
        return (f"layers {self.layers.start}-{self.layers.stop - 1} would hold {count} candidates' statistics for "
                f"{shards} shards in flight, {gib(need)} of {gib(free)} free on {self.device.type}")

    def add_stats(self, a: Partial, b: Partial) -> Partial:
        """One step of the driver's reductions of partial statistics (a block's or a candidate's)."""
        a += b
        return a

    def load_stats(self, block: Block, shard: int) -> BlockStats:
        """A shard's partials committed to the store by an earlier run (resume)."""
        return self.store.load_stats(block, shard)

    def _drop_stale(self, shard: int, attempt: int) -> None:
        for key in _earlier(self._stats, shard, attempt):
            del self._stats[key]
        for key in _earlier(self._candidates, shard, attempt):
            del self._candidates[key]
        for key in _earlier(self._angles, shard, attempt):
            del self._angles[key]
        for key in _earlier(self._writers, shard, attempt):
            self._writers.pop(key).close()


def _earlier(partials: dict, shard: int, attempt: int) -> list[tuple]:
    """Keys (ending with shard, attempt) of the shard's earlier attempts."""
    return [key for key in partials if key[-2] == shard and key[-1] < attempt]
