"""The ReplaceMe recipe: profile → calibrate (+ solve) → merge → evaluate, as composable steps.

Each step reads its inputs from and writes its artefacts to the run's output folder, then its
completion marker (:mod:`replaceme.markers`), so the CLI can run them one by one (``replaceme
calibrate`` then ``replaceme merge`` …), the pipeline steps in ``ops/`` run them in pods, and
``replaceme run`` runs them all in a staging folder that it publishes only when complete and
resumes from its completed steps after a crash. :class:`StepRunner` is that one mechanism.
Everything a user can get wrong is checked before any work: what every step needs in
:meth:`Context.__init__`, the inputs only some steps read (:attr:`Context.INPUTS`) by
:meth:`Context.require` before the step that reads them (all of them first, in ``run``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from replaceme import __version__, card, evalcache, hub, lineage, markers, peak_memory
from replaceme.activations import ActivationStore, StoredRows
from replaceme.blocks import (
    Block,
    check_blocks,
    check_selection,
    distances_to_csv,
    residuals_from_csv,
    reusable_distances,
    select_blocks,
)
from replaceme.checkpoint import Checkpoint
from replaceme.config import ReplaceMeConfig, redact_uri
from replaceme.data import Batch, load_texts, make_batches
from replaceme.engine import Activations, BlockCapture, CalibrationEngine, LocalEngine
from replaceme.errors import ReplaceMeError
from replaceme.families import check_estimator, family_for
from replaceme.layerwise import LayerwiseModel, resolve_device, resolve_dtype
from replaceme.memory import free_bytes, gib
from replaceme.merge import kept_layers, merge_checkpoint
from replaceme.outputs import (
    OWNER_FILE,
    OutputDir,
    claim_in_place,
    discard_staging,
    is_inside,
    local_path,
    locked,
    staged_output,
)
from replaceme.plots import plot_distances
from replaceme.selection import Ranking, stream_residuals
from replaceme.solvers import mean_cosine_distance, solve_cosine, solve_cosine_streaming, solve_lstsq
from replaceme.stats import BlockStats, CandidateStats
from replaceme.storage import filesystem

log = logging.getLogger("replaceme")
SOLVER_DETAILS = "calibration/solver.json"  # per-block residuals of the current maps, for report.json
PROFILED_STATISTICS = "profile"  # the selected blocks' statistics, gathered by the profile pass
SELECTION = "selection.json"  # the criterion that chose the blocks, and what each criterion would choose
LM_EVAL_HEADROOM = 1.2  # lm-eval holds the model and its batches: the weights plus a fifth


class Context:
    """Validated inputs of a run, opened once and shared by the steps. The model, its family and the
    blocks are checked here; the inputs only some steps read (``INPUTS``: the calibration texts and
    the tokenizer they need, the eval texts and the cache of the source's perplexity on them, the
    activation store) are opened on first use, and :meth:`require` opens a step's inputs before its
    work, so that ``replaceme merge`` or ``solve`` never reads or tokenizes the calibration set while
    a bad input still fails before any work."""

    INPUTS = ("texts", "eval_texts", "eval_cache", "store")  # in the order `run` checks them

    def __init__(self, config: ReplaceMeConfig, *, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.step_memory: dict[str, dict[str, float]] = {}
        self.model_uri = _resolve_model_path(config)
        self.storage_options = config.storage_options(self.model_uri)
        self.checkpoint = Checkpoint(self.model_uri, allow_pickle=config.allow_pickle,
                                     storage_options=self.storage_options)
        self.family = family_for(self.checkpoint.config)
        check_estimator(self.family, config.diag)
        self.checkpoint.validate(self.family.layer_prefix)  # weights, shards, layer count, tokenizer: before any work
        self.num_layers = int(self.checkpoint.config["num_hidden_layers"])
        if is_inside(config.output_dir, self.model_uri):
            raise ReplaceMeError(f"output_dir: {config.output_dir} is inside the source model {self.model_uri}; "
                                 "the source is never written to, choose a folder outside it")
        self.blocks = check_blocks(config.blocks, self.num_layers, config.merge_consecutive) if config.blocks else None
        if self.blocks is None:  # selected by distance: refuse settings that cannot fit before any layer runs
            check_selection(self.num_layers, config.layers_to_skip, config.num_A, config.min_distance_layer,
                            config.merge_consecutive)
        if config.activations.uri is None and config.engine.backend == "ray" and config.method == "cosine":
            raise ReplaceMeError("activations.uri: method: cosine on engine.backend: ray reads the activation "
                                 "rows back from a store; set activations.uri (file://… or s3://…)")
        self.device = resolve_device(config.device)

    def require(self, *inputs: str) -> None:
        """Open these ``INPUTS`` now (each once per run): a bad one fails here, before the work that reads it."""
        for name in inputs:
            getattr(self, name)

    @cached_property
    def texts(self) -> list[str]:
        c = self.config
        return load_texts(c.dataset, column=c.dataset_column, split=c.dataset_subset, size=c.dataset_size,
                          tokenizer=self.tokenizer, field="dataset", storage_options=c.storage_options(c.dataset))

    @cached_property
    def eval_texts(self) -> list[str] | None:
        e = self.config.eval
        if e is not None and e.lm_eval_tasks:
            _require_lm_eval()
            self._check_lm_eval_fits()
        if e is None or e.dataset is None:
            return None
        texts = load_texts(e.dataset, column=e.dataset_column, split=e.dataset_subset, size=e.dataset_size,
                           tokenizer=self.tokenizer, field="eval.dataset", storage_options=self.config.storage_options(e.dataset))
        return texts

    def _check_lm_eval_fits(self) -> None:
        """lm-eval loads the whole pruned model on one device of this process (the perplexity here runs
        layer by layer and fits any model): refuse before any work when it cannot fit."""
        entries = self.checkpoint.entries
        if not entries:
            return  # a checkpoint of pickles: no sizes to read without loading it
        total = sum(entry.nbytes for entry in entries.values())
        layers = sum(entry.nbytes for name, entry in entries.items() if name.startswith(self.family.layer_prefix))
        c = self.config
        removed = sum(e - s for s, e in self.blocks) if self.blocks else c.layers_to_skip * c.num_A
        weights = total - layers * removed // self.num_layers
        needed = int(weights * LM_EVAL_HEADROOM)
        free = free_bytes(self.device)
        if needed > free:
            raise ReplaceMeError(
                f"eval.lm_eval_tasks: lm-eval loads the whole pruned model on one device, about {gib(weights)} of "
                f"weights ({gib(needed)} with activations), and {self.device} has {gib(free)} free; this run's "
                "perplexity runs layer by layer and fits, lm-eval does not. Remove eval.lm_eval_tasks and run "
                "lm-eval on a machine that holds the model: lm_eval --model hf --model_args "
                f"pretrained={c.output_dir}/model --tasks {','.join(c.eval.lm_eval_tasks if c.eval else [])} "
                "(lm-eval on the Ray cluster is not built)")

    @cached_property
    def eval_cache(self) -> evalcache.PerplexityCache | None:
        """Where the source's perplexity on the eval set is cached (``eval.cache``); None: not cached."""
        where = evalcache.location(self.config.eval.cache) if self.config.eval is not None else None
        if where is None:
            return None
        if is_inside(where, self.model_uri):
            raise ReplaceMeError(f"eval.cache: {redact_uri(where)} is inside the source model {self.model_uri}; the "
                                 "source is never written to, choose a folder outside it (or false for no cache)")
        return evalcache.PerplexityCache(where, self.config.storage_options(where))

    @cached_property
    def store(self) -> ActivationStore | None:
        """The activation store (``activations.uri``), probed with a write on first use."""
        if self._activation_store is not None:
            self._activation_store.check()
        return self._activation_store

    @cached_property
    def _activation_store(self) -> ActivationStore | None:
        a = self.config.activations
        if a.uri is None:
            return None
        return ActivationStore(a.uri, self.run_id, endpoint_url=self.config.storage.endpoint_url,
                               options=self.config.storage.options, row_group_rows=a.row_group_rows)

    @property
    def output_options(self) -> dict[str, Any]:
        return self.config.storage_options(self.config.output_dir)

    @cached_property
    def statistics_dtype(self) -> str:
        return statistics_dtype(self.config, lambda: self.checkpoint)

    @cached_property
    def run_id(self) -> str:
        """Names the run in the activation store (see :func:`replaceme.markers.run_id`)."""
        return markers.run_id(self.config, self.statistics_dtype)

    def input_paths(self) -> dict[str, str]:
        """The run's inputs that exist at a path or URI (not Hub names): an output must never hold one."""
        c = self.config
        paths = {"model_path": self.model_uri, "dataset": c.dataset,
                 "eval.dataset": c.eval.dataset if c.eval else None, "distances_path": c.distances_path}
        return {field: path for field, path in paths.items() if path and ("://" in path or os.path.exists(path))}

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        with _local_copy(self.checkpoint) as folder:
            try:
                return AutoTokenizer.from_pretrained(folder)
            except Exception as exc:  # noqa: BLE001 - transformers raises many kinds, deep inside
                raise ReplaceMeError(f"model_path: the tokenizer in {self.model_uri} cannot be loaded "
                                     f"({type(exc).__name__}); copy the base model's tokenizer files into it") from None

    @cached_property
    def batches(self) -> list[Batch]:
        c = self.config
        return make_batches(self.texts, self.tokenizer, batch_size=c.batch_size, max_length=c.max_length, field="dataset",
                            context=self.checkpoint.config.get("max_position_embeddings"))

    @cached_property
    def eval_batches(self) -> list[Batch]:
        e, c, texts = self.config.eval, self.config, self.eval_texts
        if e is None or texts is None:
            raise ReplaceMeError("eval: no evaluation texts are configured; set eval.dataset")
        return make_batches(texts, self.tokenizer, batch_size=e.batch_size or c.batch_size,
                            max_length=e.max_length or c.max_length, field="eval.dataset",
                            context=self.checkpoint.config.get("max_position_embeddings"),
                            length_key="eval.max_length" if e.max_length else "max_length")

    @cached_property
    def engine(self) -> CalibrationEngine:
        """The engine of the passes over the calibration set, shared by profile and calibrate (a Ray
        run loads its stages once)."""
        return calibration_engine(self)

    def close_engine(self) -> None:
        if "engine" in self.__dict__:
            self.__dict__.pop("engine").close()

    def layerwise(self, checkpoint: Checkpoint) -> LayerwiseModel:
        dtype = resolve_dtype(self.config.compute_dtype, self.device, checkpoint.dtype)
        return LayerwiseModel(checkpoint, device=self.device, dtype=dtype)

    @contextmanager
    def timed(self, step: str):
        """Record the step's wall time and peak memory (for report.json and MLflow)."""
        peak_memory.reset_peak()
        started = time.perf_counter()
        yield
        self.timings[step] = round(time.perf_counter() - started, 3)
        self.step_memory[step] = peak_memory.peak_mb()

    def calibration_record(self) -> dict[str, Any]:
        """The calibration set's identity (URI, digest of the texts, rows) and token count: calibrate
        records it in its marker, so that the report names the data the maps were fitted on without
        reading it again."""
        return {"data": lineage.dataset_identity(self.config.dataset, self.texts),
                "tokens": sum(b.num_tokens for b in self.batches)}

    def lineage(self, calibration: dict[str, Any] | None = None, *, evaluated: bool = True) -> dict[str, Any]:
        """Source model, data, code and job identity, recorded in report.json for MLflow. ``calibration``:
        the identity calibrate recorded (else the texts are read now); ``evaluated``: the eval texts were used."""
        c = self.config
        data = {"calibration": calibration or lineage.dataset_identity(c.dataset, self.texts)}
        if evaluated and c.eval is not None and c.eval.dataset is not None and self.eval_texts is not None:
            data["evaluation"] = lineage.dataset_identity(c.eval.dataset, self.eval_texts)
        store = self._activation_store
        stores = {"statistics": store.location if store else f"{c.output_dir.rstrip('/')}/calibration"}
        if store and c.activations.save_rows:
            stores["activations"] = store.location
        return {"source_model": lineage.model_identity(self.checkpoint), "datasets": data,
                "code": lineage.code_version(), **lineage.job_ids(), "stores": stores}


# --- steps -----------------------------------------------------------------------------------


def profile(ctx: Context, out: OutputDir) -> list[Block]:
    """The blocks to remove: named in the config, or chosen by the ``selection`` criterion from every
    candidate's residual and angular distance (measured, or reused from ``distances_path``); writes
    blocks.json (and distances.csv/.png and selection.json when chosen, and the selected blocks'
    statistics when the profile pass gathered them for the fit)."""
    c = ctx.config
    for earlier in (PROFILED_STATISTICS, SELECTION):  # an earlier profile's: never read by this run's later steps
        out.remove(earlier)
    if ctx.blocks:
        out.write_json("blocks.json", [list(b) for b in ctx.blocks])
        return ctx.blocks
    model_digest = lineage.model_identity(ctx.checkpoint)["digest"]
    saved = _read_distances(ctx)
    candidates = None
    with ctx.timed("profile"):
        if saved is not None and c.distances_path:
            ranking = _saved_ranking(c, saved, model_digest)
            log.info("reusing the block profile from %s", c.distances_path)
        else:  # in this process, or on the Ray stage actors with engine.backend: ray
            ranking, candidates = _measured_ranking(ctx)
        choices = {name: select_blocks(scores, num_blocks=c.num_A, min_start=c.min_distance_layer,
                                       merge_consecutive=c.merge_consecutive, num_layers=ctx.num_layers)
                   for name, scores in ranking.scores().items()}
        blocks = choices[ranking.criterion]
    _save_profiled_statistics(c, out, blocks, candidates)
    csv_text = distances_to_csv(ranking.distances, model_digest, ranking.residuals)
    out.write_text("distances.csv", csv_text)
    out.write_bytes("distances.png", plot_distances(ranking.distances, blocks, c.layers_to_skip))
    out.write_json(SELECTION, ranking.summary(choices))
    if c.distances_path and saved is None:
        fs, path = filesystem(c.distances_path, field="distances_path", options=c.storage_options(c.distances_path))
        fs.pipe_file(path, csv_text.encode())
    out.write_json("blocks.json", [list(b) for b in blocks])
    return blocks


def _saved_ranking(c: ReplaceMeConfig, saved: str, model_digest: str) -> Ranking:
    """The ranking in ``distances_path``, refused for residual selection when it holds distances only."""
    path = c.distances_path or ""
    distances = reusable_distances(saved, path, block_size=c.layers_to_skip, model_digest=model_digest)
    residuals = residuals_from_csv(saved, path)
    if c.selection == "residual" and residuals is None:
        raise ReplaceMeError(f"distances_path: {path} holds angular distances only (saved before blocks were ranked "
                             "by residual); set selection: distance to choose by them, or point distances_path at a "
                             "new file to measure both")
    return Ranking(c.selection, distances, residuals)


def _measured_ranking(ctx: Context) -> tuple[Ranking, dict[Block, CandidateStats] | None]:
    """One profile pass: every candidate's distance and, when the settings need them, statistics."""
    c = ctx.config
    if c.method == "cosine" and isinstance(ctx.engine, LocalEngine) and not ctx.engine.save_rows:
        ctx.engine.check_rows_fit(c.num_A)  # before the profile pass, not after it
    two_passes = c.second_pass_reason
    if two_passes:
        log.info("profile: the selected blocks will be fitted in a second pass: %s", two_passes)
    residual = c.selection == "residual"
    result = ctx.engine.profile(c.layers_to_skip, statistics=c.profile_gathers_statistics, weighted=residual)
    candidates = result.candidates
    if not residual:
        return Ranking(c.selection, result.distances), candidates
    if candidates is None:
        reason = "the candidate blocks' statistics were not gathered (see the warning above)"
        log.warning("selection: residual needs every candidate block's statistics; %s, so the blocks are chosen by "
                    "angular distance", reason)
        return Ranking(c.selection, result.distances, reason=reason), None
    return Ranking(c.selection, result.distances, stream_residuals(candidates)), candidates


def _save_profiled_statistics(c: ReplaceMeConfig, out: OutputDir, blocks: list[Block],
                              candidates: dict[Block, CandidateStats] | None) -> None:
    """The selected blocks' statistics from the profile pass, when they serve the fit: calibrate then
    solves them without a model pass."""
    if candidates is None or c.second_pass_reason is not None:
        return
    if not all(b in candidates for b in blocks):
        log.info("profile: merged consecutive blocks %s are not single candidates; they are fitted in a second pass",
                 [list(b) for b in blocks])
        return
    for s, e in blocks:
        out.write_bytes(f"{PROFILED_STATISTICS}/stats-{s}-{e}.safetensors", candidates[(s, e)].stats.to_bytes())


def _read_distances(ctx: Context) -> str | None:
    """The text of ``distances_path`` when it exists (local path or URI), else None."""
    uri = ctx.config.distances_path
    if not uri:
        return None
    fs, path = filesystem(uri, field="distances_path", options=ctx.config.storage_options(uri))
    return fs.cat_file(path).decode() if fs.exists(path) else None


def profiled_statistics(ctx: Context, out: OutputDir, blocks: list[Block]) -> dict[Block, BlockStats] | None:
    """The blocks' statistics the profile pass of this output gathered, when they serve these settings
    (the profile marker, checked current before calibrate starts, lists them among its artefacts)."""
    profiled = markers.read_marker(out, "profile") or {}
    if ctx.config.second_pass_reason is not None or PROFILED_STATISTICS not in profiled.get("artefacts", {}):
        return None
    names = {b: f"{PROFILED_STATISTICS}/stats-{b[0]}-{b[1]}.safetensors" for b in blocks}
    if not all(out.exists(name) for name in names.values()):
        return None
    return {b: BlockStats.from_bytes(out.read_bytes(name)) for b, name in names.items()}


def calibrate(ctx: Context, out: OutputDir, blocks: list[Block]) -> list[dict[str, Any]]:
    """Solve each block's map from the statistics the profile pass gathered, or else run the model up to
    the last needed layer for them; save maps and statistics."""
    c = ctx.config
    solver = BlockSolver(c)
    with ctx.timed("calibrate"):
        profiled = profiled_statistics(ctx, out, blocks)
        try:
            if profiled is not None:
                log.info("calibrate: solving from the statistics of the profile pass (no second model pass)")
                fits = [(capture, solver(capture)) for capture in (BlockCapture(b, profiled[b], None) for b in blocks)]
            else:
                fits = ctx.engine.calibrate(blocks, solver, sequential=c.sequential,
                                            keep_activations=c.method == "cosine")
        finally:  # the last pass over the calibration set: free the Ray stages (merge tasks need the CPUs)
            ctx.close_engine()
    transforms = {f"{s}-{e}": t.to(torch.float32).cpu().contiguous() for ((s, e), t) in ((cap.block, t) for cap, t in fits)}
    out.write_bytes("transforms.safetensors", save_safetensors(transforms, metadata={"method": c.method}))
    out.write_json("blocks.json", [list(b) for b in blocks])
    details = [solver.details[cap.block] for cap, _ in fits]
    _save_solver_details(out, c, details)
    for capture, _ in fits:
        s, e = capture.block
        out.write_bytes(f"calibration/stats-{s}-{e}.safetensors", capture.stats.to_bytes())
        if isinstance(capture.activations, Activations):  # (rows in a store stay there)
            x, y, residual = capture.activations.tensors()
            out.write_bytes(f"calibration/activations-{s}-{e}.safetensors",
                            save_safetensors({"x": x, "y": y, "residual": residual}))
    return details


def calibration_engine(ctx: Context) -> CalibrationEngine:
    """The engine of the passes over the calibration set (``distances`` for profile, ``calibrate``):
    in this process, or stage actors on a Ray cluster (``engine.backend: ray``)."""
    c = ctx.config
    if c.engine.backend == "local":
        return LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.batches, progress=ctx.progress, store=ctx.store,
                           save_rows=c.activations.save_rows, batches_per_shard=c.engine.batches_per_shard,
                           memory_budget=c.engine.memory_budget)
    from replaceme.distributed.engine import RayEngine, StageSettings

    device = "cuda" if c.engine.gpus_per_stage > 0 else "cpu"
    settings = StageSettings(ctx.model_uri, ctx.checkpoint.config, device, ctx.statistics_dtype,
                             allow_pickle=c.allow_pickle, storage_options=ctx.storage_options)
    return RayEngine(settings, ctx.batches, c.engine, store=ctx.store, save_rows=c.activations.save_rows,
                     progress=ctx.progress)


def solve(ctx: Context, out: OutputDir) -> list[dict[str, Any]]:
    """Re-solve every block from its saved statistics (and activations, for cosine): from the
    activation store when ``activations.uri`` is set, else from the output folder."""
    blocks = saved_blocks(out)
    if not blocks:
        raise ReplaceMeError(f"output_dir: {out.uri} has no blocks.json; run `replaceme calibrate` first")
    if len(blocks) > 1 and ctx.config.sequential:
        log.warning("blocks after the first were calibrated on the stream of the model pruned with the *old* "
                    "maps; re-run calibrate for an exact sequential fit")
    solver = BlockSolver(ctx.config)
    with ctx.timed("solve"):
        transforms = {f"{s}-{e}": solver(_saved_capture(ctx, out, (s, e))).to(torch.float32).contiguous()
                      for s, e in blocks}
    out.write_bytes("transforms.safetensors", save_safetensors(transforms, metadata={"method": ctx.config.method}))
    details = [solver.details[b] for b in blocks]
    _save_solver_details(out, ctx.config, details)
    return details


def _save_solver_details(out: OutputDir, config: ReplaceMeConfig, details: list[dict[str, Any]]) -> None:
    """The maps' residuals and the settings that solved them (a later step may run with others)."""
    out.write_json(SOLVER_DETAILS, {"settings": config.solver_settings(), "blocks": details})


def _saved_capture(ctx: Context, out: OutputDir, block: Block) -> BlockCapture:
    """A block's statistics (and rows, for cosine) from the activation store or the output folder."""
    cosine = ctx.config.method == "cosine"
    if ctx.store is not None:
        return BlockCapture(block, ctx.store.reduce_stats(block), StoredRows(ctx.store, block) if cosine else None)
    s, e = block
    stats = BlockStats.from_bytes(out.read_bytes(f"calibration/stats-{s}-{e}.safetensors"))
    if not cosine:
        return BlockCapture(block, stats, None)
    name = f"calibration/activations-{s}-{e}.safetensors"
    if not out.exists(name):
        raise ReplaceMeError(f"output_dir: {out.uri}/{name} is missing; re-solving with method: cosine "
                             "needs activations, saved by `replaceme calibrate` with method: cosine")
    rows = load_safetensors(out.read_bytes(name))
    return BlockCapture(block, stats, Activations([rows["x"]], [rows["y"]], [rows["residual"]]))


def saved_blocks(out: OutputDir) -> list[Block] | None:
    if not out.exists("blocks.json"):
        return None
    return [(int(s), int(e)) for s, e in json.loads(out.read_text("blocks.json"))]


def required_blocks(out: OutputDir) -> list[Block]:
    """The blocks of ``blocks.json``, which the profile step writes."""
    blocks = saved_blocks(out)
    if not blocks:
        raise ReplaceMeError(f"output_dir: {out.uri} has no blocks.json; run `replaceme profile` first")
    return blocks


def merge(ctx: Context, out: OutputDir) -> None:
    """Fold the saved maps into a pruned copy of the source checkpoint under ``model/``."""
    transforms = load_transforms(out)
    e, o = ctx.config.engine, ctx.config.output
    # The markers decide when model/ is stale; replacing it is always allowed here.
    with ctx.timed("merge"), out.staged("model") as staging:
        if e.backend == "ray" and e.merge_workers > 1:
            from replaceme.distributed.cluster import connect
            from replaceme.distributed.merge import merge_on_ray

            connect(e.address)
            merge_on_ray(ctx.model_uri, transforms, out.fs.unstrip_protocol(staging), workers=e.merge_workers,
                         endpoint_url=ctx.config.storage.endpoint_url, storage_options=ctx.config.storage.options,
                         max_retries=e.max_retries, allow_pickle=ctx.config.allow_pickle, progress=ctx.progress,
                         shard_size=o.shard_bytes, dtype=o.dtype)
        else:
            merge_checkpoint(ctx.checkpoint, transforms, out.fs, staging, progress=ctx.progress,
                             shard_size=o.shard_bytes, dtype=o.dtype)
        write_card(ctx, out, staging)


def write_card(ctx: Context, out: OutputDir, folder: str | None = None, metrics: dict[str, Any] | None = None) -> None:
    """``model/README.md`` (or ``README.md`` in ``folder``, the merge's staging folder): our model card,
    from the blocks, the maps' residuals, the calibration record and, when ``metrics`` are given, what
    evaluate measured (a card never states a number that was not measured on this model)."""
    blocks = required_blocks(out)
    calibration = (markers.read_marker(out, "calibrate") or {}).get("calibration")
    solver = json.loads(out.read_text(SOLVER_DETAILS))["blocks"] if out.exists(SOLVER_DETAILS) else None
    readme = next((name for name in ctx.checkpoint.files() if name.lower() == "readme.md"), None)
    source_card = ctx.checkpoint.read_text(readme) if readme else None
    evaluation = None
    e = ctx.config.eval
    if metrics and e is not None and e.dataset is not None and ctx.eval_texts is not None:
        evaluation = lineage.dataset_identity(e.dataset, ctx.eval_texts)
    criterion = json.loads(out.read_text(SELECTION))["criterion"] if out.exists(SELECTION) else None
    text = card.render_card(ctx.config, num_layers=ctx.num_layers, blocks=blocks, source_uri=ctx.model_uri,
                            source_card=source_card, calibration=calibration, solver=solver, metrics=metrics,
                            evaluation=evaluation, command=card.command_line(), criterion=criterion)
    if folder is None:
        out.write_text(f"model/{card.CARD_FILE}", text)
    else:
        out.fs.pipe_file(f"{folder}/{card.CARD_FILE}", text.encode())


def evaluate(ctx: Context, out: OutputDir) -> dict[str, Any]:
    """Held-out perplexity of the source and of the pruned model in ``model/``. The source's is read
    from ``eval.cache`` when it was computed on these weights, eval batches and settings, else
    computed and stored there (see :mod:`replaceme.evalcache`)."""
    if ctx.eval_texts is None:
        return _lm_eval_metrics(ctx, out, {})
    # The layers before the first fold target are the source's, byte for byte: run them once for both.
    shared = min(s for s, _ in required_blocks(out)) - 1
    budget = ctx.config.engine.memory_budget
    with ctx.timed("evaluate"):
        cache, key, cached = ctx.eval_cache, None, None
        if cache is not None:
            dtype = resolve_dtype(ctx.config.compute_dtype, ctx.device, ctx.checkpoint.dtype)
            key = cache.key(ctx.checkpoint, ctx.eval_batches, dtype=dtype, device=ctx.device)
            cached = cache.get(key) if key else None
        with Checkpoint(f"{out.uri}/model", field="output_dir", storage_options=ctx.output_options) as pruned:
            target = LocalEngine(ctx.layerwise(pruned), ctx.eval_batches, progress=ctx.progress, memory_budget=budget)
            if cached is None:
                source = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.eval_batches, progress=ctx.progress,
                                     memory_budget=budget)
                (before, tokens), (after, _) = source.perplexities([target], shared=shared)
                if cache is not None and key:
                    cache.put(key, before, tokens, source=ctx.model_uri)
            else:  # no source layer runs: the pruned model runs its own first layers (the source's, byte for byte)
                (before, tokens), (after, _) = cached, target.perplexity()
                log.info("evaluate: the source's perplexity %.4f comes from %s", before,
                         cache.entry_uri(key) if cache is not None and key else "the cache")
    metrics: dict[str, Any] = {"perplexity_before": before, "perplexity_before_cached": cached is not None,
                               "perplexity_after": after, "retention": before / after, "eval_tokens": tokens}
    return _lm_eval_metrics(ctx, out, metrics)


def _lm_eval_metrics(ctx: Context, out: OutputDir, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with lm-eval's results on the pruned model added, when tasks are set."""
    e = ctx.config.eval
    if e is not None and e.lm_eval_tasks:
        with ctx.timed("lm_eval"), local_path(out, "model") as folder:
            metrics["lm_eval"] = run_lm_eval(folder, e.lm_eval_tasks, ctx.device, limit=e.lm_eval_limit,
                                             include_path=e.lm_eval_include_path)
    return metrics


def run_lm_eval(model_dir: str, tasks: list[str] | dict[str, int | None], device: torch.device, *,
                limit: float | None = None, include_path: str | None = None) -> dict[str, Any]:
    """lm-evaluation-harness tasks on the pruned model, lm-eval's ``results`` by task.

    ``tasks`` is a list of names or a mapping task -> few-shot count (None: the task's default);
    tasks with the same count run together. The tasks' data come from the Hub unless they are
    defined over local files in ``include_path``.
    """
    lm_eval = _require_lm_eval()
    from lm_eval.tasks import TaskManager

    shots: dict[str, int | None] = dict(tasks) if isinstance(tasks, dict) else dict.fromkeys(tasks)
    by_shots: dict[int | None, list[str]] = {}
    for task, count in shots.items():
        by_shots.setdefault(count, []).append(task)
    manager = TaskManager(include_path=include_path)
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float as a share of the examples
    results: dict[str, Any] = {}
    for count, names in by_shots.items():
        found = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=names,
                                        num_fewshot=count, limit=limit, device=str(device), task_manager=manager)
        results.update(found["results"])
    return results


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ReplaceMeError("eval.lm_eval_tasks: lm-eval is not installed; pip install 'replaceme[eval]' "
                             "or remove lm_eval_tasks") from None
    return lm_eval


def load_transforms(out: OutputDir) -> dict[Block, torch.Tensor]:
    if not out.exists("transforms.safetensors"):
        raise ReplaceMeError(f"output_dir: {out.uri} has no transforms.safetensors; run `replaceme calibrate` first")
    tensors = load_safetensors(out.read_bytes("transforms.safetensors"))
    return {_block_of(key): t for key, t in tensors.items()}


def _block_of(key: str) -> Block:
    """The block of a ``"{s}-{e}"`` key."""
    start, end = key.split("-")
    return int(start), int(end)


# --- the solver used during calibration ------------------------------------------------------


class BlockSolver:
    """Turns a block's capture into its map with the configured estimator; keeps per-block details."""

    def __init__(self, config: ReplaceMeConfig) -> None:
        self.config = config
        self.details: dict[Block, dict[str, Any]] = {}

    def __call__(self, capture: BlockCapture) -> torch.Tensor:
        c = self.config
        transform, info = solve_lstsq(capture.stats, c.alpha, c.diag)
        identity = torch.eye(transform.shape[0], dtype=torch.float64)
        if c.method == "cosine":
            init = transform if c.cosine.init == "lstsq" else identity
            options: dict[str, Any] = dict(init=init, loss=c.loss, solver=c.solver, diag=c.diag, steps=c.cosine.steps, lr=c.cosine.lr,
                           batch_tokens=c.cosine.batch_tokens, seed=c.seed)
            rows = capture.activations
            if isinstance(rows, StoredRows):
                transform = solve_cosine_streaming(rows.stream, hidden=transform.shape[0], **options)
            elif rows is not None:
                transform = solve_cosine(*rows.tensors(), **options)
            else:
                raise ValueError(f"block {capture.block}: method: cosine needs the activation rows")
        detail = {
            "block": list(capture.block),
            "tokens": capture.stats.tokens,
            "relative_residual": capture.stats.residual(transform),
            "relative_residual_dropping": capture.stats.residual(identity),
            "singular": info.singular,
        }
        if capture.activations is not None:
            detail["cosine_distance"], detail["cosine_distance_dropping"] = _cosine_distances(
                capture.activations.stream(), transform, identity)
        self.details[capture.block] = detail
        return transform


def _cosine_distances(chunks, *transforms: torch.Tensor) -> list[float]:
    """Mean cosine distance of the pruned stream to the original, for each map, over row chunks."""
    totals, rows = [0.0] * len(transforms), 0
    for x, y, residual in chunks:
        for i, t in enumerate(transforms):
            totals[i] += mean_cosine_distance(x, y, residual, t) * x.shape[0]
        rows += x.shape[0]
    return [total / rows for total in totals]


# --- the report ------------------------------------------------------------------------------


def write_report(ctx: Context, out: OutputDir, metrics: dict[str, Any]) -> dict[str, Any]:
    """report.json of the output folder, as every path to it writes it (``run``, ``replaceme evaluate``,
    ``ops.evaluate``): the blocks and the maps' solver details in place, this evaluation's metrics, and
    every step's seconds and peak memory (from the step markers, then from this process)."""
    blocks = saved_blocks(out)
    if not blocks or not out.exists(SOLVER_DETAILS):
        raise ReplaceMeError(f"output_dir: {out.uri} has no blocks.json or {SOLVER_DETAILS}; "
                             "run `replaceme calibrate` first")
    timings, memory = {}, {}
    for step in markers.STEPS:
        marker = markers.read_marker(out, step) or {}
        timings.update(marker.get("timings", {}))
        memory.update(marker.get("step_memory", {}))
    timings.update(ctx.timings)
    memory.update(ctx.step_memory)
    calibration = (markers.read_marker(out, "calibrate") or {}).get("calibration") or ctx.calibration_record()
    removed = ctx.num_layers - len(kept_layers(ctx.num_layers, blocks))
    report = {
        "replaceme_version": __version__,
        "source_model": ctx.model_uri,
        "family": ctx.family.name,
        "num_layers": ctx.num_layers,
        "blocks": [list(b) for b in blocks],
        "removed_layers": removed,
        "removed_fraction": removed / ctx.num_layers,
        "method": ctx.config.method,
        "selection": json.loads(out.read_text(SELECTION)) if out.exists(SELECTION) else None,
        "calibration_tokens": calibration["tokens"],
        **metrics,
        "solver": json.loads(out.read_text(SOLVER_DETAILS))["blocks"],
        "seconds": timings,
        "peak_memory_mb": _overall_peak(memory.values()),
        "step_peak_memory_mb": memory,
        "device": str(ctx.device),
        "lineage": ctx.lineage(calibration["data"], evaluated="perplexity_before" in metrics),
        "config": ctx.config.public_dict(),
    }
    out.write_json("report.json", report)
    return report


def _overall_peak(step_peaks) -> dict[str, float]:
    """The run's peak: the largest step peak (each step resets the high-water mark)."""
    overall = peak_memory.peak_mb()
    for peaks in step_peaks:
        for key, value in peaks.items():
            overall[key] = max(overall.get(key, 0.0), value)
    return overall


# --- steps with completion markers ---------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step: its work (returns the extra fields of its marker) and the artefacts it needs."""

    name: str
    work: Callable[[StepRunner], dict[str, Any]]
    inputs: Callable[[ReplaceMeConfig], dict[str, str]] = lambda config: {}  # artefact -> step that makes it
    needs_model: bool = True  # opens a Context (checkpoint index, blocks)
    uses: Callable[[ReplaceMeConfig], tuple[str, ...]] = lambda config: ()  # the Context.INPUTS its work reads


@dataclass(frozen=True)
class Outcome:
    step: str
    skipped: bool
    marker_uri: str
    marker: dict[str, Any]


def _profile_step(job: StepRunner) -> dict[str, Any]:
    ctx, out = job.ctx, job.out
    blocks = [list(b) for b in profile(ctx, out)]
    names = ["blocks.json"] + ([] if ctx.blocks else ["distances.csv", "distances.png", SELECTION])
    names += [PROFILED_STATISTICS] if out.exists(PROFILED_STATISTICS) else []
    return {"blocks": blocks, "selected": not ctx.blocks, "artefacts": artefact_uris(out, *names)}


def _calibrate_step(job: StepRunner) -> dict[str, Any]:
    details = calibrate(job.ctx, job.out, required_blocks(job.out))
    return {"solver": details, "calibration": job.ctx.calibration_record(),
            "artefacts": artefact_uris(job.out, "transforms.safetensors", "calibration")}


def _solve_step(job: StepRunner) -> dict[str, Any]:
    return {"solver": solve(job.ctx, job.out), "artefacts": artefact_uris(job.out, "transforms.safetensors")}


def _merge_step(job: StepRunner) -> dict[str, Any]:
    merge(job.ctx, job.out)
    return {"artefacts": artefact_uris(job.out, "model")}


def _evaluate_step(job: StepRunner) -> dict[str, Any]:
    ctx, out = job.ctx, job.out
    if ctx.eval_texts is None:
        log.warning("evaluate: no eval data configured; report.json will have no perplexities")
    if "calibration" not in (markers.read_marker(out, "calibrate") or {}):  # made by an older version: the
        ctx.require("texts")  # report reads the calibration set, checked before the model passes
    metrics = evaluate(ctx, out)
    write_report(ctx, out, metrics)
    write_card(ctx, out, metrics=metrics)  # the card now states what was measured (or that nothing was)
    return {"metrics": metrics, "artefacts": artefact_uris(out, "report.json")}


def _register_step(job: StepRunner) -> dict[str, Any]:
    config = job.config
    if not config.mlflow.enabled:
        log.info("register: mlflow.enabled is false; nothing recorded")
        return {"mlflow_run_id": None, "artefacts": {}}
    from replaceme.tracking import log_output

    return {"mlflow_run_id": log_output(job.out.uri, config), "registered_as": config.mlflow.register_as, "artefacts": {}}


def _solve_inputs(config: ReplaceMeConfig) -> dict[str, str]:
    inputs = {"blocks.json": "calibrate"}
    if config.activations.uri is None:  # else the statistics live in the activation store
        inputs["calibration"] = "calibrate"
    return inputs


STEPS: dict[str, Step] = {step.name: step for step in (
    Step("profile", _profile_step, uses=lambda config: () if config.blocks else ("texts", "store")),
    Step("calibrate", _calibrate_step, inputs=lambda config: {"blocks.json": "profile"},
         uses=lambda config: ("texts", "store")),
    Step("solve", _solve_step, inputs=_solve_inputs, uses=lambda config: ("store",)),
    Step("merge", _merge_step, inputs=lambda config: {"transforms.safetensors": "solve"}),
    Step("evaluate", _evaluate_step, inputs=lambda config: {"model/config.json": "merge"},
         uses=lambda config: ("eval_texts", "eval_cache")),
    Step("register", _register_step, inputs=lambda config: {"report.json": "evaluate"}, needs_model=False),
)}
EXPENSIVE = ("profile", "calibrate")  # model passes: the CLI replaces their artefacts only with --overwrite


def artefact_uris(out: OutputDir, *names: str) -> dict[str, str]:
    return {name: f"{out.final_uri}/{name}" for name in names}


def cli_command(step: str) -> str:
    return f"replaceme {step}" if step != "register" else "replaceme log OUTPUT_DIR"


class StepRunner:
    """Runs steps against one output folder: each unless its marker says it is done with these
    settings, refused when its inputs are missing or stale, its marker written last.

    ``command`` names how the user runs a step (in messages); ``force`` re-runs a step that is done;
    with ``protect``, a step whose artefacts were made with other settings is replaced only when it
    is cheap to rebuild (solve, merge, evaluate) — a model pass needs ``force`` (the CLI's --overwrite)."""

    def __init__(self, config: ReplaceMeConfig, out: OutputDir, *, ctx: Context | None = None, progress: bool = True,
                 command: Callable[[str], str] = cli_command, force: bool = False, protect: bool = False) -> None:
        self.config, self.out = config, out
        self._ctx, self.progress = ctx, progress
        self.command, self.force, self.protect = command, force, protect

    @property
    def ctx(self) -> Context:
        if self._ctx is None:
            self._ctx = Context(self.config, progress=self.progress)
        return self._ctx

    @cached_property
    def dtype(self) -> str:
        if self._ctx is not None:
            return self._ctx.statistics_dtype
        return statistics_dtype(self.config, lambda: Checkpoint(_resolve_model_path(self.config),
                                                               storage_options=self.config.storage_options(self.config.model_path)))

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close_engine()

    def current(self, name: str) -> dict[str, Any] | None:
        return markers.current_marker(name, self.config, self.dtype, self.out)

    def run(self, name: str) -> Outcome:
        step = STEPS[name]
        upstream = markers.check_inputs(name, self.config, self.dtype, self.out, step.inputs(self.config), self.command)
        expected = markers.step_digest(name, self.config, self.dtype, upstream["run"] if upstream else None)
        marker_uri = f"{self.out.uri}/{markers.marker_name(name)}"
        done = markers.read_marker(self.out, name)
        if done and done.get("digest") == expected and not self.force:
            log.info("%s: already done (%s)", name, marker_uri)
            return Outcome(name, True, marker_uri, done)
        if self.protect and name in EXPENSIVE and not self.force and done is not None:
            raise ReplaceMeError(f"{name}: {self.out.uri} already holds the {name} step's results, made with other "
                                 f"settings; pass --overwrite to replace them (the steps after it are then redone)")
        if step.needs_model:  # a bad input fails here, before the step removes anything or starts its work
            self.ctx.require(*step.uses(self.config))
        self.out.ensure_owned()
        if name != "register":  # a crash from here on must not leave markers or a report that look current
            markers.invalidate_after(self.out, name)
        marker = self._execute(step, expected, upstream)
        self.out.write_json(markers.marker_name(name), marker)
        if name == "calibrate":  # calibrate solved the maps with these solver settings: solve is done too
            self.out.write_json(markers.marker_name("solve"), self._solved_by(marker))
        log.info("%s: done (%s)", name, marker_uri)
        return Outcome(name, False, marker_uri, marker)

    def _execute(self, step: Step, expected: str, upstream: dict | None) -> dict[str, Any]:
        started, clock = _now(), time.perf_counter()
        ctx = self.ctx if step.needs_model else None
        seen = set(ctx.timings) if ctx else set()
        extra = step.work(self)
        return {
            "step": step.name,
            "digest": expected,
            "run": uuid.uuid4().hex,  # this execution; the next step's digest names it
            "upstream_run": upstream["run"] if upstream else None,
            "pipeline_run_id": os.environ.get(lineage.PIPELINE_RUN_ENV),
            "replaceme_version": __version__,
            "started": started,
            "finished": _now(),
            "seconds": round(time.perf_counter() - clock, 3),
            "timings": {k: v for k, v in ctx.timings.items() if k not in seen} if ctx else {},
            "step_memory": {k: v for k, v in ctx.step_memory.items() if k not in seen} if ctx else {},
            **extra,
        }

    def _solved_by(self, calibrated: dict[str, Any]) -> dict[str, Any]:
        """The solve marker calibrate earns: the maps it wrote were solved with these settings."""
        return {**calibrated, "step": "solve", "solved_by": "calibrate", "run": uuid.uuid4().hex,
                "digest": markers.step_digest("solve", self.config, self.dtype, calibrated["run"]),
                "upstream_run": calibrated["run"], "started": calibrated["finished"], "seconds": 0.0,
                "timings": {}, "step_memory": {}, "artefacts": artefact_uris(self.out, "transforms.safetensors")}


def run_step(config: ReplaceMeConfig, name: str, *, progress: bool = True, command: Callable[[str], str] = cli_command,
             force: bool = False, protect: bool = False) -> Outcome:
    """One step in place on the config's output folder, holding it for the step's duration (the
    CLI's step commands and the pipeline steps in ``ops/``); see :class:`StepRunner`."""
    lineage.warn_about_ray_job_paths(config, tracked=name == "register")  # outputs that would vanish with the job
    with claim_in_place(config.output_dir, storage_options=config.storage_options(config.output_dir)) as out:
        runner = StepRunner(config, out, progress=progress, command=command, force=force, protect=protect)
        try:
            return runner.run(name)
        finally:
            runner.close()  # a Ray profile's stages hold CPUs and GPUs until then


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def statistics_dtype(config: ReplaceMeConfig, checkpoint: Callable[[], Checkpoint]) -> str:
    """The dtype the calibration statistics are computed in: ``compute_dtype``, where ``auto`` is
    float32 on CPU and the checkpoint's own dtype on GPUs (Ray stages with GPUs, or a local CUDA device)."""
    c = config
    if c.compute_dtype != "auto":
        return c.compute_dtype
    gpu = c.engine.gpus_per_stage > 0 if c.engine.backend == "ray" else resolve_device(c.device).type == "cuda"
    return str(checkpoint().dtype).removeprefix("torch.") if gpu else "float32"


# --- whole run --------------------------------------------------------------------------------


def run(config: ReplaceMeConfig, *, progress: bool = True, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prune end to end in a staging folder published only when everything is written. A rerun after
    a crash resumes from the steps the staging folder holds, when the settings that made them are
    unchanged; a full disk discards the staging folder."""
    options = config.storage_options(config.output_dir)
    announce = on_step or (lambda step: None)
    steps = ["profile", "calibrate", "solve"] + ([] if config.save_transform_only else ["merge", "evaluate"])
    token = hub.hub_token(config) if config.output.push_to_hub else None  # refused before any work
    with locked(config.output_dir, storage_options=options):  # first: a second run fails at once
        ctx = Context(config, progress=progress)
        used = {name for step in steps for name in STEPS[step].uses(config)}
        ctx.require(*(name for name in Context.INPUTS if name in used))  # every input the steps read, before any work
        torch.manual_seed(config.seed)
        try:
            with staged_output(config.output_dir, overwrite=config.overwrite, inputs=ctx.input_paths(),
                               storage_options=options) as out:
                report = _run_steps(ctx, out, steps, announce)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # don't leave the disk full
                discard_staging(config.output_dir, options)
            raise
        if token is not None:  # published and complete: upload model/ with its card
            announce("push")
            hub.push_model(config, token)
        return report


def _run_steps(ctx: Context, out: OutputDir, steps: list[str], announce: Callable[[str], None]) -> dict[str, Any]:
    runner = StepRunner(ctx.config, out, ctx=ctx, progress=ctx.progress)
    _start_or_resume(runner, out)
    try:
        for step in steps:
            announce(step)
            runner.run(step)
    finally:
        runner.close()
    if ctx.config.save_transform_only:
        return write_report(ctx, out, {})
    return json.loads(out.read_text("report.json"))


def _start_or_resume(runner: StepRunner, out: OutputDir) -> None:
    """Keep a staging folder's completed steps when its first step is current; else start afresh."""
    done = [step for step in ("profile", "calibrate", "solve", "merge", "evaluate") if runner.current(step)]
    if done:
        log.info("resuming %s: %s already done with these settings", out.uri, ", ".join(done))
        return
    for path in out.fs.ls(out.root, detail=False):
        if path.rstrip("/").rsplit("/", 1)[-1] != OWNER_FILE:
            out.fs.rm(path, recursive=True)


# --- model location ----------------------------------------------------------------------------


def _resolve_model_path(config: ReplaceMeConfig) -> str:
    """A local folder or fsspec URI as given; a Hugging Face repo id is fetched (weights included)."""
    path = config.model_path
    if "://" in path or os.path.exists(path) or not _looks_like_repo_id(path):
        return path
    from huggingface_hub import snapshot_download

    token = config.token.get_secret_value() if config.token else None
    try:
        return snapshot_download(path, token=token, allow_patterns=HUB_FILES)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: one message naming the field
        raise ReplaceMeError(f"model_path: {path} is not a local folder and could not be fetched from the "
                             f"Hugging Face Hub ({type(exc).__name__}); check the path or your access") from None


# what a run fetches of a Hub model: weights, configs, tokenizer, chat template, and the card and
# licence files the pruned model's card quotes and its folder keeps
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md", "LICENSE*",
             "LICENCE*", "NOTICE*", "USE_POLICY*"]


def _looks_like_repo_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


@contextmanager
def _local_copy(checkpoint: Checkpoint):
    """A local folder with the checkpoint's small files, for libraries that need a path."""
    if isinstance(checkpoint.fs, LocalFileSystem):
        yield checkpoint.root
        return
    with tempfile.TemporaryDirectory() as folder:
        for name in [*checkpoint.non_weight_files(), "config.json"]:
            Path(folder, name).write_bytes(checkpoint.fs.cat_file(f"{checkpoint.root}/{name}"))
        yield folder
