"""The output location of a run: a local folder or fsspec URI that is never seen half-written.

A whole ``run`` is written into a sibling staging folder (``<output>.incomplete``) and moved into
place at the end; single steps (``merge`` …) stage their own artefact the same way. A crash
therefore leaves only an ``.incomplete`` folder, never something that looks finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from replaceme.errors import ReplaceMeError

STAGING_SUFFIX = ".incomplete"


def _normalise(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def is_inside(child: str, parent: str) -> bool:
    child, parent = _normalise(child).rstrip("/"), _normalise(parent).rstrip("/")
    return child == parent or child.startswith(parent + "/")


class OutputDir:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self.path(name) if name else self.root)

    def read_text(self, name: str) -> str:
        with self.fs.open(self.path(name), "r") as handle:
            return handle.read()

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.path(name), "rb") as handle:
            return handle.read()

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2) + "\n")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write to a temporary name, then rename: readers never see a partial file."""
        folder, _, base = self.path(name).rpartition("/")
        self.fs.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{base}.partial"
        with self.fs.open(temporary, "wb") as handle:
            handle.write(data)
        self.fs.mv(temporary, self.path(name))

    @contextmanager
    def staged(self, name: str, *, overwrite: bool = True) -> Iterator[str]:
        """Yield a staging path for folder ``name``; move it into place only if the block succeeds."""
        final, staging = self.path(name), self.path(name + STAGING_SUFFIX)
        if self.fs.exists(final) and not overwrite:
            raise ReplaceMeError(f"output_dir: {self.uri}/{name} already exists; pass --overwrite to replace it")
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        self.fs.makedirs(staging, exist_ok=True)
        yield staging
        publish(self.fs, staging, final)


@contextmanager
def staged_run(uri: str, *, overwrite: bool, storage_options: dict[str, Any] | None = None) -> Iterator[OutputDir]:
    """An :class:`OutputDir` for a whole run, published at ``uri`` only when the run completes."""
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"), **(storage_options or {}))
    if fs.exists(root) and not overwrite:
        raise ReplaceMeError(f"output_dir: {uri} already exists; choose another output_dir or pass --overwrite")
    staging_uri = uri.rstrip("/") + STAGING_SUFFIX
    staging = OutputDir(staging_uri, storage_options)
    if staging.exists():
        fs.rm(staging.root, recursive=True)
    fs.makedirs(staging.root, exist_ok=True)
    yield staging
    publish(fs, staging.root, root)


# Files whose presence says "this folder is complete"; copied last to an object store.
COMPLETION_MARKERS = ("config.json", "report.json")


def publish(fs: fsspec.AbstractFileSystem, staging: str, final: str) -> None:
    """Replace ``final`` by ``staging``: a rename on local disks; on object stores (no rename, no
    folders) a copy of every object with the completion markers last, then the staging copy removed."""
    if fs.exists(final):
        fs.rm(final, recursive=True)
    if isinstance(fs, LocalFileSystem):
        fs.mv(staging, final, recursive=True)
        return
    files = sorted(fs.find(staging), key=lambda path: path.rsplit("/", 1)[-1] in COMPLETION_MARKERS)
    for path in files:
        fs.copy(path, final + path[len(staging):])
    fs.rm(staging, recursive=True)
