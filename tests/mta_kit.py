"""Test parts for the outbound MTA tests (this module holds no tests itself).

* :class:`TestCA` — a certificate authority made with ``cryptography``; it issues server
  certificates for MX and MTA-STS host names, and its PEM file is ``settings.tls.ca_bundle``.
* :class:`Sink` — a real receiving SMTP server (``serve_smtp``) on one loopback address
  (127.0.0.x) and the shared MTA port, recording every accepted message, whether TLS was in
  use, and every MAIL it was offered; its replies can be scripted.
* :class:`PolicyServer` — an HTTPS server on loopback serving an MTA-STS policy file and
  counting the requests.
* :class:`MTAEnv` (fixture ``mta_env``) — ties them to a loopback DNS server, settings, a
  queue and an ``OutboundMTA`` that collects its bounces.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email
import email.message
import email.policy
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dnsserver import DNSTestServer
from postvern.config import Settings
from postvern.crypto import tls
from postvern.mta import AttemptReport, OutboundMTA, Queue
from postvern.smtp import replies
from postvern.smtp.address import Address
from postvern.smtp.commands import MailParams, RcptParams
from postvern.smtp.replies import Reply
from postvern.smtp.session import BaseHandler, SessionState, SMTPServer, serve_smtp

OUR_HOSTNAME = "out.sender.test"
SENDER = "alice@sender.test"
QUEUE_KEY = bytes(range(32))
WAIT_LIMIT = 15.0  # how long a test waits for something that should happen (not asserted)


# --- Certificates ---------------------------------------------------------------------------


class TestCA:
    """A throw-away CA; ``issue(names)`` returns (cert path, key path) for a server."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Postvern Test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "test-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names: str, self_signed: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if self_signed else self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        cert = builder.sign(key if self_signed else self.key, hashes.SHA256())
        stem = self.directory / f"{names[0]}{'-self' if self_signed else ''}-{random.random()}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    def context(self, *names: str, self_signed: bool = False) -> ssl.SSLContext:
        return tls.server_context(*self.issue(*names, self_signed=self_signed))


# --- Receiving SMTP servers -----------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    recipients: list[str]
    message: bytes
    tls: bool
    mail_params: MailParams
    rcpt_params: list[RcptParams]


@dataclass
class Sink:
    """One receiving MX. ``rcpt_reply``/``data_reply`` script its answers (None: accept)."""

    address: str
    port: int
    context: ssl.SSLContext | None
    dsn: bool = False
    hostname: str | None = None  # what it calls itself in the greeting and EHLO
    rcpt_reply: Callable[[str], Reply | None] = lambda address: None
    data_reply: Callable[[int], Reply | None] = lambda count: None
    hold: asyncio.Event | None = None  # messages wait for it, then get 451 (never accepted)
    hold_after: int = 0  # ... once this many messages have been accepted
    received: list[Received] = field(default_factory=list)
    mails_offered: int = 0  # MAIL commands seen (a delivery was attempted)
    plaintext_mails: int = 0  # MAIL commands seen without TLS
    connections: int = 0
    data_attempts: int = 0
    holding: int = 0
    server: SMTPServer | None = None

    async def start(self) -> Sink:
        self.server = await serve_smtp(
            self.address,
            self.port,
            lambda: _SinkHandler(self),
            hostname=self.hostname or f"sink-{self.address}",
            ssl_context=self.context,
            dsn=self.dsn,
        )
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown(grace=1.0)
            self.server = None

    @property
    def recipients(self) -> list[str]:
        return [r for m in self.received for r in m.recipients]


class _SinkHandler(BaseHandler):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def on_connect(self, state: SessionState) -> Reply | None:
        self.sink.connections += 1
        return None

    async def on_mail(
        self, state: SessionState, sender: Address | None, params: MailParams
    ) -> Reply:
        self.sink.mails_offered += 1
        if state.tls is None:
            self.sink.plaintext_mails += 1
        return replies.sender_ok()

    async def on_rcpt(self, state: SessionState, recipient: Address, params: RcptParams) -> Reply:
        reply = self.sink.rcpt_reply(str(recipient))
        return reply or replies.recipient_ok()

    async def on_message(self, state: SessionState, message: bytes) -> Reply:
        sink = self.sink
        sink.data_attempts += 1
        if sink.hold is not None and len(sink.received) >= sink.hold_after:
            sink.holding += 1
            await sink.hold.wait()
            return Reply(451, "4.3.0", "Released without accepting")
        reply = sink.data_reply(sink.data_attempts)
        if reply is not None:
            return reply
        txn = state.transaction
        assert txn is not None
        sink.received.append(
            Received(
                mail_from=str(txn.sender) if txn.sender else "",
                recipients=[str(r.address) for r in txn.recipients],
                message=message,
                tls=state.tls is not None,
                mail_params=txn.params,
                rcpt_params=[r.params for r in txn.recipients],
            )
        )
        return replies.message_accepted("SINK")


# --- MTA-STS policy server ------------------------------------------------------------------


class PolicyServer:
    """HTTPS on 127.0.0.1: answers every GET with ``status``/``content_type``/``body``."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.status = 200
        self.content_type = "text/plain"
        self.body = b""
        self.requests: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    def set_policy(self, mode: str, mx: list[str], max_age: int = 86400) -> None:
        lines = ["version: STSv1", f"mode: {mode}", *[f"mx: {m}" for m in mx]]
        lines.append(f"max_age: {max_age}")
        self.body = ("\r\n".join(lines) + "\r\n").encode()

    async def start(self) -> PolicyServer:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=5
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            host = next((h[5:].strip() for h in lines if h.lower().startswith("host:")), "")
            self.requests.append(f"{lines[0]} {host}")
            response = (
                f"HTTP/1.1 {self.status} X\r\nContent-Type: {self.content_type}\r\n"
                f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n"
            ).encode() + self.body
            writer.write(response)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


# --- The environment ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MTAEnv:
    """DNS, CA, sinks, settings, queue and MTA for one test."""

    def __init__(self, directory: Path, dns: DNSTestServer) -> None:
        self.directory = directory
        self.dns = dns
        self.ca = TestCA(directory)
        self.port = free_port()
        self.settings = Settings(data_dir=directory, hostname=OUR_HOSTNAME)
        self.settings.mta.port = self.port
        self.settings.mta.retry_base = 0.05
        self.settings.mta.connect_timeout = 2.0
        self.settings.tls.ca_bundle = str(self.ca.path)
        self.resolver = dns.resolver(timeout=1.0)
        self.sinks: list[Sink] = []
        self.policy_servers: list[PolicyServer] = []
        self.bounces: list[tuple[bytes, str]] = []
        self.reports: list[AttemptReport] = []
        self.queue: Queue | None = None
        self.mta: OutboundMTA | None = None

    # DNS

    def domain(self, domain: str, mx: list[tuple[int, str, str | None]]) -> None:
        """Publish MX records; each (preference, host, address or None for no A record)."""
        for preference, host, address in mx:
            self.dns.add(domain, "MX", (preference, host))
            if address is not None:
                self.dns.add(host, "A", address)

    # Servers

    async def sink(self, address: str, *names: str, tls_mode: str = "valid", **kw: Any) -> Sink:
        """A receiving server on ``address``; ``tls_mode`` valid | self-signed | wrong-name |
        none (no STARTTLS offered)."""
        context = None
        if tls_mode == "valid":
            context = self.ca.context(*names)
        elif tls_mode == "self-signed":
            context = self.ca.context(*names, self_signed=True)
        elif tls_mode == "wrong-name":
            context = self.ca.context("not-the-mx.example")
        sink = await Sink(address, self.port, context, **kw).start()
        self.sinks.append(sink)
        return sink

    async def policy(
        self, domain: str, mode: str, mx: list[str], *, policy_id: str = "1"
    ) -> PolicyServer:
        server = await PolicyServer(self.ca.context(f"mta-sts.{domain}")).start()
        server.set_policy(mode, mx)
        self.policy_servers.append(server)
        self.dns.set(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id};")
        self.dns.set(f"mta-sts.{domain}", "A", "127.0.0.1")
        return server

    # Queue and MTA

    async def drained(self) -> None:
        """The queue is empty and the MTA idle (every report and bounce made)."""
        assert self.queue is not None
        await queue_empty(self.queue, self.mta)

    async def open_queue(self) -> Queue:
        self.queue = await Queue.open(self.directory / "queue.sqlite", QUEUE_KEY)
        return self.queue

    async def start_mta(self, *, policy_port: int | None = None, **kw: Any) -> OutboundMTA:
        queue = self.queue or await self.open_queue()

        async def bounce(message: bytes, address: str) -> None:
            self.bounces.append((message, address))

        port = (
            policy_port
            if policy_port is not None
            else (self.policy_servers[0].port if self.policy_servers else 443)
        )
        self.mta = OutboundMTA(
            self.settings,
            queue,
            self.resolver,
            bounce=bounce,
            policy_port=port,
            on_report=self.reports.append,
            **{"allow_loopback_mx": True, **kw},
        )
        await self.mta.start()
        return self.mta

    async def close(self) -> None:
        if self.mta is not None:
            await self.mta.stop(grace=2.0)
        if self.queue is not None:
            await self.queue.close()
        for sink in self.sinks:
            await sink.stop()
        for server in self.policy_servers:
            await server.stop()


async def wait_until(predicate: Callable[[], bool], limit: float = WAIT_LIMIT) -> None:
    """Poll until ``predicate()`` holds; fail the test if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def queue_empty(
    queue: Queue, mta: OutboundMTA | None = None, limit: float = WAIT_LIMIT
) -> None:
    """Wait until nothing is queued and (with ``mta``) nothing is in progress, so reports
    and bounces of the last attempt have been made."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while await queue.pending_count() or (mta is not None and mta.in_flight):
        if loop.time() > deadline:
            raise AssertionError("queue did not drain in time")
        await asyncio.sleep(0.02)


def make_message(subject: str = "Hello", body: str = "Body text.", sender: str = SENDER) -> bytes:
    return (
        f"From: {sender}\r\nTo: someone@remote.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{random.random()}@sender.test>\r\n\r\n{body}\r\n"
    ).encode()


def parse_dsn(message: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    """The DSN as the email package reads it, and its per-recipient status blocks."""
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    assert parsed.get_content_type() == "multipart/report"
    return parsed, status_blocks(parsed)[1:]  # [0] holds the per-message fields


def status_blocks(report: email.message.Message) -> list[email.message.Message]:
    """Every field block of the message/delivery-status part: per-message, per-recipient."""
    status = [p for p in report.walk() if p.get_content_type().endswith("delivery-status")]
    assert len(status) == 1
    blocks = status[0].get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, email.message.Message)]


@pytest.fixture
async def mta_env(tmp_path: Path) -> AsyncIterator[MTAEnv]:
    """A fresh environment with its own loopback DNS server; everything stopped after."""
    with DNSTestServer() as dns:
        env = MTAEnv(tmp_path, dns)
        try:
            yield env
        finally:
            await env.close()
