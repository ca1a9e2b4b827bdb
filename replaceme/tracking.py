"""Record a finished output folder as one MLflow run.

Everything is read from the folder (``report.json``, ``distances.csv``, the maps, ``model/``), so
``replaceme run`` and ``replaceme log OUTPUT_DIR`` (after a tracking outage, or from a pipeline's
last step) record exactly the same run. One run per compression, steps named in the metric keys
(``seconds/calibrate``): comparing runs is then a flat table, with no child runs to join.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from replaceme.blocks import distances_from_csv, residuals_from_csv
from replaceme.config import MlflowConfig, ReplaceMeConfig, redact_uri, without_credentials
from replaceme.errors import ReplaceMeError
from replaceme.outputs import OutputDir, local_path

log = logging.getLogger("replaceme")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default store, in the working directory
ARTIFACTS = ("report.json", "blocks.json", "distances.csv", "distances.png", "transforms.safetensors")
REPORT_DIGEST_TAG = "replaceme.report_digest"


class TrackingError(ReplaceMeError):
    """Recording in MLflow failed; the outputs themselves are complete (``result``: the
    :class:`~replaceme.api.PruneResult` of a run whose record failed, set by :func:`replaceme.prune`)."""

    result: Any = None


def tracking_uri(settings: MlflowConfig) -> str:
    return settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def log_output(output_uri: str, config: ReplaceMeConfig) -> str:
    """Record the finished run in ``output_uri`` in MLflow; returns the MLflow run id.

    Logging the same output twice finds the first run instead of adding a duplicate.
    """
    return Tracker(config).log(output_uri)


class Tracker:
    """The MLflow store and experiment of a run; :meth:`open` may be called ahead of :meth:`log`."""

    def __init__(self, config: ReplaceMeConfig) -> None:
        self.config, self.settings, self.uri = config, config.mlflow, tracking_uri(config.mlflow)
        self._opened: tuple[Any, str] | None = None  # (client, experiment id)
        self._error: Exception | None = None

    def log(self, output_uri: str) -> str:
        out = OutputDir(output_uri, self.config.storage_options(output_uri))
        if not out.exists("report.json"):
            raise ReplaceMeError(f"output_dir: {output_uri} has no report.json; only a finished run can be logged")
        report_text = out.read_text("report.json")
        if self._opened is None and self._error is None:
            self.open()
        try:
            if self._error is not None:
                raise self._error
            assert self._opened is not None  # open() sets one of the two
            client, experiment_id = self._opened
            return _Recorder(client, experiment_id, self.settings, out, json.loads(report_text),
                             _digest(report_text)).record()
        except ReplaceMeError:
            raise
        except ConnectionError as exc:
            raise tracking_failed(self.uri, output_uri, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - MLflow, HTTP, storage: the run is done, only its record failed
            raise tracking_failed(self.uri, output_uri, f"{type(exc).__name__}: {exc}") from None

    def open(self) -> None:
        """Import MLflow, open the store and the experiment (seconds); errors wait for log()."""
        try:
            _check_reachable(self.uri)
            from mlflow import MlflowClient

            # MLflow prints "View run at <tracking URI>" on finishing a run, password included; the
            # CLI prints its own line with the URI redacted
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
            # MLflow's usage telemetry calls an outside service: off unless the user turns it on
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            # the registry too: MLflow would otherwise resolve it from $MLFLOW_TRACKING_URI or its default
            client = MlflowClient(self.uri, registry_uri=self.uri)
            self._opened = client, self._experiment(client)
        except Exception as exc:  # noqa: BLE001 - reported by log(), where the outputs are known
            self._error = exc

    def prepare_model_logging(self) -> None:
        """Import what writing the model with MLflow's transformers flavour needs (seconds of CPU),
        so that a tracking child does it while the run computes, not after it."""
        if (self._error is None and not self.config.save_transform_only
                and self.settings.model_logging in ("auto", "transformers")):
            with suppress(ImportError):  # saving the model reports it, with the model named
                import_transformers_flavour()

    def _experiment(self, client: Any) -> str:
        found = client.get_experiment_by_name(self.settings.experiment)
        if found is not None:
            return found.experiment_id
        from mlflow.exceptions import MlflowException

        log.info("mlflow: creating experiment %r", self.settings.experiment)
        try:
            return client.create_experiment(self.settings.experiment, artifact_location=self._artifact_root())
        except MlflowException as exc:  # created meanwhile by a concurrent run
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(self.settings.experiment).experiment_id

    def _artifact_root(self) -> str | None:
        """For a SQLite store, artifacts beside the database (MLflow would put them under the working
        directory, wherever that happens to be); servers choose their own."""
        if not self.uri.startswith("sqlite:///"):
            return None
        database = Path(self.uri.removeprefix("sqlite:///")).resolve()
        return (database.parent / "mlruns" / self.settings.experiment).as_uri()


def tracking_failed(uri: str, output_uri: str, reason: str) -> TrackingError:
    password = urlsplit(uri).password
    relog = f"re-log them with `replaceme log {output_uri}`"
    if password:  # MLflow's own messages may quote the URI; report.json keeps no password to re-log with
        reason = reason.replace(password, "***")
        relog = (f"re-log them with `replaceme log {output_uri} --set mlflow.tracking_uri={without_credentials(uri)}` "
                 "with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD set")
    return TrackingError(f"mlflow.tracking_uri: tracking failed, the run was not recorded in {redact_uri(uri)} ({reason}); "
                         f"the outputs in {output_uri} are complete: {relog}")


def credentials_hint(uri: str) -> str:
    """How to give a tracking URI whose password was redacted, without printing one."""
    return (f"pass `--set mlflow.tracking_uri={without_credentials(uri)}` with MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD set (or --set mlflow.tracking_uri=<the URI with its password>)")


def _check_reachable(uri: str) -> None:
    """Fail in a second, not after MLflow's minutes of HTTP retries."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {parts.hostname}:{port} ({exc.strerror or exc})") from None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Recorder:
    """One MLflow run from one output folder."""

    def __init__(self, client: Any, experiment_id: str, settings: MlflowConfig, out: OutputDir,
                 report: dict[str, Any], digest: str) -> None:
        self.client, self.experiment_id = client, experiment_id
        self.settings, self.out, self.report, self.digest = settings, out, report, digest

    def record(self) -> str:
        experiment_id = self.experiment_id
        existing = self._existing_run(experiment_id)
        if existing:
            log.info("mlflow: %s is already recorded as run %s", self.out.uri, existing)
            return existing
        run = self.client.create_run(experiment_id, run_name=self.settings.run_name or self._default_name(),
                                     tags=self._tags())
        run_id, model_id = run.info.run_id, None
        try:
            # the logged model first: the evaluation metrics are linked to it (MLflow's Logged Models view)
            model_id = self._create_model(experiment_id, run_id)
            self._log_data(run_id, model_id)
            self._log_inputs(run_id)
            self._log_artifacts(run_id)
            self._log_model(run_id, model_id)
        except BaseException:
            if model_id is not None:
                self._model_failed(model_id)
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")
        log.info("mlflow: recorded run %s in experiment %r", run_id, self.settings.experiment)
        return run_id

    def _model_failed(self, model_id: str) -> None:
        from mlflow.entities import LoggedModelStatus

        try:
            self.client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        except Exception as exc:  # noqa: BLE001 - the error that failed the run is the one to report
            log.warning("mlflow: could not mark logged model %s as failed (%s)", model_id, exc)

    # --- run and identity ---------------------------------------------------------------------

    def _existing_run(self, experiment_id: str) -> str | None:
        runs = self.client.search_runs(
            [experiment_id], f"tags.`{REPORT_DIGEST_TAG}` = '{self.digest}' and attributes.status = 'FINISHED'",
            max_results=1)
        return runs[0].info.run_id if runs else None

    def _default_name(self) -> str:
        return default_run_name(self.report, self.digest)

    def _tags(self) -> dict[str, str]:
        r, lineage = self.report, self.report.get("lineage", {})
        tags = {
            REPORT_DIGEST_TAG: self.digest,
            "replaceme.output_uri": self.out.fs.unstrip_protocol(self.out.root),
            "replaceme.blocks": json.dumps(r["blocks"]),
            "replaceme.version": r["replaceme_version"],
            "source_model": lineage.get("source_model", {}).get("uri", r["source_model"]),
        }
        if "digest" in lineage.get("source_model", {}):
            tags["source_model_digest"] = lineage["source_model"]["digest"]
        if "git_commit" in lineage.get("code", {}):
            tags["mlflow.source.git.commit"] = lineage["code"]["git_commit"]
        for key in ("ray_job_id", "pipeline_run_id"):
            if key in lineage:
                tags[key] = lineage[key]
        for kind, uri in lineage.get("stores", {}).items():
            tags[f"{kind}_uri"] = uri
        return tags

    # --- params and metrics ---------------------------------------------------------------------

    def _log_data(self, run_id: str, model_id: str | None) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        params = [Param(key, _param_value(value)) for key, value in _flatten(self.report["config"])]
        evaluation = self.report.get("lineage", {}).get("datasets", {}).get("evaluation")
        metrics = []
        for key, value, step in self._metrics():
            linked: dict[str, Any] = {}
            if model_id is not None and _describes_model(key):
                linked["model_id"] = model_id
                if evaluation is not None and key in EVALUATION_METRICS:
                    linked.update(dataset_name="evaluation", dataset_digest=evaluation["digest"])
            metrics.append(Metric(key, float(value), now, step, **linked))
        for start in range(0, max(len(params), len(metrics)), 100):  # MLflow's per-request limits
            self.client.log_batch(run_id, metrics=metrics[start:start + 100], params=params[start:start + 100])

    def _metrics(self) -> Iterator[tuple[str, float, int]]:
        r = self.report
        for key in ("perplexity_before", "perplexity_after", "retention", "eval_tokens", "calibration_tokens",
                    "removed_layers", "removed_fraction"):
            if key in r:
                yield key, r[key], 0
        for detail in r["solver"]:  # stepped by the block's first layer, like the distance profile
            for key in ("relative_residual", "relative_residual_dropping", "cosine_distance", "cosine_distance_dropping"):
                if key in detail:
                    yield f"solver/{key}", detail[key], detail["block"][0]
        for step, seconds in r["seconds"].items():
            yield f"seconds/{step}", seconds, 0
        yield "seconds/total", sum(r["seconds"].values()), 0
        for step, peaks in r.get("step_peak_memory_mb", {}).items():
            for kind, mb in peaks.items():
                yield f"peak_memory_mb/{step}/{kind}", mb, 0
        if self.out.exists("distances.csv"):
            text = self.out.read_text("distances.csv")
            for start, _end, distance in distances_from_csv(text, self.out.uri):
                yield "distance", distance, start
            for (start, _end), residual in (residuals_from_csv(text, self.out.uri) or {}).items():
                yield "residual", residual, start
        for key, value in lm_eval_metrics(r.get("lm_eval") or {}).items():
            yield key, value, 0

    # --- inputs, artifacts, model ------------------------------------------------------------------

    def _log_inputs(self, run_id: str) -> None:
        from mlflow.entities import DatasetInput, InputTag

        datasets = self.report.get("lineage", {}).get("datasets", {})
        inputs = [DatasetInput(_dataset_entity(name, d), tags=[InputTag("mlflow.data.context", name)])
                  for name, d in datasets.items()]
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def _log_artifacts(self, run_id: str) -> None:
        for name in ARTIFACTS:
            if self.out.exists(name):
                with local_path(self.out, name) as path:
                    self.client.log_artifact(run_id, path)

    def _create_model(self, experiment_id: str, run_id: str) -> str | None:
        """A logged model of the run, still PENDING, unless the model is registered by reference."""
        if not self.out.exists("model") or self.settings.model_logging == "reference":
            return None  # save_transform_only (maps, no pruned checkpoint), or nothing copied
        model = self.client.create_logged_model(experiment_id, name="pruned-model", source_run_id=run_id,
                                                tags=self._model_tags())
        return model.model_id

    def _log_model(self, run_id: str, model_id: str | None) -> None:
        if not self.out.exists("model"):
            return
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        source = self.out.fs.unstrip_protocol(self.out.path("model"))
        if model_id is not None:
            with local_path(self.out, "model") as folder:
                if self._model_format(folder) == "transformers":
                    with tempfile.TemporaryDirectory() as staging:
                        save_transformers_model(folder, os.path.join(staging, "model"), model_id=model_id,
                                                run_id=run_id, source_model=self._model_tags()["source_model"])
                        self.client.log_model_artifacts(model_id, os.path.join(staging, "model"))
                else:
                    self.client.log_model_artifacts(model_id, folder)
            self.client.finalize_logged_model(model_id, LoggedModelStatus.READY)
            self.client.log_outputs(run_id, models=[LoggedModelOutput(model_id, step=0)])
            # its artifact location rather than models:/<id>, which MLflow's local registry store
            # resolves through the process-wide tracking URI instead of this client's
            source = self.client.get_logged_model(model_id).artifact_location
        if self.settings.register_as:
            self._register(source, run_id, model_id)

    def _model_format(self, folder: str) -> str:
        """transformers or files (``mlflow.log_model``); auto: transformers when the model fits in memory."""
        wanted = self.settings.model_logging
        if wanted != "auto":
            return wanted
        import torch

        from replaceme.memory import free_bytes, gib

        size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
        room = free_bytes(torch.device("cpu"))
        if size <= room // 2:
            return "transformers"
        log.warning("mlflow: the pruned model (%s) does not fit in half the free host memory (%s) to be written "
                    "with MLflow's transformers flavour: its files are logged as they are, which mlflow.pyfunc "
                    "cannot load (set mlflow.log_model: transformers to insist, reference to copy nothing)",
                    gib(size), gib(room))
        return "files"

    def _register(self, source: str, run_id: str, model_id: str | None) -> None:
        """A new version under ``register_as``; an existing name gains a version, nothing is replaced."""
        from mlflow.exceptions import MlflowException

        name = self.settings.register_as
        try:
            self.client.create_registered_model(name, description="Depth-pruned with ReplaceMe")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, source, run_id=run_id, tags=self._model_tags(),
                                                   model_id=model_id)
        log.info("mlflow: registered %s version %s", name, version.version)

    def _model_tags(self) -> dict[str, str]:
        lineage = self.report.get("lineage", {}).get("source_model", {})
        return {"source_model": lineage.get("uri", self.report["source_model"]),
                "source_model_digest": lineage.get("digest", ""),
                "blocks": json.dumps(self.report["blocks"]), "method": self.report["method"]}


# metrics that describe the pruned model (linked to its logged model), and those measured on the
# evaluation dataset (linked to it as well)
EVALUATION_METRICS = ("perplexity_before", "perplexity_after", "retention", "eval_tokens")
MODEL_METRICS = (*EVALUATION_METRICS, "removed_layers", "removed_fraction")


def _describes_model(key: str) -> bool:
    return key in MODEL_METRICS or key.startswith("lm_eval/")


def default_run_name(report: dict[str, Any], digest: str) -> str:
    """``<model>-<method>-<blocks>[-alpha<α>]-<id>``: what differs between compressions of one model,
    and a short id (of the report) that tells reruns of the same settings apart."""
    model = report["source_model"].rstrip("/").rsplit("/", 1)[-1]
    blocks = "+".join(f"{s}-{e}" for s, e in report["blocks"]) or "none"
    parts = [model, report["method"], f"drop{blocks}"]
    alpha = report.get("config", {}).get("alpha")
    if report["method"] == "lstsq" and alpha is not None:
        parts.append(f"alpha{alpha:g}")
    return "-".join([*parts, digest[:6]])


_LM_EVAL_NOT_METRICS = ("alias", "name", "sample_len", "samples")


def lm_eval_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``results`` as MLflow metrics ``lm_eval/<task>/<metric>[/<filter>]``.

    lm-eval keys metrics ``<metric>,<filter>`` (``acc,none``, ``exact_match,strict-match``); MLflow
    refuses commas, and the ``none`` filter says nothing. Values that are not numbers (an
    unavailable stderr is ``"N/A"``) are left out.
    """
    metrics: dict[str, float] = {}
    for task, values in results.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key in _LM_EVAL_NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if value != value:  # NaN: an aggregate lm-eval could not compute
                continue
            metric, _, selection = key.partition(",")
            name = "/".join(part for part in (task, metric, "" if selection == "none" else selection) if part)
            metrics[f"lm_eval/{_metric_name(name)}"] = float(value)
    return metrics


def _metric_name(name: str) -> str:
    """Only the characters MLflow accepts in a metric name (alphanumerics, _ - . space : /)."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def save_transformers_model(folder: str, path: str, *, model_id: str | None = None, run_id: str | None = None,
                            source_model: str | None = None) -> None:
    """The checkpoint in ``folder`` as an MLflow model of the transformers flavour at ``path``: a
    ``text-generation`` pipeline that ``mlflow.transformers.load_model`` and ``mlflow.pyfunc.load_model``
    load. The model is loaded in host memory once to be written."""
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a recording step, not the user's work: no bars
    try:
        _save_pipeline(folder, path, model_id, run_id)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    # MLflow's LICENSE.txt sends the reader to huggingface.co/<the local folder>: say whose licence applies
    licences = sorted(f.name for f in Path(folder).iterdir() if f.name.upper().startswith(("LICENSE", "LICENCE")))
    Path(path, "LICENSE.txt").write_text(
        f"Depth-pruned from {source_model or 'its source model'} with ReplaceMe: the source model's licence applies"
        + (f" (copied with the checkpoint: model/{', model/'.join(licences)}).\n" if licences else
           "; see the source model's repository or model card.\n"))


def import_transformers_flavour() -> None:
    """The modules :func:`save_transformers_model` imports, the pipeline's included."""
    import mlflow.transformers  # noqa: F401
    import transformers.pipelines.text_generation  # noqa: F401
    from huggingface_hub import ModelCard  # noqa: F401
    from mlflow.models import Model, ModelSignature  # noqa: F401
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema  # noqa: F401


def _save_pipeline(folder: str, path: str, model_id: str | None, run_id: str | None) -> None:
    import mlflow
    import torch
    import transformers
    from huggingface_hub import ModelCard
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    pipeline = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    card = Path(folder, "README.md")
    # our card when the run wrote one; never MLflow's default, a look-up on the Hub by the folder's name
    model_card = ModelCard(card.read_text() if card.is_file() else "---\nlibrary_name: transformers\ntags:\n"
                           "- replaceme\n- depth-pruning\n---\nDepth-pruned with ReplaceMe.\n")
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}"]
    # predict(texts, params={"max_new_tokens": …, "do_sample": …}): greedy unless told otherwise
    signature = ModelSignature(Schema([ColSpec("string")]), Schema([ColSpec("string")]),
                               ParamSchema([ParamSpec("max_new_tokens", "long", 64),
                                            ParamSpec("do_sample", "boolean", False)]))
    with warnings.catch_warnings():  # MLflow's notes on the transformers flavour's future
        warnings.simplefilter("ignore")
        mlflow.transformers.save_model(pipeline, path, task="text-generation", model_card=model_card,
                                       pip_requirements=requirements, signature=signature,
                                       mlflow_model=Model(model_id=model_id, run_id=run_id))


def _dataset_entity(name: str, identity: dict[str, Any]):
    """An MLflow dataset naming where the data lives and what exactly was used (its digest)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset

    uri = identity["uri"]
    if "://" in uri or os.path.isabs(uri):
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": any local source will do
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(uri)
    else:
        source = HuggingFaceDatasetSource(path=uri)
    return Dataset(**MetaDataset(source, name=name, digest=identity["digest"]).to_dict())


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's param length limit


# --- tracking beside the run ------------------------------------------------------------------


class TrackerProcess:
    """A :class:`Tracker` in a child process, started when the run starts.

    Importing MLflow and opening its store costs seconds, as long as a small run. A child process
    at low CPU priority does it on the cores the run leaves idle; a thread would not, because it
    would contend for the interpreter lock with the run's own Python. The config travels over a
    pipe (it may hold credentials), never on the command line.

    The child ignores SIGINT: Ctrl-C reaches the whole process group, and the run (this process)
    decides what an interrupt means, then cancels the child; a child of its own would print a
    traceback from wherever it was importing MLflow.
    """

    def __init__(self, config: ReplaceMeConfig) -> None:
        self.uri = tracking_uri(config.mlflow)
        with _sigint_ignored():  # inherited through exec: Python leaves an ignored SIGINT ignored
            self.process = subprocess.Popen([sys.executable, "-m", "replaceme.tracking"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True)
        assert self.process.stdin is not None  # stdin=PIPE
        self.process.stdin.write(json.dumps(_revealed(config)) + "\n")
        self.process.stdin.flush()

    def log(self, output_uri: str) -> str:
        answer, _ = self.process.communicate(output_uri + "\n")
        try:
            result = json.loads(answer.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise tracking_failed(self.uri, output_uri,
                                  f"the tracking process exited with {self.process.returncode}") from None
        if "error" in result:
            raise TrackingError(result["error"])
        return result["run_id"]

    def cancel(self) -> None:
        """The run failed: nothing to record, and no reason to wait for MLflow to finish opening
        (SQLite transactions survive the kill)."""
        self.process.kill()
        self.process.communicate()


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored for the moment it takes to start a child (only the main thread may do so)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: the child gets the default disposition
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _revealed(config: ReplaceMeConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    data["token"] = None  # not needed to record a run
    return data


def _serve() -> None:
    """The child of :class:`TrackerProcess`: open MLflow now, record the output named on stdin."""
    os.nice(19)  # the run comes first
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run decides, and cancels this process
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("replaceme").setLevel(os.environ.get("REPLACEME_LOG_LEVEL", "INFO"))  # the command's --log-level
    from replaceme.config import validate_config

    tracker = Tracker(validate_config(json.loads(sys.stdin.readline())))
    tracker.open()
    tracker.prepare_model_logging()
    output_uri = sys.stdin.readline().strip()
    if output_uri:
        try:
            print(json.dumps({"run_id": tracker.log(output_uri)}))
        except ReplaceMeError as exc:
            print(json.dumps({"error": str(exc)}))
    # Everything is written synchronously and committed: skip the interpreter's teardown of
    # MLflow's module graph, which the user would otherwise wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _serve()
