"""A real clamd for tests: Debian's /usr/sbin/clamd with a private config and a tiny DB.

No freshclam and no network: the signature directory holds one MD5 signature of the EICAR
test file (``.hdb``: MD5:size:name) and one body signature of our own (``.ndb``), so clamd
loads in well under a second. It listens on a unix socket in its temp directory and on a
free TCP port of 127.0.0.1.

Usage::

    from clamd import clamd_fixture, ClamdServer, EICAR, MARKER  # the ``clamd`` fixture

    def test_x(clamd: ClamdServer):
        settings = FilterSettings(clamd=clamd.unix_address)   # or clamd.tcp_address

or ``with ClamdServer(directory) as server: ...`` outside pytest.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CLAMD = "/usr/sbin/clamd"
# The EICAR anti-virus test file (68 bytes): every scanner must detect it, none is harmed.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Eicar-Test-Signature"
# Our own body signature: any file containing these bytes is "infected".
MARKER = b"POSTVERN-TEST-MALWARE-7f3a9c"
MARKER_SIGNATURE = "Postvern.Test.Marker"
START_TIMEOUT = 30.0


class ClamdServer:
    """clamd running in *directory* (config, database, socket, log)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.socket_path = self.directory / "clamd.sock"
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def unix_address(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_files(self) -> Path:
        database = self.directory / "db"
        database.mkdir(parents=True, exist_ok=True)
        digest = hashlib.md5(EICAR).hexdigest()
        (database / "postvern-test.hdb").write_text(f"{digest}:{len(EICAR)}:{EICAR_SIGNATURE}\n")
        (database / "postvern-test.ndb").write_text(f"{MARKER_SIGNATURE}:0:*:{MARKER.hex()}\n")
        config = self.directory / "clamd.conf"
        config.write_text(
            "\n".join(
                [
                    "Foreground yes",
                    f"LocalSocket {self.socket_path}",
                    f"TCPSocket {self.port}",
                    "TCPAddr 127.0.0.1",
                    f"DatabaseDirectory {database}",
                    f"TemporaryDirectory {self.directory}",
                    f"LogFile {self.directory / 'clamd.log'}",
                    f"PidFile {self.directory / 'clamd.pid'}",
                    "StreamMaxLength 25M",
                    "SelfCheck 3600",
                    "",
                ]
            )
        )
        return config

    def start(self) -> None:
        config = self._write_files()
        self.process = subprocess.Popen(
            [CLAMD, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise RuntimeError(f"clamd exited ({self.process.returncode}): {err[-2000:]}")
            if self.ping():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("clamd did not answer PING in time")

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(str(self.socket_path))
                sock.sendall(b"zPING\0")
                return sock.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def __enter__(self) -> ClamdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", name="clamd")
def clamd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdServer]:
    """A running clamd shared by the whole session."""
    with ClamdServer(tmp_path_factory.mktemp("clamd")) as server:
        yield server
