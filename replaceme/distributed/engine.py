"""Profile and calibration on a Ray cluster: R replicas × S pipelined stage actors, statistics
reduced in a tree.

The calibration set is cut into data shards (``engine.batches_per_shard`` batches each); shards
go to whichever replica has room, their micro-batches flow stage to stage with several in flight,
and the stage ending a block returns (and, with an activation store, commits) the shard's
partial statistics. Partials are summed pairwise on the stage actors, level by level (a tree),
so no process holds more than a few of them at once, and each block is solved once on the driver.
The tree's leaves are the shards in index order and its shape depends on the shard count only, so
the sums are bit-identical however the shards arrived, were retried or were resumed from a store.
Block selection (``profile``) runs the same way over every layer; its partials are a float and a
token count per candidate block, so the driver simply sums them. With statistics, the same pass
gathers every candidate block's least-squares statistics on the stage holding its last layer, and
each candidate's shard partials are summed on the stage actors in shard order as the shards
complete (a left fold, so a partial waits only for the shards before it), so a block selected by
distance is fitted without a second pass.

A worker that dies takes its shard's unfinished partials with it: the actor is restarted and the
shard is re-run under a new attempt number, so every shard counts exactly once. With an activation
store, a rerun with the same run id skips the shards already committed there.

Fitting blocks sequentially (each later block on the stream of the model whose earlier blocks are
replaced) needs each earlier map before the later block's pass, so it takes one pass per block;
fitting on the unpruned model takes one pass for all blocks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from replaceme.activations import StoredRows
from replaceme.blocks import Block
from replaceme.config import EngineConfig
from replaceme.data import Batch
from replaceme.distributed.cluster import connect, require_ray, reserve
from replaceme.distributed.stage import Payload, PhasePlan, Stage, StageRestarted
from replaceme.engine import BlockCapture, Estimator, Profile, angle_sums
from replaceme.errors import ReplaceMeError
from replaceme.memory import free_bytes, gib, held_fits
from replaceme.planner import layer_weights, model_shape, split_stages
from replaceme.progress import progress
from replaceme.stats import BlockStats, CandidateStats

log = logging.getLogger("replaceme")
# Ray's own types are not analysed here (mypy skips the ray package), so its handles are Any:
ActorHandle = Any  # a Stage actor: its methods are called as ``actor.method.remote(...)``
ObjectRef = Any  # a ref to a Ray object (a Payload, partial statistics, a token count, ...)


def split_layers(model_config: dict, needed_layers: int, stages: int) -> list[range]:
    """The layers of each stage, cut as ``replaceme plan`` prints them: contiguous ranges whose
    heaviest (stage 0 also holds the embeddings) is as light as possible."""
    if stages > needed_layers:
        raise ReplaceMeError(f"engine.stages: {stages} stages but only {needed_layers} layers are needed; "
                             f"use at most {needed_layers}")
    weights = layer_weights(model_shape(model_config), needed_layers)
    return [range(a, b) for a, b in split_stages(weights, stages)]


@dataclass
class _Shard:
    index: int
    batches: list[Batch]
    attempt: int = 0
    outputs: list[ObjectRef] = field(default_factory=list)  # awaited: last-stage results, then counts or angle sums
    waiting: set[ObjectRef] = field(default_factory=set)  # of those, not yet returned
    stats: dict[Block, ObjectRef] | None = None  # block → partials ref, once the shard's forward is done
    results: list = field(default_factory=list)  # what the stages' finish calls returned (small)


@dataclass
class _Pipeline:
    group: Any  # its placement group
    stages: list[tuple[ActorHandle, range]]  # (actor, layers)
    running: int = 0  # shards in flight


@dataclass
class StageSettings:
    """How each stage actor opens the model (plain data, shipped to the workers)."""

    model_uri: str
    model_config: dict  # its config.json, to cut the layers into stages
    device: str
    dtype: str
    allow_pickle: bool = False
    storage_options: dict | None = None


class RayEngine:
    """Same ``distances`` and ``calibrate`` passes as :class:`replaceme.engine.LocalEngine`, on a Ray cluster.

    The stage actors live from the first pass until :meth:`close` (or a failed pass), so that a
    calibration after a profile reuses the layers the stages have loaded."""

    def __init__(self, settings: StageSettings, batches: Sequence[Batch], engine: EngineConfig, *,
                 store=None, save_rows: bool = False, progress: bool = True) -> None:
        if not batches:
            raise ReplaceMeError("dataset: no calibration batches; the calibration set is empty")
        self.settings = settings
        self.engine = engine
        self.store = store
        self.save_rows = save_rows and store is not None
        self.progress = progress
        size = engine.batches_per_shard
        self.shards = [list(batches[i:i + size]) for i in range(0, len(batches), size)]
        self.ray = connect(engine.address)
        self.seconds = {"start_workers": 0.0, "passes": 0.0}  # actor start and layer loading vs. the passes
        self._pipelines: list[_Pipeline] = []
        self._pipeline_layers = 0  # the first layers the running stages hold

    def close(self) -> None:
        """Stop the stage actors and free their placement groups (and so their CPUs and GPUs)."""
        self._stop(self._pipelines)
        self._pipelines, self._pipeline_layers = [], 0

    def _pipelines_for(self, needed_layers: int) -> list[_Pipeline]:
        """Stages holding at least the first ``needed_layers`` layers: those of the previous pass when
        they do (a profile pass holds every layer, so calibration after it loads no weights again),
        else new ones."""
        if self._pipelines and self._pipeline_layers >= needed_layers:
            return self._pipelines
        self.close()
        started = time.perf_counter()
        self._pipelines, self._pipeline_layers = self._start_pipelines(needed_layers), needed_layers
        self.seconds["start_workers"] += time.perf_counter() - started
        return self._pipelines

    def distances(self, block_size: int) -> list[tuple[int, int, float]]:
        return self.profile(block_size).distances

    def profile(self, block_size: int, *, statistics: bool = False, weighted: bool = False) -> Profile:
        """Mean angular distance of every block of ``block_size`` layers starting at layer 1 or later,
        on stages covering every layer (the candidate blocks span the whole depth), and with
        ``statistics`` every such block's statistics on the unpruned stream, from the same pass
        (with ``weighted``, their stream-weighted part too, for residual selection).

        Each micro-batch carries its rows after the last ``block_size`` layers (and the X rows of the
        candidates open) across stage boundaries, each stage adds the angles (and statistics) of the
        blocks ending on it per shard attempt, and the driver sums the shards' angle partials (a
        float and a count per block), each shard once (its completed attempt). The candidates'
        statistics are summed on the stage actors in shard order. When they would not fit on some
        stage (:meth:`_statistics_blocks`), or a stage worker holding a running sum died, the
        profile returns distances only (``candidates`` None) and the caller fits in a second pass."""
        num_layers = int(self.settings.model_config["num_hidden_layers"])
        angles = angle_sums(block_size, num_layers)
        pipelines = self._pipelines_for(num_layers)
        started = time.perf_counter()
        try:
            blocks = self._statistics_blocks(pipelines, block_size, num_layers, weighted) if statistics else ()
            plan = PhasePlan(blocks, {}, num_layers, save_rows=False, profile=block_size, weighted=weighted)
            self._send_plan(pipelines, plan)
            fold = _ShardOrderFold(blocks, _reducers(pipelines, blocks))
            # Added in shard order (not arrival order), so the distances do not depend on timing.
            for shard in sorted(self._run_shards(pipelines, plan, committed=set(), on_done=fold.add),
                                key=lambda s: s.index):
                for partial in shard.results:
                    angles += partial
            candidates = fold.result(self.ray) if blocks else None
        except BaseException:
            self.close()
            raise
        self.seconds["passes"] += time.perf_counter() - started
        return Profile(angles.distances(), candidates)

    def _statistics_blocks(self, pipelines: list[_Pipeline], block_size: int, num_layers: int,
                           weighted: bool) -> tuple[Block, ...]:
        """Every candidate block, when each stage can hold the statistics of those ending on it for
        the shards in flight (half its device's free memory) and this
        process can hold all their sums; else none (the profile then measures distances only)."""
        blocks = tuple((s, s + block_size) for s in range(1, num_layers - block_size + 1))
        shards = self.engine.shards_in_flight
        refusals = [r for r in self.ray.get([actor.statistics_room.remote(blocks, shards, weighted=weighted)
                                             for p in pipelines for actor, _ in p.stages]) if r]
        hidden = model_shape(self.settings.model_config).hidden_size
        need = len(blocks) * CandidateStats.nbytes(hidden, weighted=weighted)
        free = free_bytes(torch.device("cpu"))
        if not held_fits(need, free):
            refusals.append(f"their sums take {gib(need)} of the {gib(free)} free in this process")
        if refusals:
            log.warning("not gathering the %d candidate blocks' statistics in the profile pass (%s); the selected "
                        "blocks are fitted in a second pass", len(blocks), "; ".join(refusals))
            return ()
        return blocks

    def calibrate(self, blocks: Sequence[Block], estimator: Estimator, *, sequential: bool = True,
                  keep_activations: bool = False) -> list[tuple[BlockCapture, torch.Tensor]]:
        if keep_activations and not self.save_rows:
            raise ReplaceMeError("activations.uri: an iterative estimator on engine.backend: ray reads the "
                                 "activation rows back from the store; set activations.uri")
        blocks = sorted(blocks)
        phases = [[b] for b in blocks] if sequential else [blocks]
        pipelines = self._pipelines_for(max(e for _, e in blocks))
        try:
            results: list[tuple[BlockCapture, torch.Tensor]] = []
            applied: dict[Block, torch.Tensor] = {}
            for phase in phases:
                started = time.perf_counter()
                plan = PhasePlan(tuple(phase), dict(applied), max(e for _, e in phase), self.save_rows)
                for block, stats in self._run_phase(pipelines, plan).items():
                    capture = BlockCapture(block, stats, StoredRows(self.store, block) if self.save_rows else None)
                    transform = estimator(capture)
                    results.append((capture, transform))
                    if sequential:
                        applied[block] = transform
                self.seconds["passes"] += time.perf_counter() - started
            return results
        except BaseException:
            self.close()
            raise

    # --- one pass over the calibration set -----------------------------------------------------

    def _run_phase(self, pipelines: list[_Pipeline], plan: PhasePlan) -> dict[Block, BlockStats]:
        self._send_plan(pipelines, plan)
        committed = self._committed(plan)
        partials: dict[Block, dict[int, ObjectRef]] = {b: {} for b in plan.blocks}  # block → shard index → ref
        for shard in self._run_shards(pipelines, plan, committed):
            for block, ref in _partials(shard).items():
                partials[block][shard.index] = ref
        totals: dict[Block, BlockStats] = {}
        reducers = [actor for p in pipelines for actor, layers in p.stages if layers.start < plan.end_layer]
        for block in plan.blocks:
            for n, index in enumerate(sorted(committed)):
                partials[block][index] = reducers[n % len(reducers)].load_stats.remote(block, index)
            # Summed in shard order, whichever shard arrived, was retried or was resumed first: the
            # same calibration set gives bit-identical statistics however the run went.
            totals[block] = tree_sum([partials[block][i] for i in sorted(partials[block])], reducers)
            if self.store is not None:  # written last: the block's rows and statistics are complete
                self.store.write_manifest(block, totals[block].xtx.shape[0], expected_shards=len(self.shards))
        return totals

    def _run_shards(self, pipelines: list[_Pipeline], plan: PhasePlan, committed: set[int],
                    on_done: Callable[[_Shard], None] | None = None) -> list[_Shard]:
        """Every shard not yet committed through the pipelines, retried where a worker died; returns
        each shard once, as its last (complete) attempt left it (also given to ``on_done`` as it completes)."""
        queue = deque(_Shard(i, batches) for i, batches in enumerate(self.shards) if i not in committed)
        done: list[_Shard] = []
        pending: dict[ObjectRef, tuple[_Pipeline, _Shard]] = {}  # outstanding ref → (pipeline, shard)
        per_pipeline = self.engine.shards_in_flight
        with progress(total=len(self.shards), initial=len(committed), desc="profile" if plan.profile else "calibrate",
                      unit="shard", disable=not self.progress) as bar:
            while queue or pending:
                for pipeline in sorted(pipelines, key=lambda p: p.running):
                    if queue and pipeline.running < per_pipeline:
                        self._submit(pipeline, queue.popleft(), plan, pending)
                pipeline, shard = self._next_returned(pending)
                try:
                    results = self.ray.get(shard.outputs)  # small (no hidden states come back); raises what failed
                    if shard.stats is None:  # forward done: collect its partials, without waiting
                        self._finish(pipeline, shard, plan, pending)
                        continue
                    shard.results = results
                    done.append(shard)
                    if on_done is not None:
                        on_done(shard)
                    bar.update()
                except Exception as exc:  # noqa: BLE001 - _retry_or_raise re-raises what is not a worker death
                    self._retry_or_raise(exc, shard)
                    self._wait_alive(pipeline, plan)
                    queue.appendleft(shard)
                pipeline.running -= 1
        return done

    def _send_plan(self, pipelines: list[_Pipeline], plan: PhasePlan) -> None:
        self.ray.get([actor.set_plan.remote(plan) for p in pipelines for actor, _ in p.stages])

    def _submit(self, pipeline: _Pipeline, shard: _Shard, plan: PhasePlan,
                pending: dict[ObjectRef, tuple[_Pipeline, _Shard]]) -> None:
        """Every micro-batch of the shard through the stages the pass needs; actors run them as they
        arrive, so stage k works on one micro-batch while stage k+1 works on the previous one."""
        used = [actor for actor, layers in pipeline.stages if layers.start < plan.end_layer]
        refs = []
        for batch in shard.batches:
            ref = Payload(shard.index, shard.attempt, batch.input_ids, batch.attention_mask)
            for actor in used:
                ref = actor.forward.remote(ref)
            refs.append(ref)
        shard.outputs, shard.waiting, shard.stats = refs, set(refs), None
        for ref in refs:
            pending[ref] = (pipeline, shard)
        pipeline.running += 1

    def _next_returned(self, pending: dict[ObjectRef, tuple[_Pipeline, _Shard]]) -> tuple[_Pipeline, _Shard]:
        """Wait until everything outstanding for some shard has come back (or failed)."""
        while True:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            pipeline, shard = pending.pop(ready[0])
            shard.waiting.discard(ready[0])
            if not shard.waiting:
                return pipeline, shard

    def _finish(self, pipeline: _Pipeline, shard: _Shard, plan: PhasePlan,
                pending: dict[ObjectRef, tuple[_Pipeline, _Shard]]) -> None:
        """Ask the stages ending a block for the shard's partials. They stay object refs: the driver
        waits for the small token counts (proof that they were produced) but never fetches them.
        A profile pass's angle partials are themselves small: the driver fetches them (and keeps
        refs to the candidates' statistics)."""
        stats: dict[Block, ObjectRef] = {}
        shard.stats, shard.outputs = stats, []
        for actor, layers in pipeline.stages:
            ending = [b for b in plan.blocks if b[1] - 1 in layers]
            if plan.profile:  # every stage holds angle sums (a float per block): fetched by the driver
                if ending:
                    angles, *refs = actor.finish_profile.options(num_returns=len(ending) + 1).remote(
                        shard.index, shard.attempt)
                    stats.update(zip(ending, refs, strict=True))  # num_returns: one ref per ending block
                else:
                    angles = actor.finish_profile.remote(shard.index, shard.attempt)
                shard.outputs.append(angles)
                continue
            if ending:
                *refs, tokens = actor.finish_shard.options(num_returns=len(ending) + 1).remote(shard.index, shard.attempt)
                stats.update(zip(ending, refs, strict=True))  # num_returns: one ref per ending block
                shard.outputs.append(tokens)
        shard.waiting = set(shard.outputs)
        for ref in shard.outputs:
            pending[ref] = (pipeline, shard)

    def _retry_or_raise(self, exc: Exception, shard: _Shard) -> None:
        exceptions = self.ray.exceptions
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ReplaceMeError):
            raise ReplaceMeError(str(cause)) from None
        if not isinstance(exc, (exceptions.RayActorError, exceptions.ObjectLostError)) \
                and not isinstance(cause, StageRestarted):
            raise exc
        if shard.attempt >= self.engine.max_retries:
            raise ReplaceMeError(f"engine: data shard {shard.index} failed {shard.attempt + 1} times "
                                 f"(last: {type(exc).__name__}); see the Ray logs for the worker's error") from None
        shard.attempt += 1
        log.warning("a stage worker died on data shard %d (%s); retrying it, attempt %d",
                    shard.index, type(exc).__name__, shard.attempt + 1)

    def _wait_alive(self, pipeline: _Pipeline, plan: PhasePlan) -> None:
        """Wait for restarted actors (they reload their layers) and give them the pass's plan again."""
        for actor, _ in pipeline.stages:
            for _ in range(self.engine.max_retries + 1):
                try:
                    self.ray.get(actor.set_plan.remote(plan), timeout=self.engine.resource_timeout_s)
                    break
                except self.ray.exceptions.RayActorError:
                    continue

    def _committed(self, plan: PhasePlan) -> set[int]:
        """Shards whose partials for every block of the pass are already in the store (resume)."""
        if self.store is None:
            return set()
        done = set.intersection(*(set(self.store.committed_shards(b)) for b in plan.blocks))
        done &= set(range(len(self.shards)))
        if done:
            log.info("resuming: %d of %d data shards already committed to the activation store", len(done),
                     len(self.shards))
        return done

    # --- actors --------------------------------------------------------------------------------

    def _start_pipelines(self, needed_layers: int) -> list[_Pipeline]:
        """R pipelines of S stage actors, each pipeline packed into its own placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        e = self.engine
        ranges = split_layers(self.settings.model_config, needed_layers, e.stages)
        bundle = {"CPU": e.cpus_per_stage, **({"GPU": e.gpus_per_stage} if e.gpus_per_stage else {})}
        actor_class = self.ray.remote(Stage)
        pipelines: list[_Pipeline] = []
        for replica in range(e.replicas):
            try:
                group = reserve([dict(bundle) for _ in ranges], timeout_s=e.resource_timeout_s,
                                what=f"pipeline {replica + 1} of {e.replicas} ({e.stages} stages of {bundle})")
            except ReplaceMeError:
                self._stop(pipelines)
                raise
            stages = [(actor_class.options(
                num_cpus=e.cpus_per_stage, num_gpus=e.gpus_per_stage, max_restarts=e.max_retries, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote(self.settings.model_uri, layers, device=self._device(), dtype=self.settings.dtype,
                     allow_pickle=self.settings.allow_pickle, storage_options=self.settings.storage_options,
                     store=self.store), layers) for index, layers in enumerate(ranges)]
            pipelines.append(_Pipeline(group, stages))
        try:
            self.ray.get([actor.ready.remote() for p in pipelines for actor, _ in p.stages])
        except self.ray.exceptions.RayActorError as exc:
            self._stop(pipelines)
            raise ReplaceMeError(f"engine: a stage worker failed to start ({_cause(exc)})") from None
        return pipelines

    def _device(self) -> str:
        return "cuda" if self.engine.gpus_per_stage > 0 else "cpu"

    def _stop(self, pipelines: list[_Pipeline]) -> None:
        from ray.util.placement_group import remove_placement_group

        for pipeline in pipelines:
            for actor, _ in pipeline.stages:
                self.ray.kill(actor)
            remove_placement_group(pipeline.group)


class _ShardOrderFold:
    """Each candidate's shard partials summed on a stage actor as the shards complete, in shard
    order whatever order they complete in: ((p0 + p1) + p2) + …, so the sums do not depend on
    timing, and a partial waits in the object store only until the shards before it are done."""

    def __init__(self, blocks: Sequence[Block], reducers: dict[Block, ActorHandle]) -> None:
        self.blocks = list(blocks)
        self.reducers = reducers
        self.totals: dict[Block, ObjectRef] = {}  # block → ref of the sum of shards < self.next
        self.waiting: dict[int, dict[Block, ObjectRef]] = {}  # shard index → its partials' refs
        self.next = 0

    def add(self, shard: _Shard) -> None:
        if not self.blocks:
            return
        self.waiting[shard.index] = _partials(shard)
        while self.next in self.waiting:
            for block, ref in self.waiting.pop(self.next).items():
                total = self.totals.get(block)
                self.totals[block] = ref if total is None else self.reducers[block].add_stats.remote(total, ref)
            self.next += 1

    def result(self, ray) -> dict[Block, CandidateStats] | None:
        """The candidates' sums, or None (with a warning) when a stage worker died holding one."""
        try:
            return dict(zip(self.blocks, ray.get([self.totals[b] for b in self.blocks]), strict=True))
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
            log.warning("the candidate blocks' statistics were lost with a stage worker (%s); the selected blocks "
                        "are fitted in a second pass", _cause(exc))
            return None


def _partials(shard: _Shard) -> dict[Block, ObjectRef]:
    """The partials' refs of a shard that :meth:`RayEngine._run_shards` returned (its forward done)."""
    if shard.stats is None:
        raise AssertionError(f"data shard {shard.index} has no partials: its forward is not done")
    return shard.stats


def _reducers(pipelines: list[_Pipeline], blocks: Sequence[Block]) -> dict[Block, ActorHandle]:
    """The actor summing each candidate's partials: the stage holding its last layer, in the
    pipelines in turn (the sums spread over the replicas)."""
    return {block: next(actor for actor, layers in pipelines[n % len(pipelines)].stages if block[1] - 1 in layers)
            for n, block in enumerate(blocks)}


def tree_sum(refs: list[ObjectRef], reducers: list[ActorHandle]) -> BlockStats:
    """Sum partial statistics pairwise on the (warm, already placed) stage actors, level by level;
    only the final sum reaches the driver. Ray tasks would each need a fresh worker process that
    imports torch, and on a cluster whose CPUs the stages hold, a CPU to run on."""
    ray = require_ray()
    turn = 0
    while len(refs) > 1:
        level = []
        for i in range(0, len(refs), 2):
            if i + 1 < len(refs):
                level.append(reducers[turn % len(reducers)].add_stats.remote(refs[i], refs[i + 1]))
                turn += 1
            else:
                level.append(refs[i])
        refs = level
    return ray.get(refs[0])


def _cause(exc: BaseException) -> str:
    lines = str(getattr(exc, "cause", None) or exc).strip().splitlines()
    return lines[-1][:300] if lines else type(exc).__name__
