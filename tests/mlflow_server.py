"""A real MLflow tracking server on loopback: SQLite backend store, artifacts on the S3 test server.

``mlflow server`` proxies artifacts (``--artifacts-destination``), so clients need no S3
credentials; the server itself gets the test server's endpoint and dummy credentials. Registered
once, in conftest.py, like the other session fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from processes import free_port, stop_process_group
from s3_server import node_credentials

ARTIFACT_BUCKET = "mlflow-artifacts"


@dataclass
class MlflowServer:
    tracking_uri: str
    artifact_bucket: str
    process: subprocess.Popen


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory) -> Iterator[MlflowServer]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    s3_server.create_bucket(ARTIFACT_BUCKET)
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
               "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/runs", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    env = {**os.environ, **node_credentials(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url}
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", ARTIFACT_BUCKET, process)
    try:
        _wait_until_healthy(server, folder / "server.log")
        yield server
    finally:
        stop_process_group(process, wait_s=15)


def _wait_until_healthy(server: MlflowServer, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{server.tracking_uri}/health", timeout=2).close()
            return
        except OSError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)
