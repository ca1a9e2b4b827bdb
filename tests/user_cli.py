"""The command line as a user meets it in a failure: its exit code, its one-line message, and proof
that nothing the user owns was changed (every file hashed before and after)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USER_ERROR, TRACKING_FAILED, STORAGE_ERROR, INTERRUPTED = 2, 3, 4, 130


def replaceme_cli(*args: str, cwd: Path | str = ROOT, env: dict[str, str] | None = None,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m replaceme ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "replaceme", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The command failed with ``code`` and said so in one ``error:`` line holding every fragment,
    with no traceback; returns that line."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def snapshot(*paths: Path | str) -> dict[str, str]:
    """SHA-256 of every file under ``paths`` (files or folders), keyed by path."""
    digests = {}
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            digests[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests
