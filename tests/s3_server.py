"""A real S3 endpoint on loopback for tests: moto's server mode in a subprocess.

Unlike moto's in-process mock this speaks the S3 protocol over HTTP, so s3fs, Ray workers and any
other process reach it exactly as they would reach a real S3-compatible service.

    with moto_server() as endpoint_url: ...          # plain context manager
    def test_x(s3_server): s3_server.url("prefix")   # session fixture (register in conftest.py)
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from omniflow.storage import StorageConfig

REGION = "us-east-1"
# Set for the fixture's scope: fake credentials, and loopback kept away from any HTTP proxy.
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


@dataclass(frozen=True)
class S3Server:
    """A running endpoint and a bucket made for this session."""

    endpoint_url: str
    bucket: str

    @property
    def storage(self) -> StorageConfig:
        return StorageConfig(endpoint_url=self.endpoint_url, region=REGION)

    def url(self, *parts: str) -> str:
        """`s3://<bucket>/<parts...>`."""
        return "/".join([f"s3://{self.bucket}", *parts])

    def new_bucket(self) -> str:
        return create_bucket(self.endpoint_url)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # any HTTP reply means the server is up
    except OSError:
        return False
    return True


@contextmanager
def moto_server(*, timeout_s: float = 30.0) -> Iterator[str]:
    """Start `moto_server -H 127.0.0.1 -p <free port>`, yield its URL once it answers, stop it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:  # a pipe nobody reads would fill up and stall the server
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while not _answers(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(
                        f"moto_server did not start on {url}:\n{log.read().decode()[-2000:]}"
                    )
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def create_bucket(endpoint_url: str) -> str:
    """A new, empty bucket with a unique name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint_url, region_name=REGION).create_bucket(Bucket=name)
    return name


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on loopback for the session, with test credentials in the environment
    (processes started meanwhile, such as a Ray cluster's workers, inherit them) and a bucket."""
    with environ(TEST_ENV), moto_server() as endpoint_url:
        yield S3Server(endpoint_url, create_bucket(endpoint_url))
