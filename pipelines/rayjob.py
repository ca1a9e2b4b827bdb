"""A pipeline step run as a KubeRay RayJob: its manifest, its creation, and waiting for its end.

KFP v2 has no step that creates a custom resource, so a component creates the RayJob through the
Kubernetes API and polls ``status.jobDeploymentStatus`` / ``status.jobStatus``. The API object is
passed in (``kubernetes.client.CustomObjectsApi`` in a cluster, a stand-in in the tests).
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops import STEPS
from replaceme.errors import ReplaceMeError

log = logging.getLogger("replaceme.pipelines")

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
FAILED_DEPLOYMENTS = ("Failed", "ValidationFailed")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def rayjob_name(step: str, pipeline_run_id: str, output_uri: str) -> str:
    """One name per (pipeline run, output, step): a retried component finds its own RayJob again."""
    tag = hashlib.sha256(f"{pipeline_run_id}|{output_uri}".encode()).hexdigest()[:10]
    return f"replaceme-{step}-{tag}"


def step_entrypoint(step: str, *, config_uri: str, output_uri: str, pipeline_run_id: str) -> str:
    """The command the RayJob runs: the ops step itself, on the Ray cluster the job is in."""
    if step not in STEPS:
        raise ValueError(f"step {step!r} is not one of {', '.join(STEPS)}")
    args = ["python", "-m", f"ops.{step}", "--config", config_uri, "--output", output_uri,
            "--set", "engine.backend=ray", "--set", "engine.address=auto"]
    if pipeline_run_id:
        args += ["--pipeline-run-id", pipeline_run_id]
    return shlex.join(args)


def rayjob_for_step(step: str, *, config_uri: str, output_uri: str, pipeline_run_id: str,
                    image: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    """The RayJob manifest (cluster/rayjob.yaml) that runs ``python -m ops.<step>``."""
    from cluster.manifests import render_rayjob

    entrypoint = step_entrypoint(step, config_uri=config_uri, output_uri=output_uri, pipeline_run_id=pipeline_run_id)
    return render_rayjob(name=rayjob_name(step, pipeline_run_id, output_uri), entrypoint=entrypoint,
                         image=image or None, namespace=namespace or None)


def submit(api: Any, manifest: dict[str, Any], namespace: str) -> None:
    """Create the RayJob; one that already exists (a retried component) is waited for instead."""
    from kubernetes.client.exceptions import ApiException

    name = manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        log.info("created RayJob %s/%s", namespace, name)
    except ApiException as exc:
        if exc.status != 409:
            raise ReplaceMeError(f"creating RayJob {namespace}/{name} failed ({exc.status} {exc.reason}); "
                                 "check that KubeRay is installed and that the pipeline's service account "
                                 "may create rayjobs.ray.io in this namespace") from None
        log.info("RayJob %s/%s exists already (a retry): waiting for it", namespace, name)


def outcome(status: dict[str, Any]) -> str | None:
    """'succeeded' or 'failed' once the RayJob has ended, else None."""
    deployment = status.get("jobDeploymentStatus")
    if deployment in FAILED_DEPLOYMENTS:
        return "failed"
    if deployment == "Complete":  # older KubeRay also ends failed jobs as Complete
        return "succeeded" if status.get("jobStatus") == "SUCCEEDED" else "failed"
    return None


def wait_for_rayjob(api: Any, name: str, namespace: str, *, timeout_s: float, poll_s: float = 15.0,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll the RayJob until it has ended; its final status, or a ReplaceMeError when it failed or
    did not end within ``timeout_s``."""
    from kubernetes.client.exceptions import ApiException

    deadline, seen = clock() + timeout_s, None
    status: dict[str, Any] = {}
    while True:
        try:
            status = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        except ApiException as exc:
            if exc.status == 404:
                raise ReplaceMeError(f"RayJob {namespace}/{name} disappeared while the pipeline waited for it") from None
            log.warning("reading RayJob %s/%s failed (%s); retrying", namespace, name, exc.status)
        state = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
        if state != seen:
            log.info("RayJob %s/%s: deployment %s, job %s", namespace, name, *state)
            seen = state
        result = outcome(status)
        if result == "succeeded":
            return status
        if result == "failed":
            raise ReplaceMeError(f"RayJob {namespace}/{name} failed: {_describe(status)}; see `kubectl describe "
                                 f"rayjob {name} -n {namespace}` and `kubectl logs job/{name} -n {namespace}`")
        if clock() >= deadline:
            raise ReplaceMeError(f"RayJob {namespace}/{name} did not finish within {timeout_s:.0f} s "
                                 f"({_describe(status)}); it is left running: "
                                 f"`kubectl delete rayjob {name} -n {namespace}` to stop it")
        sleep(poll_s)


def _describe(status: dict[str, Any]) -> str:
    keys = ("jobDeploymentStatus", "jobStatus", "reason", "message")
    parts = [f"{key} {status[key]}" for key in keys if status.get(key)]
    return ", ".join(parts) or "no status yet"


def run_step_as_rayjob(step: str, *, config_uri: str, output_uri: str, pipeline_run_id: str,
                       namespace: str | None = None, image: str | None = None, timeout_s: float = 8 * 3600,
                       poll_s: float = 15.0, api: Any = None) -> dict[str, Any]:
    """Create the step's RayJob and wait for it; returns its final status."""
    manifest = rayjob_for_step(step, config_uri=config_uri, output_uri=output_uri,
                               pipeline_run_id=pipeline_run_id, image=image, namespace=namespace)
    namespace = manifest["metadata"].get("namespace") or current_namespace()
    api = api if api is not None else kubernetes_api()
    submit(api, manifest, namespace)
    return wait_for_rayjob(api, manifest["metadata"]["name"], namespace, timeout_s=timeout_s, poll_s=poll_s)


def current_namespace() -> str:
    """The namespace of the pod this runs in (the pipeline's), else 'default'."""
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return "default"


def kubernetes_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:  # outside a cluster: the user's kubeconfig
        config.load_kube_config()
    return client.CustomObjectsApi()
