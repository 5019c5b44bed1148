"""Port scans and garbage at the edge become bans (issue #19), and bans reach the kernel.

A real server without the loopback allowlist: connections from 127.0.0.1 that say nothing,
speak HTTP or TLS to a plaintext port, fail their STARTTLS handshake, or send plaintext, HTTP
or a broken ClientHello to an implicit-TLS port (993, 465) are offences; enough
of them — or offences on enough listeners — ban the address through the ordinary ban logic.
The nftables mirror runs in a network namespace the test creates (``unshare -n``), never on
the host's tables.
"""

from __future__ import annotations

import imaplib
import json
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DataDir, ServerProcess, client_tls_context, make_data_dir, set_config
from postvern.abuse.portscan import Offence, classify

HERE = Path(__file__).resolve().parent


def test_classify() -> None:
    assert classify(b"", False) is Offence.SILENT
    assert classify(b"GET / HT", False) is Offence.WRONG_PROTOCOL
    assert classify(b"\x16\x03\x01\x02\x00", False) is Offence.WRONG_PROTOCOL
    assert classify(b"EHLO x\r\n", True) is Offence.TLS_FAILED
    assert classify(b"EHLO x\r\n", False) is None
    assert classify(b"a LOGIN ", False) is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    data = make_data_dir(
        tmp_path_factory.mktemp("scan") / "data",
        passwords={},
        listeners=("smtp", "imap", "pop3", "imaps", "submissions"),
    )
    set_config(data.path, "abuse", {"allowlist": [], "scan_offences": 3, "scan_listeners": 2})
    with ServerProcess(data):
        yield data


def cli(data: DataDir, *args: str) -> str:
    argv = [sys.executable, "-m", "postvern.cli", "--data", str(data.path), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture
def unbanned(server: DataDir) -> Iterator[DataDir]:
    yield server
    cli(server, "ban", "remove", "127.0.0.1")
    wait_until(lambda: imap_greeting(server).startswith("* OK"))


def wait_until(condition, seconds: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def imap_greeting(data: DataDir) -> str:
    with socket.create_connection(data.addr("imap"), timeout=10) as s:
        greeting = s.recv(1024).decode(errors="replace")
        s.sendall(b"a LOGOUT\r\n")  # a complete exchange: no offence
    return greeting


def banned(data: DataDir) -> bool:
    return "127.0.0.1" in cli(data, "ban", "list")


def test_a_real_client_is_no_scan(unbanned: DataDir) -> None:
    for _ in range(5):
        with imaplib.IMAP4(*unbanned.addr("imap"), timeout=10) as imap:
            imap.noop()
    time.sleep(0.5)
    assert not banned(unbanned)


def test_silent_connections_on_two_listeners_ban(unbanned: DataDir) -> None:
    for name in ("smtp", "pop3"):
        with socket.create_connection(unbanned.addr(name), timeout=10):
            pass
    wait_until(lambda: banned(unbanned))
    assert "port scan" in cli(unbanned, "ban", "list")
    assert imap_greeting(unbanned).startswith("* BYE")


def test_http_to_a_mail_port_bans(unbanned: DataDir) -> None:
    for _ in range(3):
        with socket.create_connection(unbanned.addr("smtp"), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(1024)
    wait_until(lambda: banned(unbanned))


def test_failed_starttls_handshakes_ban(unbanned: DataDir) -> None:
    for _ in range(3):
        with socket.create_connection(unbanned.addr("smtp"), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO scanner.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(b"STARTTLS\r\n")
            f.readline()
            s.sendall(b"\x16\x03\x01\x00\x05garbage-not-a-hello")  # a broken ClientHello
            try:
                s.recv(1024)
            except (OSError, ssl.SSLError):
                pass
    wait_until(lambda: banned(unbanned))


def test_garbage_to_the_implicit_tls_ports_bans(unbanned: DataDir) -> None:
    """A burst of what scanners send to 993 and 465 instead of a TLS handshake: the
    listeners run the handshake themselves, so its failure is an offence like any other."""
    for name, sent in [
        ("imaps", b"a LOGIN x y\r\n"),  # plaintext IMAP
        ("submissions", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("imaps", b"\x16\x03\x01\x00\x05garbage-not-a-hello"),  # a broken ClientHello
    ]:
        with socket.create_connection(unbanned.addr(name), timeout=10) as s:
            s.sendall(sent)
            try:
                s.recv(1024)
            except OSError:
                pass
    wait_until(lambda: banned(unbanned))
    assert "port scan" in cli(unbanned, "ban", "list")


def test_tls_clients_on_the_implicit_tls_ports_are_no_scan(unbanned: DataDir) -> None:
    for _ in range(4):
        with imaplib.IMAP4_SSL(
            *unbanned.addr("imaps"), ssl_context=client_tls_context(), timeout=10
        ) as imap:
            imap.noop()
        with smtplib.SMTP_SSL(
            *unbanned.addr("submissions"), context=client_tls_context(), timeout=10
        ) as smtp:
            smtp.ehlo("client.test")
            smtp.noop()
    time.sleep(0.5)
    assert not banned(unbanned)


def test_bans_are_mirrored_into_an_nftables_set() -> None:
    """In a network namespace of its own: scanned → in the kernel set → packets dropped →
    ban lifted → out of the set → connections accepted again."""
    assert shutil.which("nft"), "nftables missing: tools/install-system-deps installs it"
    out = subprocess.run(
        ["unshare", "-n", sys.executable, str(HERE / "nft_scenario.py")],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        "in_kernel_set": True,
        "dropped": True,
        "lifted": True,
        "connects_again": True,
    }
