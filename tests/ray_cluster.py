"""A real Ray head on loopback, started the way users start one, for the tests that need a cluster.

    def test_x(ray_head): ...  # session fixture (registered in conftest.py): the head's addresses

The head declares more logical CPUs than the machine has, so pipelines of several 1-CPU stage
actors fit on a 2-core CI runner (Ray schedules by logical resources).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from processes import free_port, stop_process_group
from s3_server import node_credentials

HEAD_CPUS = 6


@dataclass(frozen=True)
class RayHead:
    address: str  # GCS address, for ray.init / engine.address
    dashboard: str  # http://127.0.0.1:PORT, for `ray job submit --address`


def use_ray_token_auth() -> None:
    """Token authentication on, as on a real cluster: the head, the test process and every `ray job
    submit` read the same random token from the environment. Called by conftest before anything
    imports Ray (Ray reads the token once per process); the token is never printed."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """``ray start --head --block`` in its own process group: stopping it stops exactly this
    cluster (``ray stop`` would stop every Ray cluster on the machine)."""
    pytest.importorskip("ray", reason="pip install 'replaceme[ray]'")
    port, dashboard_port = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    # Token auth: see use_ray_token_auth. The nodes hold the (dummy) S3 credentials, as cluster nodes do.
    env = {**os.environ, **node_credentials(), "RAY_USAGE_STATS_ENABLED": "0"}
    start = [ray_cli(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--num-cpus", str(HEAD_CPUS),
             "--num-gpus", "0", "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    with open(temp_dir / "head.log", "w") as log:  # the child writes to its own copy of the descriptor
        process = subprocess.Popen(start, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = RayHead(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard_port}")
    try:
        _wait_until_up(head, process, temp_dir / "head.log")
        yield head
    finally:
        _disconnect()
        stop_process_group(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until_up(head: RayHead, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Until the dashboard's job API answers (the GCS is up by then, and `ray job submit` works)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        request = urllib.request.Request(f"{head.dashboard}/api/version",
                                         headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the Ray head did not come up in {timeout_s} s:\n{log.read_text()[-3000:]}")


def _disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
