"""The run configuration: one typed object, loaded from YAML and overridden with ``--set``.

Keys follow the reference ReplaceMe configs (``method``, ``model_path``, ``dataset`` …) so a
user can paste one in; ours are ``blocks``, ``output_dir``, ``eval``, ``compute_dtype`` and a few
switches. Everything that can be checked without the model is checked here; checks that need
the model's layer count live in :mod:`replaceme.blocks`.
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, overload
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from replaceme.blocks import Block
from replaceme.errors import ReplaceMeError
from replaceme.memory import parse_size

HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
log = logging.getLogger("replaceme")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EvalConfig(_Strict):
    """Held-out text for perplexity before and after pruning."""

    dataset: str | None = Field(default=None, description="held-out text; null: no perplexity (lm-eval tasks only)")
    dataset_column: str = "text"
    dataset_subset: str = "test"
    dataset_size: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1, description="defaults to the top-level batch_size")
    max_length: int | None = Field(default=None, ge=2, description="defaults to the top-level max_length")
    lm_eval_tasks: list[str] | dict[str, int | None] = Field(
        default_factory=list, description="lm-eval tasks on the pruned model (pip install 'replaceme[eval]'): a list of "
        "names, or a mapping task -> few-shot count like the reference's `tasks:` (null: the task's default)")
    lm_eval_limit: float | None = Field(
        default=None, gt=0, description="lm-eval examples per task (a fraction below 1: that share); null: all")
    lm_eval_include_path: str | None = Field(
        default=None, description="a folder of lm-eval task YAML files of your own (e.g. over local data files)")
    cache: bool | str = Field(
        default=True, description="where the source model's perplexity is cached: true: $REPLACEME_CACHE, else "
        "~/.cache/replaceme; a folder or URI (s3://…); false: not cached")


class CosineOptions(_Strict):
    """The iterative solver for ``method: cosine``."""

    steps: int = Field(default=300, ge=1, description="optimizer steps (Adam) or iterations (L-BFGS)")
    lr: float = Field(default=1e-3, gt=0)
    batch_tokens: int = Field(default=4096, ge=1, description="tokens per Adam step")
    init: Literal["lstsq", "identity"] = "lstsq"


class EngineConfig(_Strict):
    """Where calibration runs: in this process, or on a Ray cluster as pipelined stage actors."""

    backend: Literal["local", "ray"] = "local"
    address: str | None = Field(
        default=None,
        description="Ray address: null starts (or, inside a Ray job, joins) a cluster; 'auto' or host:port joins one",
    )
    replicas: int = Field(default=1, ge=1, description="pipelines, each taking a disjoint share of the calibration set")
    stages: int = Field(default=1, ge=1, description="actors per pipeline, each holding a contiguous range of layers")
    gpus_per_stage: float = Field(default=0.0, ge=0.0)
    cpus_per_stage: float = Field(default=1.0, gt=0.0)
    batches_per_shard: int = Field(default=4, ge=1, description="calibration batches per data shard (unit of retry and resume)")
    in_flight: int = Field(default=4, ge=1, description="micro-batches in flight per pipeline")
    resource_timeout_s: float = Field(default=120.0, gt=0.0, description="how long to wait for the cluster to grant resources")
    max_retries: int = Field(default=3, ge=0, description="attempts per data shard after a worker dies")
    merge_workers: int = Field(default=1, ge=1, description="Ray tasks writing output shards in parallel (1: in this process)")
    memory_budget: str | int = Field(
        default="auto",
        description="memory the in-process engine may use (e.g. 64GB, 512MiB); auto: 60% of the free host or "
                    "device memory. The calibration set is processed in chunks that fit it",
    )

    @field_validator("memory_budget")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        if value != "auto":
            parse_size(value)  # refuses what is not a size, naming the field
        return value

    @property
    def shards_in_flight(self) -> int:
        """Shards in flight on each Ray pipeline: at least two, so its actors have queued work while
        a shard is finished."""
        return max(2, math.ceil(self.in_flight / self.batches_per_shard))


class StorageConfig(_Strict):
    """fsspec options for object-store URIs (s3://…); credentials are best left to the AWS environment."""

    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    options: dict[str, Any] = Field(default_factory=dict, description="extra fsspec options (secrets are redacted)")


class ActivationsConfig(_Strict):
    """Where a distributed run keeps per-shard statistics and the (X, Y) rows of every block."""

    uri: str | None = Field(default=None, description="file://… or s3://… folder; unset keeps everything in memory")
    row_group_rows: int = Field(default=8192, ge=1, description="token rows per Parquet row group")
    save_rows: bool = Field(default=True, description="write (X, Y) rows, not only the statistics")


class MlflowConfig(_Strict):
    """Where the run is recorded: MLflow params, inputs, metrics, artifacts and the pruned model."""

    enabled: bool = True
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    experiment: str = Field(default="replaceme", min_length=1, description="created when it does not exist")
    run_name: str | None = None
    register_as: str | None = Field(default=None, min_length=1,
                                    description="registered model name; each run adds a new version")
    log_model: bool | Literal["auto", "transformers", "files", "reference"] = Field(
        default="auto", description="how the pruned model is logged: transformers: MLflow's transformers flavour "
        "(mlflow.pyfunc / mlflow.transformers.load_model give a text-generation pipeline; the model is loaded once "
        "in host memory to write it); files: the checkpoint's files as they are, not loadable by pyfunc; reference "
        "(or false): nothing copied, register_as points at the output folder's model/ (100 GB checkpoints); auto "
        "(or true): transformers when the checkpoint fits in half the free host memory, else files")

    @property
    def model_logging(self) -> str:
        """``log_model`` with the booleans resolved: auto, transformers, files or reference."""
        if isinstance(self.log_model, bool):
            return "auto" if self.log_model else "reference"
        return self.log_model


class OutputConfig(_Strict):
    """How the pruned checkpoint in ``model/`` is laid out, and where it is published."""

    shard_size: str | int = Field(default="5GB", description="largest output shard, as save_pretrained's "
                                  "max_shard_size (e.g. 5GB, 500MB); one tensor larger than it gets a shard of its own")
    dtype: Literal["source", "bfloat16", "float16", "float32"] = Field(
        default="source", description="floating-point dtype of the output weights; source: each tensor's own")
    push_to_hub: str | None = Field(
        default=None, description="Hugging Face repo id (org/name) that `replaceme run` uploads model/ to once the run is published")
    private: bool = Field(default=True, description="create the Hub repo as private (nothing is made public unasked)")
    revision: str | None = Field(default=None, min_length=1, description="branch to upload to (created if missing); "
                                 "null: the repo's default branch")
    base_model: str | None = Field(
        default=None, description="Hub repo id the card names as base_model; default: model_path when it is a Hub repo id")

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError("is not a size; write e.g. 5GB or 500MB (as save_pretrained's max_shard_size)")
        try:
            parse_size(value, field="output.shard_size")
        except ReplaceMeError:
            raise ValueError("must be a positive size, e.g. 5GB or 500MB (as save_pretrained's max_shard_size)") from None
        return value

    @field_validator("push_to_hub", "base_model")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and not HUB_REPO_ID.fullmatch(value):
            raise ValueError("must be a Hugging Face repo id, org/name (letters, digits, '-', '_', '.')")
        return value

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size, field="output.shard_size")


class ReplaceMeConfig(_Strict):
    # --- reference keys --------------------------------------------------------------------
    method: Literal["lstsq", "cosine"] = "lstsq"
    model_path: str
    dataset: str
    dataset_column: str = "text"
    dataset_size: int | None = Field(default=None, ge=1)
    dataset_subset: str = Field(default="train", description="split, for Hugging Face dataset names")
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=512, ge=2)
    layers_to_skip: int = Field(default=1, ge=1, description="layers per block when blocks are selected by distance")
    num_A: int = Field(default=1, ge=1, description="number of blocks to select")
    merge_consecutive: bool = True
    min_distance_layer: int = Field(default=1, ge=1, description="earliest first layer of a candidate block")
    alpha: float = Field(default=0.0, ge=0.0, description="ridge term of the least-squares solve")
    diag: bool = False
    loss: Literal["cosine", "mse"] = "cosine"
    solver: Literal["adam", "lbfgs"] = "adam"
    distances_path: str | None = None
    output_dir: str = Field(
        default="outputs/run", validation_alias=AliasChoices("output_dir", "save_path")
    )
    save_transform_only: bool = False
    token: SecretStr | None = None

    # --- ours -------------------------------------------------------------------------------
    blocks: list[Block] | None = Field(default=None, description="explicit 0-based half-open blocks")
    selection: Literal["residual", "distance"] = Field(
        default="residual",
        description="how candidate blocks are ranked: residual = how much of the block's change the fitted "
                    "linear map leaves undone, per token relative to the stream (benchmarks/RESULTS.md); "
                    "distance = the paper's angular distance",
    )
    eval: EvalConfig | None = None
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sequential: bool = Field(
        default=True,
        description="fit each later block on the stream of the model whose earlier blocks are already replaced",
    )
    cosine: CosineOptions = Field(default_factory=CosineOptions)
    overwrite: bool = False
    allow_pickle: bool = False
    seed: int = 0
    engine: EngineConfig = Field(default_factory=EngineConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    activations: ActivationsConfig = Field(default_factory=ActivationsConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    run_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="names the run in the activation store; a rerun with the same id resumes (default: a digest of the config)",
    )
    # the output settings given as relative local paths, before they were made absolute (see
    # lineage.ray_job_warnings: inside a Ray job they land in the job's temporary working directory)
    _relative_outputs: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _reference_keys(cls, data: Any) -> Any:
        return reference_keys(data) if isinstance(data, dict) else data

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_shorthand(cls, value: Any) -> Any:
        return {"dataset": value} if isinstance(value, str) else value

    @field_validator("blocks")
    @classmethod
    def _blocks_well_formed(cls, blocks: list[Block] | None) -> list[Block] | None:
        if blocks is None:
            return None
        if not blocks:
            raise ValueError("is empty; give at least one [start, end] or leave it out to select by distance")
        for start, end in blocks:
            if start < 1:
                raise ValueError(
                    f"[{start}, {end}] starts at layer {start}; a block must start at layer 1 or later "
                    "because its map is folded into the layer before it"
                )
            if end <= start:
                raise ValueError(f"[{start}, {end}] is empty; blocks are half-open [start, end) with end > start")
        ordered = sorted(blocks)
        for (s1, e1), (s2, e2) in itertools.pairwise(ordered):
            if s2 < e1:
                raise ValueError(f"[{s1}, {e1}] and [{s2}, {e2}] overlap")
        return ordered

    @model_validator(mode="after")
    def _local_paths_absolute(self) -> ReplaceMeConfig:
        """Every local path made absolute here, in the driver: a Ray worker, a RayJob or a step run
        from another folder would resolve a relative path against its own working directory."""
        outputs = {"output_dir": self.output_dir, "distances_path": self.distances_path,
                   "activations.uri": self.activations.uri}
        self._relative_outputs = {key: path for key, path in outputs.items() if path and _is_relative(path)}
        self.model_path = _absolute(self.model_path, must_exist=True)  # else a Hub repo id
        self.dataset = _absolute(self.dataset, must_exist=True)  # else a Hub dataset name
        if self.eval is not None:
            self.eval.dataset = _absolute(self.eval.dataset, must_exist=True)
            if isinstance(self.eval.cache, str):
                self.eval.cache = _absolute(self.eval.cache)
        self.output_dir = _absolute(self.output_dir)
        self.distances_path = _absolute(self.distances_path)
        self.activations.uri = _absolute(self.activations.uri)
        return self

    @property
    def statistics_depend_on_solver(self) -> bool:
        """Sequential fitting of several blocks calibrates later blocks behind the earlier maps, so
        the solver settings shape their statistics too."""
        return self.sequential and (self.num_A > 1 or len(self.blocks or []) > 1)

    @property
    def profile_gathers_statistics(self) -> bool:
        """Whether the profile pass gathers every candidate block's statistics: to rank the candidates
        by residual, or to fit the selected blocks without a second pass."""
        return self.selection == "residual" or self.second_pass_reason is None

    @property
    def second_pass_reason(self) -> str | None:
        """Why blocks selected by distance cannot be fitted from the statistics the profile pass
        gathers (every candidate's, on the unpruned stream, in memory only); None when they can."""
        if self.method != "lstsq":
            return f"method: {self.method} fits on the activation rows, which the profile pass does not keep"
        if self.activations.uri is not None:
            return "activations.uri is set: the calibration pass writes per-shard statistics (and rows) there"
        if self.sequential and self.num_A > 1:
            return "sequential: true fits each block after the first on the stream of the model pruned before it"
        return None

    def solver_settings(self) -> dict[str, Any]:
        """Every setting that turns statistics into a map."""
        return {"method": self.method, "alpha": self.alpha, "diag": self.diag, "loss": self.loss,
                "solver": self.solver, "seed": self.seed, "cosine": self.cosine.model_dump()}

    def storage_options(self, uri: str) -> dict[str, Any]:
        """fsspec keyword arguments to open ``uri`` with this config's ``storage`` settings."""
        from replaceme.storage import fsspec_options

        return fsspec_options(uri, self.storage.endpoint_url, self.storage.options)

    def public_dict(self) -> dict[str, Any]:
        """The resolved config as plain data with secrets redacted (for reports and logs)."""
        data = self.model_dump(mode="json")
        if self.token is not None:
            data["token"] = "***"
        data["storage"]["options"] = {k: _redact(k, v) for k, v in self.storage.options.items()}
        data["storage"]["endpoint_url"] = redact_uri(self.storage.endpoint_url)
        data["mlflow"]["tracking_uri"] = redact_uri(self.mlflow.tracking_uri)
        if self.eval is not None and isinstance(self.eval.cache, str):
            data["eval"]["cache"] = redact_uri(self.eval.cache)
        return data


# --- the reference's own keys ----------------------------------------------------------------------

# Keys of the reference configs (mts-ai/ReplaceMe) with no meaning here: accepted, named in one warning.
MOOT_KEYS = {
    "use_4bit": "replaceme streams one decoder layer at a time and never holds the whole model, so 4-bit "
                "loading is unnecessary; the maps are fitted on the checkpoint's own weights",
    "activations_save_path": "the reference's scratch file for activations; replaceme keeps them in memory, "
                             "or in activations.uri when that is set",
    "num_layer": "a setting of the reference's own scripts; blocks here are layers_to_skip, num_A or blocks",
    "cluster": "a setting of the reference's own scripts; distributed runs here are engine.backend: ray",
}
# Variants of the method the reference implements and replaceme does not: refused when on, since
# ignoring them would give other maps without a word; accepted when off.
VARIANT_KEYS = ("two_vectors", "thri", "accurate")


def reference_keys(data: dict[str, Any]) -> dict[str, Any]:
    """The reference's keys mapped onto ours, before validation: ``save_path: null`` (and ``output_dir:
    null``) mean the default output folder; ``tasks`` (a list, or a mapping of task to few-shot count) and
    ``limit`` are lm-eval's; the moot keys are dropped, named in one warning when set to something other
    than false or null; method variants replaceme does not implement are refused when on."""
    data = dict(data)
    for key in ("save_path", "output_dir"):
        if key in data and data[key] is None:
            del data[key]
    for key in VARIANT_KEYS:
        if key in data:
            value = data.pop(key)
            if value not in (False, None, 0, "false", "False"):
                raise ValueError(f"'{key}: {json.dumps(value)}' selects a variant of the reference's method that replaceme "
                                 f"does not implement; ignoring it would silently give other maps. Remove {key} "
                                 "or set it to false")
    moot = [key for key in MOOT_KEYS if key in data and data.pop(key) not in (False, None)]  # off: nothing asked
    if moot:
        log.warning("ignoring %s", "; ".join(f"{key} ({MOOT_KEYS[key]})" for key in moot))
    if "tasks" in data or "limit" in data:
        _lm_eval_keys(data)
    return data


def _lm_eval_keys(data: dict[str, Any]) -> None:
    """``tasks`` and ``limit`` (the reference's lm-eval settings) into ``eval``'s."""
    tasks, limit = data.pop("tasks", None), data.pop("limit", None)
    evaluation = data.get("eval")
    evaluation = {"dataset": evaluation} if isinstance(evaluation, str) else dict(evaluation or {})
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if tasks:  # a list, or a mapping task -> few-shot count: eval.lm_eval_tasks takes both
        evaluation.setdefault("lm_eval_tasks", tasks)
    if limit is not None:
        evaluation.setdefault("lm_eval_limit", limit)
    if evaluation:
        data["eval"] = evaluation


@overload
def _absolute(path: str, *, must_exist: bool = False) -> str: ...
@overload
def _absolute(path: None, *, must_exist: bool = False) -> None: ...
@overload
def _absolute(path: str | None, *, must_exist: bool = False) -> str | None: ...
def _absolute(path: str | None, *, must_exist: bool = False) -> str | None:
    """A local path as an absolute one; URIs (and, with ``must_exist``, names that are not local
    paths, i.e. Hub ids) as given."""
    if not path or "://" in path or (must_exist and not os.path.exists(os.path.expanduser(path))):
        return path
    return os.path.abspath(os.path.expanduser(path))


def _is_relative(path: str | None) -> bool:
    """A local path that depends on the working directory (not a URI, not absolute, not under ~)."""
    return bool(path) and "://" not in str(path) and not os.path.isabs(os.path.expanduser(str(path)))


SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")


def _redact(key: str, value: Any) -> Any:
    return "***" if any(word in key.lower() for word in SECRET_WORDS) else value


def redact_uri(uri: str | None) -> str | None:
    """``scheme://user:***@host/…``: a password in a URI is never shown."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def without_credentials(uri: str) -> str:
    """``scheme://host/…``: the URI with no user name or password, for a command the user may copy."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# a password in any URI-looking text: "scheme://user:<password>@"
_URI_PASSWORD = re.compile(r"(://[^/@\s:]*:)[^@\s]*@")


def _redact_input(value: Any) -> Any:
    """An input echoed in a message, with passwords in URIs and values of secret-like keys hidden."""
    if isinstance(value, str):
        return _URI_PASSWORD.sub(r"\1***@", value)
    if isinstance(value, dict):
        return {k: _redact(str(k), _redact_input(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_input(v) for v in value)
    return value


# --- loading -----------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ReplaceMeConfig:
    """Read a YAML config (a file or fsspec URI), apply ``key=value`` overrides (values parsed as
    YAML) and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> ReplaceMeConfig:
    try:
        return ReplaceMeConfig.model_validate(data)
    except ValidationError as exc:
        raise ReplaceMeError(_describe(exc)) from None


def read_yaml(uri: str | Path) -> dict[str, Any]:
    """The YAML mapping in a local file or at an fsspec URI (s3://…, for pipeline steps)."""
    from replaceme.storage import filesystem

    fs, path = filesystem(str(uri), field="--config")
    try:
        text = fs.cat_file(path).decode()
    except (FileNotFoundError, IsADirectoryError):
        if fs.isdir(path):
            raise ReplaceMeError(f"config file {uri} is a folder; pass --config with the path or URI of a YAML "
                                 f"file{_yaml_files_in(fs, path)}") from None
        raise ReplaceMeError(f"config file {uri} does not exist; pass --config with the path or URI of a YAML file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ReplaceMeError(f"config file {uri} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ReplaceMeError(f"config file {uri} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def _yaml_files_in(fs: Any, folder: str) -> str:
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False) if p.endswith((".yaml", ".yml")))
    return f" (that folder holds {', '.join(names[:5])}{', …' if len(names) > 5 else ''})" if names else ""


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ReplaceMeError(f"--set {item!r} must look like key=value, e.g. --set alpha=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ReplaceMeError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if isinstance(child, str) and part == "eval":  # eval: path shorthand, now being refined
            child = {"dataset": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[leaf] = value


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names (and aliases) valid at the location of an unknown key."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    names = list(model.model_fields)
    if model is ReplaceMeConfig:
        names += ["save_path", "tasks", "limit", *MOOT_KEYS, *VARIANT_KEYS]
    return names


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(p) for p in loc) or "config"
        if error["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _known_keys(ReplaceMeConfig, loc), n=1)
            suggestion = f"; did you mean '{'.'.join([*map(str, loc[:-1]), hint[0]])}'?" if hint else ""
            lines.append(f"unknown key '{key}'{suggestion}")
        elif error["type"] == "missing":
            lines.append(f"'{key}' is required")
        else:
            message = error["msg"].removeprefix("Value error, ")
            secret = not loc or loc[0] == "token" or (loc[:2] == ("storage", "options") and _redact(str(loc[-1]), 1) != 1)
            shown = "" if secret else f" (got {_redact_input(error.get('input'))!r})"
            lines.append(f"'{key}': {message}{shown}" if loc else message)  # a check of the whole config names its key
    return "invalid config: " + "; ".join(lines)
