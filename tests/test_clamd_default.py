"""Virus scanning on by default where clamd is installed, and said out loud where it is not.

``init`` writes the local clamd's socket into ``[filters] clamd`` (Debian's
/run/clamav/clamd.ctl; here the socket of the real clamd of tests/clamd.py, named by
``POSTVERN_CLAMD_SOCKET``), ``postvern demo`` does the same when that clamd answers PING, and
a server without a scanner says so in one warning line at start.
"""

from __future__ import annotations

import dataclasses
import smtplib
import socket
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from clamd import EICAR, ClamdServer
from cli_kit import listen_env, postvern, running
from dnsserver import DNSTestServer
from harness import TEST_KDF, ServerProcess, client_tls_context, free_ports, set_config
from postvern import cli, config

DOMAIN = "example.test"
ALICE = f"alice@{DOMAIN}"
PASSWORD = "alice-long-password"
NOT_SCANNED = "mail is NOT scanned for viruses"


def init(data: Path, *extra: str, socket_path: Path) -> str:
    """``postvern init`` with *socket_path* as the local clamd's place; returns its stdout."""
    r = postvern(
        "--data", str(data), "init", "--hostname", "mx.example.test", "--domain", DOMAIN, *extra,
        env={"POSTVERN_CLAMD_SOCKET": str(socket_path)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def scanner(data: Path) -> str | None:
    return config.load(data, environ={}).filters.clamd


def ready_to_serve(data: Path, dns: DNSTestServer) -> tuple[str, int]:
    """Test ports, a cheap KDF, the loopback DNS and the user alice; returns the MX address."""
    set_config(data, "kdf", TEST_KDF)
    smtp = free_ports(["smtp"])["smtp"]
    every = [f.name for f in dataclasses.fields(config.Listen)]
    set_config(data, "listen", {name: smtp if name == "smtp" else None for name in every})
    set_config(data, "dns", {"nameservers": [dns.nameserver]})
    r = postvern(
        "--data", str(data), "user", "add", ALICE, "--password-stdin",
        stdin=f"{PASSWORD}\n{PASSWORD}\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return config.parse_hostport(smtp)


def send_eicar(mx: tuple[str, int], rcpt: str) -> tuple[int, bytes]:
    msg = EmailMessage()
    msg["From"] = "someone@sender.test"
    msg["To"] = rcpt
    msg["Subject"] = "the file you asked for"
    msg.set_content("Attached.")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="e.com")
    with smtplib.SMTP(*mx, timeout=60) as s:
        s.starttls(context=client_tls_context())
        s.ehlo("mail.sender.test")
        s.mail("someone@sender.test")
        assert s.rcpt(rcpt)[0] == 250
        return s.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))


@pytest.fixture
def dns() -> Iterator[DNSTestServer]:
    with DNSTestServer() as server:
        server.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        yield server


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that exists but where nobody answers (clamd not started)."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        yield path


def test_init_finds_the_local_clamd_and_the_server_refuses_eicar(
    tmp_path: Path, clamd: ClamdServer, dns: DNSTestServer
) -> None:
    data = tmp_path / "data"
    out = init(data, socket_path=clamd.socket_path)
    assert scanner(data) == clamd.unix_address
    assert f"scanned for viruses by clamd at {clamd.unix_address}." in out
    mx = ready_to_serve(data, dns)
    with running(data, "serve") as server:
        code, text = send_eicar(mx, ALICE)
        assert code == 554 and text.startswith(b"5.7.1") and b"virus" in text, (code, text)
        assert not any(NOT_SCANNED in line for line in server.output)
        assert any(f"with clamd at {clamd.unix_address}" in line for line in server.output)


def test_without_clamd_init_and_the_server_say_mail_is_not_scanned(
    tmp_path: Path, dns: DNSTestServer
) -> None:
    data = tmp_path / "data"
    out = init(data, socket_path=tmp_path / "no-clamd.sock")
    assert scanner(data) is None
    assert "NOT be scanned for viruses" in out
    ready_to_serve(data, dns)
    with running(data, "serve") as server:
        warned = [line for line in server.output if NOT_SCANNED in line]
    assert len(warned) == 1 and " WARNING " in warned[0]


def test_init_clamd_option(tmp_path: Path, clamd: ClamdServer, silent_socket: Path) -> None:
    elsewhere = tmp_path / "elsewhere.sock"
    init(tmp_path / "a", "--clamd", str(clamd.socket_path), socket_path=elsewhere)
    assert scanner(tmp_path / "a") == clamd.unix_address
    init(tmp_path / "b", "--clamd", clamd.tcp_address, socket_path=elsewhere)
    assert scanner(tmp_path / "b") == clamd.tcp_address
    init(tmp_path / "c", "--clamd", "none", socket_path=clamd.socket_path)
    assert scanner(tmp_path / "c") is None
    # A clamd whose socket is there but that does not answer yet is still the one to use:
    # mail waits for it rather than passing unscanned.
    out = init(tmp_path / "d", socket_path=silent_socket)
    assert scanner(tmp_path / "d") == f"unix:{silent_socket}"
    assert "does not answer yet" in out
    r = postvern("--data", str(tmp_path / "e"), "init", "--hostname", "h", "--domain", DOMAIN,
                 "--clamd", "unix:")  # fmt: skip
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_server_warns_when_the_configured_clamd_does_not_answer(
    tmp_path: Path, silent_socket: Path, dns: DNSTestServer
) -> None:
    data = tmp_path / "data"
    init(data, socket_path=silent_socket)
    ready_to_serve(data, dns)
    with running(data, "serve") as server:
        warned = [line for line in server.output if "until it answers" in line]
    assert len(warned) == 1 and " WARNING " in warned[0] and "deferred" in warned[0]


def demo(
    tmp_path: Path, socket_path: Path, dns: DNSTestServer
) -> tuple[ServerProcess, dict[str, str]]:
    listen = free_ports(list(cli.HIGH_PORTS))
    env = {
        **listen_env(listen),
        "POSTVERN_CLAMD_SOCKET": str(socket_path),
        "POSTVERN_DNS__NAMESERVERS": dns.nameserver,
    }
    return running(tmp_path / "demo", "demo", env=env), listen


def test_demo_scans_with_a_running_clamd(
    tmp_path: Path, clamd: ClamdServer, dns: DNSTestServer
) -> None:
    running, listen = demo(tmp_path, clamd.socket_path, dns)
    with running:
        assert f"Virus scanning: clamd at {clamd.unix_address}." in running.output
        code, text = send_eicar(config.parse_hostport(listen["smtp"]), cli.DEMO_USER)
        assert code == 554 and b"virus" in text, (code, text)


def test_demo_does_not_use_a_clamd_that_does_not_answer(
    tmp_path: Path, silent_socket: Path, dns: DNSTestServer
) -> None:
    running, _ = demo(tmp_path, silent_socket, dns)
    with running:
        assert any(line.startswith("Virus scanning: off") for line in running.output)
        assert any(NOT_SCANNED in line for line in running.output)
    assert scanner(tmp_path / "demo") is None
