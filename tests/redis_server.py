"""A real redis-server on 127.0.0.1 for tests: random high port, temporary directory, no disk.

Usage::

    from redis_server import RedisTestServer      # or the ``redis_server`` / ``redis_url``
                                                  # fixtures (import them into the module)
    with RedisTestServer(tmp_path) as server:
        settings.abuse.redis_url = server.url     # "redis://127.0.0.1:PORT/0"

``redis_server`` (module scope) starts one server per test module; ``redis_url`` (function
scope) empties it before each test and gives its URL. ``stop()`` ends the process (tests of
an unreachable Redis stop it on purpose); ``start()`` brings it back on the same port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# redis-server is ready in well under a second here; this bounds a broken install.
START_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
# A port picked free can be taken by someone else before redis binds it; try again.
START_ATTEMPTS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisTestServer:
    """One redis-server process; see the module docstring."""

    def __init__(self, directory: Path | None = None) -> None:
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="redis-")) if directory is None else directory
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisTestServer:
        for _ in range(START_ATTEMPTS):
            # A restart keeps its port, so clients configured with the URL find it again.
            self.port = self.port or _free_port()
            if self._launch():
                return self
            self.port = 0
        raise RuntimeError("redis-server did not start")

    def _launch(self) -> bool:
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                # Nothing on disk: no RDB snapshots, no append-only file.
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if _ping(self.port):
                return True
            time.sleep(POLL_INTERVAL)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(16).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL failed")

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisTestServer]:
    """One redis-server for the whole test module."""
    with RedisTestServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisTestServer) -> str:
    """The module's Redis, running and emptied for this test."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url
