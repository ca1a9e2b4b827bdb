"""The ReplaceMe recipe: profile → calibrate (+ solve) → merge → evaluate, as composable steps.

Each step reads its inputs from and writes its artefacts to the run's output folder, so the
CLI can run them one by one (``replaceme calibrate`` then ``replaceme merge`` …) or all at once
(``replaceme run``, which stages the whole folder and publishes it only when complete).
Everything a user can get wrong is checked in :meth:`Context.__init__`, before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from replaceme import __version__, lineage, peak_memory
from replaceme.activations import ActivationStore, StoredRows
from replaceme.blocks import check_blocks, distances_from_csv, distances_to_csv, select_blocks
from replaceme.checkpoint import Checkpoint
from replaceme.config import ReplaceMeConfig
from replaceme.data import Batch, load_texts, make_batches
from replaceme.engine import Activations, BlockCapture, LocalEngine
from replaceme.errors import ReplaceMeError
from replaceme.families import check_estimator, family_for
from replaceme.layerwise import LayerwiseModel, resolve_device, resolve_dtype
from replaceme.merge import kept_layers, merge_checkpoint
from replaceme.outputs import OutputDir, is_inside, staged_run
from replaceme.plots import plot_distances
from replaceme.stats import BlockStats
from replaceme.solvers import mean_cosine_distance, solve_cosine, solve_cosine_streaming, solve_lstsq

log = logging.getLogger("replaceme")
Block = tuple[int, int]
SOLVER_DETAILS = "calibration/solver.json"  # per-block residuals of the current maps, for report.json


class Context:
    """Validated inputs of a run, opened once and shared by the steps."""

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
        self.num_layers = int(self.checkpoint.config["num_hidden_layers"])
        _ = self.checkpoint.weight_map  # refuses folders without (safe) weights
        if is_inside(config.output_dir, self.model_uri):
            raise ReplaceMeError(f"output_dir: {config.output_dir} is inside the source model {self.model_uri}; "
                                 "the source is never written to, choose a folder outside it")
        self.blocks = check_blocks(config.blocks, self.num_layers, config.merge_consecutive) if config.blocks else None
        if self.blocks is None and config.layers_to_skip >= self.num_layers:
            raise ReplaceMeError(f"layers_to_skip: {config.layers_to_skip} must be smaller than the model's {self.num_layers} layers")
        self.texts = load_texts(config.dataset, column=config.dataset_column, split=config.dataset_subset,
                                size=config.dataset_size, tokenizer=self.tokenizer, field="dataset",
                                storage_options=config.storage_options(config.dataset))
        self.eval_texts = None
        if config.eval is not None:
            e = config.eval
            self.eval_texts = load_texts(e.dataset, column=e.dataset_column, split=e.dataset_subset,
                                         size=e.dataset_size, tokenizer=self.tokenizer, field="eval.dataset",
                                         storage_options=config.storage_options(e.dataset))
            if e.lm_eval_tasks:
                _require_lm_eval()
        self.device = resolve_device(config.device)
        self.store = self._open_store()

    def _open_store(self) -> ActivationStore | None:
        a = self.config.activations
        if a.uri is None:
            if self.config.engine.backend == "ray" and self.config.method == "cosine":
                raise ReplaceMeError("activations.uri: method: cosine on engine.backend: ray reads the activation "
                                     "rows back from a store; set activations.uri (file://… or s3://…)")
            return None
        store = ActivationStore(a.uri, self.run_id, endpoint_url=self.config.storage.endpoint_url,
                                options=self.config.storage.options, row_group_rows=a.row_group_rows)
        store.check()
        return store

    @property
    def output_options(self) -> dict[str, Any]:
        return self.config.storage_options(self.config.output_dir)

    @cached_property
    def run_id(self) -> str:
        """``run_id``, or a digest of every setting that shapes the calibration statistics, so a
        rerun of the same job finds (and resumes) its own shards in the activation store."""
        if self.config.run_id:
            return self.config.run_id
        c = self.config
        keys = ["model_path", "dataset", "dataset_column", "dataset_size", "dataset_subset", "batch_size",
                "max_length", "blocks", "sequential", "layers_to_skip", "num_A", "min_distance_layer", "compute_dtype"]
        shaping = {key: getattr(c, key) for key in keys}
        shaping["batches_per_shard"] = c.engine.batches_per_shard
        if c.statistics_depend_on_solver:
            shaping.update(c.solver_settings())
        return "run-" + hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        with _local_copy(self.checkpoint) as folder:
            return AutoTokenizer.from_pretrained(folder)

    @cached_property
    def batches(self) -> list[Batch]:
        c = self.config
        return make_batches(self.texts, self.tokenizer, batch_size=c.batch_size, max_length=c.max_length, field="dataset",
                            context=self.checkpoint.config.get("max_position_embeddings"))

    @cached_property
    def eval_batches(self) -> list[Batch]:
        e, c = self.config.eval, self.config
        return make_batches(self.eval_texts, self.tokenizer, batch_size=e.batch_size or c.batch_size,
                            max_length=e.max_length or c.max_length, field="eval.dataset",
                            context=self.checkpoint.config.get("max_position_embeddings"),
                            length_key="eval.max_length" if e.max_length else "max_length")

    @cached_property
    def engine(self):
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

    def lineage(self) -> dict[str, Any]:
        """Source model, data, code and job identity, recorded in report.json for MLflow."""
        c = self.config
        data = {"calibration": lineage.dataset_identity(c.dataset, self.texts)}
        if self.eval_texts is not None:
            data["evaluation"] = lineage.dataset_identity(c.eval.dataset, self.eval_texts)
        stores = {"statistics": self.store.location if self.store else f"{c.output_dir.rstrip('/')}/calibration"}
        if self.store and c.activations.save_rows:
            stores["activations"] = self.store.location
        return {"source_model": lineage.model_identity(self.checkpoint), "datasets": data,
                "code": lineage.code_version(), **lineage.job_ids(), "stores": stores}


# --- steps -----------------------------------------------------------------------------------


def profile(ctx: Context, out: OutputDir) -> list[Block]:
    """Choose blocks by angular distance (or reuse ``distances_path``); writes distances.csv/.png."""
    c = ctx.config
    with ctx.timed("profile"):
        if c.distances_path and os.path.exists(c.distances_path):
            distances = distances_from_csv(Path(c.distances_path).read_text(), c.distances_path)
            log.info("reusing block distances from %s", c.distances_path)
        else:  # in this process, or on the Ray stage actors with engine.backend: ray
            distances = ctx.engine.distances(c.layers_to_skip)
        blocks = select_blocks(distances, num_blocks=c.num_A, min_start=c.min_distance_layer,
                               merge_consecutive=c.merge_consecutive, num_layers=ctx.num_layers)
    csv_text = distances_to_csv(distances)
    out.write_text("distances.csv", csv_text)
    out.write_bytes("distances.png", plot_distances(distances, blocks, c.layers_to_skip))
    if c.distances_path and not os.path.exists(c.distances_path):
        Path(c.distances_path).write_text(csv_text)
    out.write_json("blocks.json", [list(b) for b in blocks])
    return blocks


def calibrate(ctx: Context, out: OutputDir, blocks: list[Block]) -> list[dict[str, Any]]:
    """Run the model up to the last needed layer, solve each block's map, save maps and statistics."""
    c = ctx.config
    solver = BlockSolver(c)
    with ctx.timed("calibrate"):
        try:
            fits = ctx.engine.calibrate(blocks, solver, sequential=c.sequential, keep_activations=c.method == "cosine")
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


def calibration_engine(ctx: Context):
    """The engine of the passes over the calibration set (``distances`` for profile, ``calibrate``):
    in this process, or stage actors on a Ray cluster (``engine.backend: ray``)."""
    c = ctx.config
    if c.engine.backend == "local":
        return LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.batches, progress=ctx.progress)
    from replaceme.distributed.engine import RayEngine, StageSettings

    device = torch.device("cuda" if c.engine.gpus_per_stage > 0 else "cpu")
    dtype = resolve_dtype(c.compute_dtype, device, ctx.checkpoint.dtype)
    settings = StageSettings(ctx.model_uri, ctx.checkpoint.config, device.type, str(dtype).removeprefix("torch."),
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
    return [tuple(b) for b in json.loads(out.read_text("blocks.json"))]


def merge(ctx: Context, out: OutputDir) -> None:
    """Fold the saved maps into a pruned copy of the source checkpoint under ``model/``."""
    transforms = load_transforms(out)
    e = ctx.config.engine
    with ctx.timed("merge"), out.staged("model", overwrite=ctx.config.overwrite) as staging:
        if e.backend == "ray" and e.merge_workers > 1:
            from replaceme.distributed.cluster import connect
            from replaceme.distributed.merge import merge_on_ray

            connect(e.address)
            merge_on_ray(ctx.model_uri, transforms, out.fs.unstrip_protocol(staging), workers=e.merge_workers,
                         endpoint_url=ctx.config.storage.endpoint_url, storage_options=ctx.config.storage.options,
                         max_retries=e.max_retries, allow_pickle=ctx.config.allow_pickle, progress=ctx.progress)
        else:
            merge_checkpoint(ctx.checkpoint, transforms, out.fs, staging, progress=ctx.progress)


def evaluate(ctx: Context, out: OutputDir) -> dict[str, Any]:
    """Held-out perplexity of the source and of the pruned model in ``model/``."""
    if ctx.eval_texts is None:
        return {}
    with ctx.timed("evaluate"):
        before, tokens = LocalEngine(ctx.layerwise(ctx.checkpoint), ctx.eval_batches, progress=ctx.progress).perplexity()
        with Checkpoint(f"{out.uri}/model", field="output_dir", storage_options=ctx.output_options) as pruned:
            after, _ = LocalEngine(ctx.layerwise(pruned), ctx.eval_batches, progress=ctx.progress).perplexity()
    metrics = {"perplexity_before": before, "perplexity_after": after, "retention": before / after, "eval_tokens": tokens}
    if ctx.config.eval.lm_eval_tasks:
        metrics["lm_eval"] = run_lm_eval(f"{out.uri}/model", ctx.config.eval.lm_eval_tasks, ctx.device)
    return metrics


def run_lm_eval(model_dir: str, tasks: list[str], device: torch.device) -> dict[str, Any]:
    """lm-evaluation-harness tasks on the pruned model (its datasets come from the Hub)."""
    results = _require_lm_eval().simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=list(tasks),
                                      device=str(device))
    return results["results"]


def evaluate_and_record(ctx: Context, out: OutputDir) -> dict[str, Any]:
    """``evaluate`` as a step of its own: the whole report.json, as ``run`` writes it, from the maps'
    solver details (calibration/solver.json) and this config, keeping earlier steps' timings."""
    if ctx.eval_texts is None:
        raise ReplaceMeError("eval: no evaluation data configured; set eval: <path to held-out text>")
    blocks = saved_blocks(out)
    if not blocks or not out.exists(SOLVER_DETAILS):
        raise ReplaceMeError(f"output_dir: {out.uri} has no blocks.json or {SOLVER_DETAILS}; "
                             "run `replaceme calibrate` (and `replaceme merge`) first")
    metrics = evaluate(ctx, out)
    earlier = json.loads(out.read_text("report.json")) if out.exists("report.json") else {}
    ctx.timings = {**earlier.get("seconds", {}), **ctx.timings}
    ctx.step_memory = {**earlier.get("step_peak_memory_mb", {}), **ctx.step_memory}
    solved = json.loads(out.read_text(SOLVER_DETAILS))
    report = build_report(ctx, blocks, solved["blocks"], metrics)
    report["config"].update(solved["settings"])  # how the maps in place were solved, e.g. another alpha
    report["method"] = solved["settings"]["method"]
    out.write_json("report.json", report)
    return metrics


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
    return {tuple(int(v) for v in key.split("-")): t for key, t in tensors.items()}


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
            options = dict(init=init, loss=c.loss, solver=c.solver, diag=c.diag, steps=c.cosine.steps, lr=c.cosine.lr,
                           batch_tokens=c.cosine.batch_tokens, seed=c.seed)
            rows = capture.activations
            if isinstance(rows, StoredRows):
                transform = solve_cosine_streaming(rows.stream, hidden=transform.shape[0], **options)
            else:
                transform = solve_cosine(*rows.tensors(), **options)
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


# --- whole run --------------------------------------------------------------------------------


def run(config: ReplaceMeConfig, *, progress: bool = True, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prune end to end; the output folder appears only when everything is written."""
    ctx = Context(config, progress=progress)
    torch.manual_seed(config.seed)
    announce = on_step or (lambda step: None)
    with staged_run(config.output_dir, overwrite=config.overwrite, storage_options=ctx.output_options) as out:
        announce("profile")
        blocks = ctx.blocks or profile(ctx, out)
        announce("calibrate")
        details = calibrate(ctx, out, blocks)
        metrics: dict[str, Any] = {}
        if not config.save_transform_only:
            announce("merge")
            merge(ctx, out)
            announce("evaluate")
            metrics = evaluate(ctx, out)
        report = build_report(ctx, blocks, details, metrics)
        out.write_json("report.json", report)
    return report


def build_report(ctx: Context, blocks: list[Block], details: list[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    removed = ctx.num_layers - len(kept_layers(ctx.num_layers, blocks))
    return {
        "replaceme_version": __version__,
        "source_model": ctx.model_uri,
        "family": ctx.family.name,
        "num_layers": ctx.num_layers,
        "blocks": [list(b) for b in blocks],
        "removed_layers": removed,
        "removed_fraction": removed / ctx.num_layers,
        "method": ctx.config.method,
        "calibration_tokens": sum(b.num_tokens for b in ctx.batches),
        **metrics,
        "solver": details,
        "seconds": ctx.timings,
        "peak_memory_mb": _overall_peak(ctx.step_memory.values()),
        "step_peak_memory_mb": ctx.step_memory,
        "device": str(ctx.device),
        "lineage": ctx.lineage(),
        "config": ctx.config.public_dict(),
    }


def _overall_peak(step_peaks) -> dict[str, float]:
    """The run's peak: the largest step peak (each step resets the high-water mark)."""
    overall = peak_memory.peak_mb()
    for peaks in step_peaks:
        for key, value in peaks.items():
            overall[key] = max(overall.get(key, 0.0), value)
    return overall


# --- model location ----------------------------------------------------------------------------


def _resolve_model_path(config: ReplaceMeConfig) -> str:
    """A local folder or fsspec URI as given; a Hugging Face repo id is fetched (weights included)."""
    path = config.model_path
    if "://" in path or os.path.exists(path) or not _looks_like_repo_id(path):
        return path
    from huggingface_hub import snapshot_download

    token = config.token.get_secret_value() if config.token else None
    try:
        return snapshot_download(path, token=token, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # network, auth, missing repo: one message naming the field
        raise ReplaceMeError(f"model_path: {path} is not a local folder and could not be fetched from the "
                             f"Hugging Face Hub ({type(exc).__name__}); check the path or your access") from None


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
