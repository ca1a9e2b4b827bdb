"""The output location of a run: a local folder or fsspec URI that is never seen half-written, never
shared by two runs, and never replaced unless replaceme wrote it.

- **Staging.** A whole ``run`` is written into a sibling folder (``<output>.incomplete``) and
  published at the end; single steps (``merge`` …) stage their own artefact the same way. A crash
  leaves only the staging folder, which a rerun with the same settings resumes from.
- **Ownership.** Every folder replaceme writes holds a small ``.replaceme`` file. ``--overwrite``
  replaces only such a folder (or an empty one): never a folder holding the source model, the
  data, or anything else.
- **One run at a time.** :func:`locked` takes ``<output>.lock`` before touching anything: an
  ``flock`` on local disks (released by the kernel when the holder dies), a lease object created
  with a conditional PUT on object stores (renewed while the run lives, taken over once expired).
- **Publishing** never deletes the old output first: on local disks the old folder is moved
  aside, the new one renamed into place, then the old one removed; on object stores (no rename)
  the new objects are copied over the old ones with the completion markers last, then the objects
  the new output does not have are removed. Until then the complete new output stays in staging.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from replaceme import __version__
from replaceme.errors import ReplaceMeError
from replaceme.storage import filesystem

log = logging.getLogger("replaceme")

STAGING_SUFFIX = ".incomplete"
LOCK_SUFFIX = ".lock"
OWNER_FILE = ".replaceme"
# Files whose presence says "this folder is complete"; removed first and copied last on object stores.
COMPLETION_MARKERS = (OWNER_FILE, "report.json", "config.json")
LEASE_SECONDS = 300.0  # an object-store lease not renewed for this long belongs to a dead run


def _normalise(uri: str) -> str:
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def is_inside(child: str, parent: str) -> bool:
    child, parent = _normalise(child), _normalise(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


class OutputDir:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, *, staging: bool = False) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri, field="output_dir", options=storage_options)
        self.root = self.root.rstrip("/")
        self.is_staging = staging  # a run's staging folder: its artefacts need no staging of their own

    @property
    def final_uri(self) -> str:
        """Where this folder's contents will be once published."""
        return self.uri.removesuffix(STAGING_SUFFIX) if self.is_staging else self.uri

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
        """Readers never see a partial file: on local disks it is written aside and renamed; an object
        store's PUT is atomic already (and a rename there would be one more copy)."""
        folder, _, base = self.path(name).rpartition("/")
        if not isinstance(self.fs, LocalFileSystem):
            self.fs.pipe_file(self.path(name), data)
            return
        self.fs.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{base}.partial"
        with self.fs.open(temporary, "wb") as handle:
            handle.write(data)
        self.fs.mv(temporary, self.path(name))

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name), recursive=True)

    def mark_owned(self, run: str) -> None:
        self.write_json(OWNER_FILE, {"tool": "replaceme", "version": __version__, "run": run,
                                     "created": _now()})

    def ensure_owned(self) -> None:
        """Mark a folder replaceme is about to write as its own (claiming checked it may)."""
        if not self.exists(OWNER_FILE):
            self.mark_owned(uuid.uuid4().hex)

    @contextmanager
    def staged(self, name: str, *, overwrite: bool = True) -> Iterator[str]:
        """Yield a path for folder ``name`` that appears complete or not at all. Inside a run's
        staging folder that is the final path (the run is published as a whole, each byte copied
        once); elsewhere a sibling staging folder, moved into place when the block succeeds."""
        final = self.path(name)
        if self.fs.exists(final) and not overwrite:
            raise ReplaceMeError(f"output_dir: {self.uri}/{name} already exists; pass --overwrite to replace it")
        if self.is_staging:
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            self.fs.makedirs(final, exist_ok=True)
            yield final
            return
        staging = self.path(name + STAGING_SUFFIX)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        self.fs.makedirs(staging, exist_ok=True)
        yield staging
        publish(self.fs, staging, final)


# --- claiming an output for a run ----------------------------------------------------------------


@contextmanager
def locked(uri: str, *, storage_options: dict[str, Any] | None = None) -> Iterator[None]:
    """Hold ``<uri>.lock`` (one run at a time per output), after checking the output can be written."""
    out = OutputDir(uri, storage_options)
    check_writable(out.fs, out.uri, out.root)
    with OutputLock(out.fs, out.root + LOCK_SUFFIX, out.uri):
        yield


@contextmanager
def staged_output(uri: str, *, overwrite: bool, inputs: dict[str, str] | None = None,
                  storage_options: dict[str, Any] | None = None) -> Iterator[OutputDir]:
    """The staging folder of a whole run at ``uri`` (hold :func:`locked` first), published when the
    block succeeds. ``inputs`` (field → path) are the run's own inputs: an output that holds one is
    refused. A staging folder left by an earlier attempt is kept: the run resumes from its steps."""
    final = OutputDir(uri, storage_options)
    check_replaceable(final.fs, final.uri, final.root, overwrite=overwrite, inputs=inputs or {})
    staging = OutputDir(final.uri + STAGING_SUFFIX, storage_options, staging=True)
    if staging.exists() and not staging.exists(OWNER_FILE):
        raise ReplaceMeError(f"output_dir: {staging.uri} exists and was not written by replaceme; move it away "
                             "(replaceme stages a run there) or choose another output_dir")
    staging.ensure_owned()
    yield staging
    publish(final.fs, staging.root, final.root)


@contextmanager
def claim_in_place(uri: str, *, storage_options: dict[str, Any] | None = None) -> Iterator[OutputDir]:
    """Hold ``uri`` for one step run in place (``replaceme calibrate``, ``python -m ops.solve`` …): lock
    it, and refuse a folder that replaceme did not write (an empty or new one becomes ours when a step
    writes into it: :meth:`OutputDir.ensure_owned`)."""
    with locked(uri, storage_options=storage_options):
        out = OutputDir(uri, storage_options)
        if out.exists() and not out.exists(OWNER_FILE) and out.fs.ls(out.root, detail=False):
            raise ReplaceMeError(f"output_dir: {out.uri} holds files that replaceme did not write (it has no "
                                 f"{OWNER_FILE} file); choose an empty or new output_dir")
        yield out


def check_writable(fs: fsspec.AbstractFileSystem, uri: str, root: str) -> None:
    """A local output's nearest existing folder must be a writable ordinary folder (not /proc, not a
    read-only mount): refuse before any work rather than fail after hours of it."""
    if not isinstance(fs, LocalFileSystem):
        return
    parent = os.path.dirname(root)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if root.startswith(("/proc/", "/sys/", "/dev/")) or parent in ("/proc", "/sys", "/dev"):
        raise ReplaceMeError(f"output_dir: {uri} is on a virtual filesystem; choose a folder on a disk")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ReplaceMeError(f"output_dir: cannot write under {parent} (read-only or no permission); "
                             "choose a writable output_dir")


def check_replaceable(fs: fsspec.AbstractFileSystem, uri: str, root: str, *, overwrite: bool,
                      inputs: dict[str, str]) -> None:
    """An existing output may be replaced only with ``overwrite``, only when replaceme wrote it (or
    it is empty), and never when it holds one of the run's inputs."""
    for field, path in inputs.items():
        if path and is_inside(path, uri):
            raise ReplaceMeError(f"output_dir: {uri} holds the run's {field} ({path}); replacing it would delete "
                                 "an input. Choose an output_dir outside the model and the data")
    if not fs.exists(root):
        return
    if not overwrite:
        raise ReplaceMeError(f"output_dir: {uri} already exists; choose another output_dir or pass --overwrite")
    if not fs.isdir(root):
        raise ReplaceMeError(f"output_dir: {uri} is a file, not a folder replaceme wrote; choose another output_dir")
    entries = fs.ls(root, detail=False)
    if entries and not fs.exists(f"{root}/{OWNER_FILE}"):
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ReplaceMeError(f"output_dir: {uri} was not written by replaceme (it has no {OWNER_FILE} file; it holds "
                             f"{shown}); --overwrite replaces only replaceme outputs. Choose another output_dir")


def discard_staging(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove a run's staging folder (e.g. after the disk filled up), if replaceme wrote it."""
    staging = OutputDir(uri.rstrip("/") + STAGING_SUFFIX, storage_options, staging=True)
    if staging.exists(OWNER_FILE):
        staging.fs.rm(staging.root, recursive=True)


# --- one run at a time ---------------------------------------------------------------------------


class OutputLock:
    """``<output>.lock``: an exclusive ``flock`` on local disks, a lease object elsewhere. Holding it
    fails at once, naming the holder, when another run holds it."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, uri: str) -> None:
        self.fs, self.path, self.uri = fs, path, uri
        self.holder = {"run": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
                       "since": _now()}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        if isinstance(self.fs, LocalFileSystem):
            self._lock_file()
        else:
            self._take_lease()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)  # closing releases the flock
            self._fd = None
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            if json.loads(self.fs.cat_file(self.path)).get("run") == self.holder["run"]:
                self.fs.rm(self.path)
        except (FileNotFoundError, ValueError):
            pass

    def _held_by(self, holder: dict[str, Any], extra: str = "") -> ReplaceMeError:
        who = f"run {holder.get('run')} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})"
        return ReplaceMeError(f"output_dir: {self.uri} is in use by {who}{extra}; wait for it to finish or choose "
                              f"another output_dir (the lock is {self.uri}{LOCK_SUFFIX})")

    def _lock_file(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json_fd(fd)
                os.close(fd)
                raise self._held_by(holder) from None
            try:  # the holder may have removed the file between our open and flock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.holder).encode())
        self._fd = fd

    def _take_lease(self) -> None:
        lease = json.dumps({**self.holder, "renewed": time.time()}).encode()
        try:
            self.fs.pipe_file(self.path, lease, mode="create")  # a conditional PUT (If-None-Match: *)
        except OSError as exc:
            if not _exists_error(exc):
                raise
            holder = self._current_holder()
            age = time.time() - float(holder.get("renewed", 0))
            if age < LEASE_SECONDS:
                raise self._held_by(holder, f", renewed {age:.0f} s ago") from None
            log.warning("output_dir: taking over the lease of %s, not renewed for %.0f s (its run died)", self.uri, age)
            self.fs.rm(self.path)
            return self._take_lease()
        self._renewer = threading.Thread(target=self._renew, name="replaceme-lease", daemon=True)
        self._renewer.start()

    def _current_holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            return {}

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 5):
            try:
                self.fs.pipe_file(self.path, json.dumps({**self.holder, "renewed": time.time()}).encode())
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; the run goes on
                log.warning("output_dir: could not renew the lease on %s (%s)", self.uri, type(exc).__name__)


def _exists_error(exc: OSError) -> bool:
    """The conditional create found the object (s3fs raises FileExistsError; other drivers say 412)."""
    return isinstance(exc, FileExistsError) or exc.errno == errno.EEXIST or "PreconditionFailed" in str(exc)


def _read_json_fd(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


# --- publishing ----------------------------------------------------------------------------------


def publish(fs: fsspec.AbstractFileSystem, staging: str, final: str) -> None:
    """Put the complete folder ``staging`` at ``final``, replacing what was there, without a moment
    where neither exists complete."""
    if isinstance(fs, LocalFileSystem):
        _publish_local(staging, final)
    else:
        _publish_objects(fs, staging, final)


def _publish_local(staging: str, final: str) -> None:
    if not os.path.exists(final):
        os.rename(staging, final)
        return
    aside = f"{final}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(final, aside)
    os.rename(staging, final)
    LocalFileSystem().rm(aside, recursive=True)


def _publish_objects(fs: fsspec.AbstractFileSystem, staging: str, final: str) -> None:
    """Object stores have no rename: copy every object once, the completion markers of the old output
    removed first and the new ones written last; then drop what the new output does not have."""
    def relative(path: str, base: str) -> str:
        return path[len(base):].lstrip("/")

    new = sorted((relative(p, staging) for p in fs.find(staging)), key=_is_completion_marker)
    old = {relative(p, final) for p in fs.find(final)} if fs.exists(final) else set()
    for name in [n for n in old if _is_completion_marker(n)]:
        fs.rm(f"{final}/{name}")
    for name in new:
        fs.copy(f"{staging}/{name}", f"{final}/{name}")
    for name in sorted(old - set(new)):
        fs.rm(f"{final}/{name}")
    fs.rm(staging, recursive=True)


def _is_completion_marker(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in COMPLETION_MARKERS


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def local_path(out: OutputDir, name: str) -> Iterator[str]:
    """The file or folder ``name`` of the output folder as a local path of the same name: the
    output's own when it is local (no copy of maps or checkpoints), else a download."""
    if isinstance(out.fs, LocalFileSystem):
        yield out.path(name)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, name)
        if out.fs.isdir(out.path(name)):  # trailing slashes: copy the folder's contents into local/
            out.fs.get(out.path(name) + "/", local + "/", recursive=True)
        else:
            out.fs.get(out.path(name), local)
        yield local
