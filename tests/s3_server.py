"""A real S3-compatible server on loopback for tests: moto's server mode in a subprocess.

The fixtures ``s3_server`` and ``read_only_s3`` are registered once, in conftest.py: a session
fixture imported into several test modules would start one server per module. The fixture sets dummy
AWS credentials in the environment for the session only and restores the environment afterwards,
so nothing can reach a real account; ``AWS_ENDPOINT_URL`` and profiles are cleared so that tests
choose the endpoint themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from processes import free_port

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-do-not-print-0123456789"
REGION = "us-east-1"


def node_credentials() -> dict[str, str]:
    """The dummy credentials as environment variables, for services started by other fixtures (a Ray
    head's workers read credentials from their node's environment, as on a real cluster)."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}


CLEARED = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
           "AWS_SHARED_CREDENTIALS_FILE")


@dataclass
class S3Server:
    endpoint_url: str
    process: subprocess.Popen

    def client(self, service: str = "s3", **credentials):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=REGION, **credentials)

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (if absent) and return ``s3://name``."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


def start_server(extra_env: dict[str, str] | None = None, timeout: float = 30.0) -> S3Server:
    """Start ``python -m moto.server`` on 127.0.0.1 and wait until it answers."""
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return S3Server(endpoint, process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(process)
                raise RuntimeError(f"moto server did not start on {endpoint} (exit code {process.poll()})") from None
            time.sleep(0.1)


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The server, with dummy credentials in the environment for the session (the old environment
    comes back afterwards)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in CLEARED:
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        server = start_server()
        try:
            yield server
        finally:
            stop_server(server.process)


@dataclass
class ReadOnlyS3:
    """A server that enforces IAM, a bucket, and credentials allowed only to read and list it."""

    server: S3Server
    bucket: str
    key: str
    secret: str


@pytest.fixture(scope="session")
def read_only_s3(s3_server) -> Iterator[ReadOnlyS3]:  # s3_server: for the dummy environment
    """moto enforces IAM once ``INITIAL_NO_AUTH_ACTION_COUNT`` requests have been served: the first
    four (bucket, user, policy, access key) set the scene, every later request is authorised."""
    server = start_server({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        server.client().create_bucket(Bucket="locked")
        iam = server.client("iam")
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield ReadOnlyS3(server, "locked", key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        stop_server(server.process)
