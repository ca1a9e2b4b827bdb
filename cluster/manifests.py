"""The KubeRay manifests of this folder as Python data (for the Kubeflow pipeline and the tests).

The YAML files are the single source of truth: :func:`render_rayjob` loads ``rayjob.yaml`` and
changes only the job's name, namespace, entrypoint and, when asked, the container image.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

import yaml

from replaceme import __version__

# The one place the image is named: the YAML files, the tests and the pipelines refer to this.
IMAGE = f"ghcr.io/replaceme/replaceme:{__version__}"

# KubeRay derives the cluster name (<job>-<5 chars>) and then Service names from a RayJob's
# name, so it must be a DNS-1035 label of at most 47 characters.
RAYJOB_NAME_MAX = 47
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def load_manifest(filename: str) -> dict[str, Any]:
    """A manifest of this package (e.g. ``"rayjob.yaml"``), freshly parsed: callers may edit it."""
    text = resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def render_rayjob(*, name: str, entrypoint: str, image: str | None = None,
                  namespace: str | None = None) -> dict[str, Any]:
    """The RayJob of ``rayjob.yaml`` with this name, namespace, entrypoint and image."""
    if len(name) > RAYJOB_NAME_MAX or not _DNS1035_LABEL.match(name):
        raise ValueError(f"RayJob name {name!r} must be a DNS-1035 label (lower-case letters, digits, '-', "
                         f"starting with a letter) of at most {RAYJOB_NAME_MAX} characters")
    if not entrypoint.strip():
        raise ValueError("entrypoint is empty; give the command the Ray job runs, e.g. 'python -m replaceme run …'")
    job = load_manifest("rayjob.yaml")
    job["metadata"]["name"] = name
    if namespace:
        job["metadata"]["namespace"] = namespace
    job["spec"]["entrypoint"] = entrypoint
    if image:
        for container in iter_containers(job):
            container["image"] = image
    return job


def iter_containers(manifest: Any) -> Iterator[dict[str, Any]]:
    """Every container of every pod template in a manifest (head, worker groups, submitter)."""
    if isinstance(manifest, dict):
        for key, value in manifest.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from iter_containers(value)
    elif isinstance(manifest, list):
        for item in manifest:
            yield from iter_containers(item)
