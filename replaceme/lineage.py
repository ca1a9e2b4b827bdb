"""Where a run came from: source model, data, code version, and the job that ran it.

Written into ``report.json`` at run time, so ``replaceme log`` can record the same lineage in
MLflow later, from another machine, without the job's environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replaceme import __version__
from replaceme.checkpoint import INDEX_FILE, Checkpoint

if TYPE_CHECKING:
    from replaceme.config import ReplaceMeConfig

log = logging.getLogger("replaceme")

PIPELINE_RUN_ENV = "REPLACEME_PIPELINE_RUN_ID"  # set by the Kubeflow steps (ops/)
GIT_COMMIT_ENV = "REPLACEME_GIT_COMMIT"  # set in the container image, which has no .git


def model_identity(checkpoint: Checkpoint) -> dict[str, str]:
    """The checkpoint's URI and a digest of its config and weight index: two checkpoints with the
    same digest have the same architecture and the same tensors in the same shards."""
    digest = hashlib.sha256(checkpoint.read_text("config.json").encode())
    if INDEX_FILE in checkpoint.files():
        digest.update(checkpoint.read_text(INDEX_FILE).encode())
    return {"uri": checkpoint.fs.unstrip_protocol(checkpoint.root), "digest": digest.hexdigest()[:16]}


def dataset_identity(source: str, texts: list[str]) -> dict[str, Any]:
    """The data a run learned from: its URI and a digest of the texts actually used."""
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    uri = os.path.abspath(source) if os.path.exists(source) else source  # a URI or a Hub dataset name as given
    return {"uri": uri, "digest": digest, "rows": len(texts)}


def code_version() -> dict[str, str]:
    commit = os.environ.get(GIT_COMMIT_ENV) or _git_commit()
    return {"version": __version__, **({"git_commit": commit} if commit else {})}


def _git_commit() -> str | None:
    """HEAD of the checkout the package was imported from (editable installs), else None."""
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def ray_job_id() -> str | None:
    """The Ray job this process is the driver of (``ray job submit``, a RayJob), else None: the job
    supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR for the entrypoint; Ray's workers carry RAY_JOB_ID."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        try:
            submission = json.loads(config).get("metadata", {}).get("job_submission_id")
        except (ValueError, AttributeError):
            submission = None
        return submission or "unknown"
    return os.environ.get("RAY_JOB_ID") or None


def ray_job_warnings(config: ReplaceMeConfig, tracking: str | None = None) -> list[str]:
    """Inside a Ray job, what the run would write into the job's temporary working directory (which
    Ray removes with the job): output settings given as relative paths, and ``tracking`` (the run's
    MLflow tracking URI, when it records one) when it is a store at a relative path."""
    job = ray_job_id()
    if job is None:
        return []
    where = f"inside Ray job {job} the working directory {os.getcwd()} is the job's temporary folder, removed with it"
    warnings = [f"{key}: {path!r} is a relative path: {where}; set {key} to a URI (s3://…) or an absolute path on "
                "storage that outlives the job" for key, path in config._relative_outputs.items()]
    if tracking is not None and _relative_store(tracking):
        warnings.append(f"mlflow.tracking_uri: the MLflow store {tracking} is a relative path: {where}; set "
                        "mlflow.tracking_uri (or $MLFLOW_TRACKING_URI) to a tracking server, e.g. http://mlflow:5000")
    return warnings


def warn_about_ray_job_paths(config: ReplaceMeConfig, *, tracked: bool) -> None:
    """Log :func:`ray_job_warnings` (first thing in the job's log), with the MLflow store when the
    command records a run (``tracked``)."""
    tracking = None
    if tracked and config.mlflow.enabled:
        from replaceme.tracking import tracking_uri

        tracking = tracking_uri(config.mlflow)
    for warning in ray_job_warnings(config, tracking):
        log.warning("%s", warning)


def _relative_store(uri: str) -> bool:
    """sqlite:///relative.db, file:relative, or a plain relative folder (MLflow takes all three)."""
    for prefix in ("sqlite:///", "file://", "file:"):
        if uri.startswith(prefix):
            return not os.path.isabs(uri.removeprefix(prefix))
    if "://" in uri or uri.split(":")[0] in ("databricks", "databricks-uc", "uc"):  # servers and workspaces
        return False
    return not os.path.isabs(os.path.expanduser(uri))


def job_ids() -> dict[str, str]:
    """The Ray job submission id (inside ``ray job submit``) and the Kubeflow pipeline run id."""
    ids = {}
    ray_job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {}).get("job_submission_id")
    if ray_job:
        ids["ray_job_id"] = ray_job
    if os.environ.get(PIPELINE_RUN_ENV):
        ids["pipeline_run_id"] = os.environ[PIPELINE_RUN_ENV]
    return ids
