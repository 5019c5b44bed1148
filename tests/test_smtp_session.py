"""The asyncio SMTP session on 127.0.0.1, driven by smtplib, raw sockets and swaks."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import smtplib
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postvern.config import Limits
from postvern.smtp import replies
from postvern.smtp.address import Address
from postvern.smtp.commands import MailParams, RcptParams
from postvern.smtp.replies import Reply
from postvern.smtp.session import (
    BaseHandler,
    InsecureTLSContextError,
    SessionState,
    SMTPServer,
    TLSInfo,
    serve_smtp,
)

# Every wait on the network is bounded so a broken server fails a test instead of hanging it.
NETWORK_WAIT = 20.0

MESSAGE = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: <u1@example.test>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b"\xc3\xa9 eight bit\r\n"
)


# --- Certificates ---------------------------------------------------------------------------


@dataclass
class TLSFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        return context


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A self-signed certificate for localhost and 127.0.0.1."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TLSFiles(directory / "cert.pem", directory / "key.pem")
    files.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


# --- A handler that records what it is given ------------------------------------------------


@dataclass
class Delivery:
    sender: Address | None
    recipients: list[str]
    message: bytes
    helo: str | None
    tls: TLSInfo | None
    user: str | None
    peer_ip: str
    protocol: str


@dataclass
class Recorder:
    deliveries: list[Delivery] = field(default_factory=list)
    mail_commands: int = 0
    auth_attempts: list[tuple[str, str, str]] = field(default_factory=list)
    disconnects: int = 0
    greeting: Reply | None = None  # what on_connect answers
    rcpt_gate: asyncio.Event | None = None  # set: RCPT answers only once it is set
    rcpt_waiting: asyncio.Event = field(default_factory=asyncio.Event)


class RecordingHandler(BaseHandler):
    """Accepts mail for example.test, and alice/secret; raises for boom@example.test."""

    auth_mechanisms = ("PLAIN", "LOGIN")

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def on_connect(self, state: SessionState) -> Reply | None:
        return self.recorder.greeting

    async def on_mail(
        self, state: SessionState, sender: Address | None, params: MailParams
    ) -> Reply:
        self.recorder.mail_commands += 1
        return replies.sender_ok()

    async def on_rcpt(self, state: SessionState, recipient: Address, params: RcptParams) -> Reply:
        if self.recorder.rcpt_gate is not None:
            self.recorder.rcpt_waiting.set()
            await self.recorder.rcpt_gate.wait()
        if recipient.local_part == "boom":
            raise RuntimeError("handler bug")
        if recipient.domain_lower != "example.test":
            return Reply(550, "5.1.1", "No such user here")
        return replies.recipient_ok()

    async def on_message(self, state: SessionState, message: bytes) -> Reply:
        self.recorder.deliveries.append(
            Delivery(
                sender=state.sender,
                recipients=[str(r) for r in state.recipients],
                message=message,
                helo=state.helo,
                tls=state.tls,
                user=state.user,
                peer_ip=state.peer_ip,
                protocol=state.received_protocol,
            )
        )
        return replies.message_accepted(state.session_id)

    async def on_auth(
        self, state: SessionState, mechanism: str, authzid: str, authcid: str, password: str
    ) -> Reply:
        self.recorder.auth_attempts.append((mechanism, authzid, authcid))
        if authcid == "alice" and password == "secret" and authzid in ("", "alice"):
            return replies.auth_succeeded()
        return replies.auth_failed()

    async def on_disconnect(self, state: SessionState) -> None:
        self.recorder.disconnects += 1


Starter = Callable[..., Awaitable[tuple[SMTPServer, Recorder]]]


@pytest.fixture
async def start_server() -> AsyncIterator[Starter]:
    servers: list[SMTPServer] = []

    async def start(**options: Any) -> tuple[SMTPServer, Recorder]:
        recorder = Recorder()
        options.setdefault("limits", Limits(auth_failure_delay=0))
        server = await serve_smtp(
            "127.0.0.1",
            0,
            lambda: RecordingHandler(recorder),
            hostname="mx.test",
            **options,
        )
        servers.append(server)
        return server, recorder

    yield start
    for server in servers:
        await server.shutdown(grace=2)


class RawClient:
    """Bytes on a plain TCP connection, replies read line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> list[str]:
        """One complete (possibly multi-line) reply."""
        lines: list[str] = []
        async with asyncio.timeout(NETWORK_WAIT):
            while True:
                line = (await self.reader.readline()).decode("ascii")
                assert line.endswith("\r\n"), f"connection ended mid-reply: {[*lines, line]}"
                lines.append(line[:-2])
                if line[3] == " ":
                    return lines

    async def code(self) -> str:
        """The code and enhanced code of the next reply ("250 2.1.0")."""
        return " ".join((await self.reply())[-1].split(" ")[:2])

    async def at_eof(self) -> bool:
        """Whether the server closed the connection (the client then closes its side)."""
        async with asyncio.timeout(NETWORK_WAIT):
            rest = await self.reader.read()
        await self.close()
        return rest == b""

    async def start_tls(self, context: ssl.SSLContext) -> None:
        async with asyncio.timeout(NETWORK_WAIT):
            await self.writer.start_tls(context, server_hostname="localhost")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def greeted_client(port: int) -> RawClient:
    client = await RawClient.connect(port)
    assert await client.code() == "220 mx.test"
    await client.send(b"EHLO client.test\r\n")
    await client.reply()
    return client


# --- Delivering with real clients -----------------------------------------------------------


async def test_smtplib_delivers_a_message(start_server: Starter) -> None:
    server, recorder = await start_server()

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test") as smtp:
            smtp.ehlo()
            assert smtp.has_extn("pipelining") and smtp.has_extn("8bitmime")
            assert smtp.has_extn("enhancedstatuscodes") and smtp.has_extn("smtputf8")
            assert not smtp.has_extn("starttls") and not smtp.has_extn("auth")
            return smtp.sendmail(
                "sender@example.org",
                ["u1@example.test", "u2@EXAMPLE.test", "nobody@elsewhere.test"],
                MESSAGE,
                mail_options=["BODY=8BITMIME"],
            )

    refused = await asyncio.to_thread(send)
    assert refused == {"nobody@elsewhere.test": (550, b"5.1.1 No such user here")}
    (delivery,) = recorder.deliveries
    assert delivery.message == MESSAGE
    assert str(delivery.sender) == "sender@example.org"
    assert delivery.recipients == ["u1@example.test", "u2@EXAMPLE.test"]
    assert delivery.helo == "client.test"
    assert delivery.peer_ip == "127.0.0.1"
    assert delivery.tls is None and delivery.user is None
    assert delivery.protocol == "ESMTP"
    assert recorder.disconnects == 1


async def test_pipelined_commands_over_the_wire(start_server: Starter) -> None:
    server, recorder = await start_server()
    client = await greeted_client(server.port)
    await client.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u1@example.test>\r\n"
        b"RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<u2@example.test>\r\nDATA\r\n"
    )
    codes = [await client.code() for _ in range(5)]
    assert codes == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5", "354 End"]
    await client.send(b"Subject: x\r\n\r\nhi\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert [await client.code() for _ in range(3)] == ["250 2.0.0", "250 2.0.0", "221 2.0.0"]
    assert await client.at_eof()
    assert recorder.deliveries[0].recipients == ["u1@example.test", "u2@example.test"]
    assert recorder.deliveries[0].message == b"Subject: x\r\n\r\nhi\r\n"


async def test_bdat_over_the_wire(start_server: Starter) -> None:
    server, recorder = await start_server()
    client = await greeted_client(server.port)
    await client.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u1@example.test>\r\n"
        b"BDAT 9\r\nline\r\n.\r\nBDAT 5 LAST\r\n\x00\xff\r\n."
    )
    codes = [await client.code() for _ in range(4)]
    assert codes == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"]
    assert recorder.deliveries[0].message == b"line\r\n.\r\n\x00\xff\r\n."
    await client.close()


async def test_text_sent_while_a_refused_data_waits_closes(start_server: Starter) -> None:
    # The text arrives while the session waits on the handler, so the core has not seen it
    # when it refuses DATA; the session finds it in what it received (RFC 2920 §3.1).
    server, recorder = await start_server()
    recorder.rcpt_gate = asyncio.Event()
    client = await greeted_client(server.port)
    await client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\n")
    await asyncio.wait_for(recorder.rcpt_waiting.wait(), NETWORK_WAIT)
    await client.send(b"RCPT TO:<u1@example.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    await asyncio.sleep(0.1)  # let the server's channel take the bytes in (not a timing test)
    recorder.rcpt_gate.set()
    assert [await client.code() for _ in range(3)] == ["250 2.1.0", "550 5.1.1", "421 4.5.0"]
    assert await client.at_eof()
    assert recorder.deliveries == []


# --- SMTP smuggling -------------------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<u9@example.test>\r\nDATA\r\nSubject: wire money\r\n"
)


@pytest.mark.parametrize(
    "fake",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r.\r", b"\r\n.\r", b"\n\n.\n\n"],
    ids=repr,
)
async def test_smuggling_is_refused_and_never_ends_data(start_server: Starter, fake: bytes) -> None:
    server, recorder = await start_server()
    client = await greeted_client(server.port)
    await client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u1@example.test>\r\nDATA\r\n")
    assert [await client.code() for _ in range(3)] == ["250 2.1.0", "250 2.1.5", "354 End"]
    await client.send(b"Subject: innocent\r\n\r\nhello" + fake + SMUGGLED + b"\r\n.\r\nNOOP\r\n")
    assert await client.code() == "550 5.5.2"
    assert await client.code() == "250 2.0.0"
    assert recorder.deliveries == []
    assert recorder.mail_commands == 1  # the smuggled MAIL was message text, never a command
    await client.close()


# --- STARTTLS -------------------------------------------------------------------------------


async def test_starttls_injection_is_discarded(start_server: Starter, tls_files: TLSFiles) -> None:
    server, _ = await start_server(ssl_context=tls_files.server_context())
    client = await greeted_client(server.port)
    # CVE-2011-0411: the RSET rides in the same packet as STARTTLS.
    await client.send(b"STARTTLS\r\nRSET\r\n")
    assert await client.code() == "220 2.0.0"
    await client.start_tls(tls_files.client_context())
    await client.send(b"EHLO client.test\r\n")
    ehlo = await client.reply()
    # Had the RSET been kept, its "250 2.0.0 OK" would come first, under TLS.
    assert ehlo[0] == "250-mx.test Hello client.test"
    assert "250-STARTTLS" not in ehlo and "250 STARTTLS" not in ehlo
    assert any(line[4:] == "AUTH PLAIN LOGIN" for line in ehlo)
    await client.send(b"NOOP\r\n")
    assert await client.code() == "250 2.0.0"
    await client.close()


async def test_starttls_forgets_the_plaintext_session(
    start_server: Starter, tls_files: TLSFiles
) -> None:
    server, _ = await start_server(ssl_context=tls_files.server_context())
    client = await greeted_client(server.port)
    await client.send(b"STARTTLS\r\n")
    assert await client.code() == "220 2.0.0"
    await client.start_tls(tls_files.client_context())
    await client.send(b"MAIL FROM:<a@example.org>\r\n")
    assert await client.code() == "503 5.5.1"  # RFC 3207 §4.2: EHLO again first
    await client.close()


async def test_plaintext_after_the_220_is_never_a_command(
    start_server: Starter, tls_files: TLSFiles
) -> None:
    server, recorder = await start_server(ssl_context=tls_files.server_context())
    client = await greeted_client(server.port)
    await client.send(b"STARTTLS\r\n")
    assert await client.code() == "220 2.0.0"
    # Sent after the 220, so it reaches the TLS layer: the handshake fails, nothing runs.
    await client.send(b"MAIL FROM:<a@example.org>\r\n")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await client.start_tls(tls_files.client_context())
        await client.send(b"NOOP\r\n")
        await client.reply()
    await client.close()
    assert recorder.mail_commands == 0
    # The listener is unharmed.
    other = await greeted_client(server.port)
    await other.send(b"QUIT\r\n")
    assert await other.code() == "221 2.0.0"
    assert await other.at_eof()


async def test_a_stalled_starttls_handshake_ends_the_session(
    start_server: Starter, tls_files: TLSFiles
) -> None:
    server, recorder = await start_server(
        ssl_context=tls_files.server_context(), tls_handshake_timeout=0.3
    )
    client = await greeted_client(server.port)
    await client.send(b"STARTTLS\r\n")
    assert await client.code() == "220 2.0.0"
    assert await client.at_eof()  # no ClientHello ever came
    await wait_for_sessions(server, 0)
    assert recorder.disconnects == 1


async def test_a_stalled_implicit_tls_handshake_is_closed_before_any_session(
    start_server: Starter, tls_files: TLSFiles
) -> None:
    server, recorder = await start_server(
        ssl_context=tls_files.server_context(), implicit_tls=True, tls_handshake_timeout=0.3
    )
    client = await RawClient.connect(server.port)
    assert await client.at_eof()
    assert recorder.disconnects == 0 and server.active_sessions == 0


async def test_refused_session_waits_for_quit(start_server: Starter) -> None:
    server, recorder = await start_server()
    recorder.greeting = replies.session_refused("mx.test")
    client = await RawClient.connect(server.port)
    assert await client.code() == "554 5.3.2"
    await client.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nQUIT\r\n")
    assert [await client.code() for _ in range(3)] == ["503 5.5.1", "503 5.5.1", "221 2.0.0"]
    assert await client.at_eof()


async def test_auth_is_refused_before_tls_and_works_after(
    start_server: Starter, tls_files: TLSFiles
) -> None:
    server, recorder = await start_server(ssl_context=tls_files.server_context())
    client = await greeted_client(server.port)
    await client.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n")
    assert await client.code() == "538 5.7.11"
    assert recorder.auth_attempts == []
    await client.close()

    def submit() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test") as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("auth")
            with pytest.raises(smtplib.SMTPNotSupportedError):
                smtp.login("alice", "secret")
            smtp.starttls(context=tls_files.client_context())
            smtp.ehlo()
            assert smtp.has_extn("auth")
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                smtp.login("alice", "wrong")
            assert refused.value.smtp_code == 535
            smtp.login("alice", "secret")
            smtp.sendmail("alice@example.test", ["u1@example.test"], MESSAGE)

    await asyncio.to_thread(submit)
    (delivery,) = recorder.deliveries
    assert delivery.user == "alice"
    assert delivery.tls is not None and delivery.tls.version in ("TLSv1.2", "TLSv1.3")
    assert delivery.tls.cipher and delivery.tls.bits
    # smtplib tries each offered mechanism with the wrong password before giving up.
    assert recorder.auth_attempts == [
        ("PLAIN", "", "alice"),
        ("LOGIN", "", "alice"),
        ("PLAIN", "", "alice"),
    ]


async def test_auth_exchange_with_login_and_cancel(
    start_server: Starter, tls_files: TLSFiles
) -> None:
    server, recorder = await start_server(ssl_context=tls_files.server_context(), implicit_tls=True)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=tls_files.client_context(), server_hostname="localhost"
    )
    client = RawClient(reader, writer)
    assert await client.code() == "220 mx.test"
    await client.send(b"EHLO client.test\r\nAUTH LOGIN\r\n")
    await client.reply()
    assert await client.reply() == ["334 VXNlcm5hbWU6"]
    await client.send(b"*\r\n")
    assert await client.code() == "501 5.7.0"
    await client.send(b"AUTH LOGIN " + base64.b64encode(b"alice") + b"\r\n")
    assert await client.reply() == ["334 UGFzc3dvcmQ6"]
    await client.send(b"not base64\r\n")
    assert await client.code() == "501 5.5.2"
    await client.send(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0secret") + b"\r\n")
    assert await client.code() == "535 5.7.8"  # alice may not act as bob
    await client.send(b"AUTH PLAIN\r\n")
    assert await client.reply() == ["334 "]
    await client.send(base64.b64encode(b"\0alice\0secret") + b"\r\n")
    assert await client.code() == "235 2.7.0"
    await client.close()
    assert recorder.auth_attempts == [("PLAIN", "bob", "alice"), ("PLAIN", "", "alice")]


async def test_implicit_tls_with_smtplib(start_server: Starter, tls_files: TLSFiles) -> None:
    server, recorder = await start_server(ssl_context=tls_files.server_context(), implicit_tls=True)

    def submit() -> None:
        context = tls_files.client_context()
        with smtplib.SMTP_SSL("localhost", server.port, context=context) as smtp:
            smtp.ehlo("client.test")
            assert not smtp.has_extn("starttls")
            smtp.login("alice", "secret")
            smtp.sendmail("alice@example.test", ["u1@example.test"], MESSAGE)

    await asyncio.to_thread(submit)
    (delivery,) = recorder.deliveries
    assert delivery.user == "alice" and delivery.tls is not None


def test_insecure_tls_context_is_refused(tls_files: TLSFiles) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the point is that it is old
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(InsecureTLSContextError):
        asyncio.run(serve_smtp("127.0.0.1", 0, BaseHandler, ssl_context=context))


async def test_swaks_starttls_auth_and_pipelining(
    start_server: Starter, tls_files: TLSFiles
) -> None:
    server, recorder = await start_server(ssl_context=tls_files.server_context())
    command = [
        "/usr/bin/swaks",
        "--server", "127.0.0.1",
        "--port", str(server.port),
        "--ehlo", "swaks.test",
        "--from", "alice@example.test",
        "--to", "u1@example.test,u2@example.test",
        "--tls",
        "--auth", "PLAIN",
        "--auth-user", "alice",
        "--auth-password", "secret",
        "--pipeline",
        "--header", "Subject: from swaks",
        "--body", "line one\n.dot line\n",
        "--timeout", "20",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(60):
        transcript, _ = await process.communicate()
    text = transcript.decode(errors="replace")
    assert process.returncode == 0, text
    assert "<-  220 2.0.0 Ready to start TLS" in text
    assert "<~  235 2.7.0 Authentication successful" in text
    # --pipeline: MAIL, RCPT, RCPT and DATA went out before the first of their replies.
    assert " ~> DATA\n<~  250 2.1.0" in text
    (delivery,) = recorder.deliveries
    assert delivery.user == "alice" and delivery.helo == "swaks.test"
    assert delivery.tls is not None and delivery.protocol == "ESMTPSA"
    assert delivery.recipients == ["u1@example.test", "u2@example.test"]
    assert b"Subject: from swaks\r\n" in delivery.message
    # swaks stuffed the leading dot; the server took it off again.
    assert b"\r\n\r\nline one\r\n.dot line\r\n" in delivery.message


async def test_swaks_plaintext_auth_is_refused(start_server: Starter, tls_files: TLSFiles) -> None:
    server, recorder = await start_server(ssl_context=tls_files.server_context())
    process = await asyncio.create_subprocess_exec(
        "/usr/bin/swaks",
        "--server", "127.0.0.1", "--port", str(server.port),
        "--from", "alice@example.test", "--to", "u1@example.test",
        "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "secret",
        "--timeout", "20",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(60):
        transcript, _ = await process.communicate()
    assert process.returncode != 0
    assert b"Host did not advertise authentication" in transcript
    assert recorder.deliveries == [] and recorder.auth_attempts == []


# --- Limits ---------------------------------------------------------------------------------


async def test_declared_size_over_the_limit(start_server: Starter) -> None:
    server, recorder = await start_server(limits=Limits(message_size=1000))

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", server.port) as smtp:
            smtp.ehlo()
            assert smtp.esmtp_features["size"] == "1000"
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                smtp.sendmail("a@example.org", ["u1@example.test"], b"x" * 2000)
            assert refused.value.smtp_code == 552
            assert refused.value.smtp_error.startswith(b"5.3.4")

    await asyncio.to_thread(send)
    assert recorder.deliveries == []


async def test_streamed_message_over_the_limit_then_the_session_goes_on(
    start_server: Starter,
) -> None:
    server, recorder = await start_server(limits=Limits(message_size=100_000))
    client = await greeted_client(server.port)
    await client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u1@example.test>\r\nDATA\r\n")
    assert [await client.code() for _ in range(3)] == ["250 2.1.0", "250 2.1.5", "354 End"]
    line = b"y" * 998 + b"\r\n"
    for _ in range(50):
        await client.send(line * 100)  # 5 MB in all
    await client.send(b".\r\nNOOP\r\n")
    assert await client.code() == "552 5.3.4"
    assert await client.code() == "250 2.0.0"
    assert recorder.deliveries == []
    await client.close()


async def test_recipient_limit(start_server: Starter) -> None:
    server, _ = await start_server(limits=Limits(recipients=3))
    client = await greeted_client(server.port)
    await client.send(
        b"MAIL FROM:<a@example.org>\r\n"
        + b"".join(f"RCPT TO:<u{i}@example.test>\r\n".encode() for i in range(4))
    )
    codes = [await client.code() for _ in range(5)]
    assert codes == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5", "452 4.5.3"]
    await client.close()


async def test_error_limit_closes_the_connection(start_server: Starter) -> None:
    server, _ = await start_server(limits=Limits(smtp_errors=3))
    client = await greeted_client(server.port)
    await client.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert [await client.code() for _ in range(3)] == ["500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert await client.at_eof()


async def test_long_command_line(start_server: Starter) -> None:
    server, _ = await start_server(limits=Limits(smtp_line=512))
    client = await greeted_client(server.port)
    await client.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert [await client.code() for _ in range(2)] == ["500 5.5.2", "250 2.0.0"]
    await client.close()


async def test_idle_timeout(start_server: Starter) -> None:
    server, _ = await start_server(limits=Limits(smtp_idle_timeout=0.3))
    client = await RawClient.connect(server.port)
    assert await client.code() == "220 mx.test"
    assert await client.code() == "421 4.4.2"
    assert await client.at_eof()


async def test_session_time_limit(start_server: Starter) -> None:
    server, _ = await start_server(limits=Limits(smtp_idle_timeout=30, smtp_session_timeout=0.5))
    client = await RawClient.connect(server.port)
    assert await client.code() == "220 mx.test"
    reply = ""
    for _ in range(400):
        await client.send(b"NOOP\r\n")
        reply = await client.code()
        if reply != "250 2.0.0":
            break
        await asyncio.sleep(0.05)
    assert reply == "421 4.4.2"
    assert await client.at_eof()


async def test_session_time_limit_while_streaming(start_server: Starter) -> None:
    server, _ = await start_server(
        limits=Limits(smtp_idle_timeout=30, smtp_session_timeout=1.0, message_size=10_000)
    )
    client = await greeted_client(server.port)
    await client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u1@example.test>\r\nDATA\r\n")
    assert [await client.code() for _ in range(3)] == ["250 2.1.0", "250 2.1.5", "354 End"]
    chunk = (b"w" * 998 + b"\r\n") * 64
    with pytest.raises(ConnectionError):
        for _ in range(20_000):  # 1.3 GB: never ends in time on its own; the server ends it
            await client.send(chunk)
    await client.close()


async def wait_for_sessions(server: SMTPServer, count: int) -> None:
    """Poll until the server has noticed closed connections (it keeps no event for it)."""
    for _ in range(int(NETWORK_WAIT / 0.01)):
        if server.active_sessions == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.active_sessions} sessions, expected {count}")


async def test_connections_per_ip(start_server: Starter) -> None:
    server, _ = await start_server(limits=Limits(connections_per_ip=2))
    first = await greeted_client(server.port)
    second = await greeted_client(server.port)
    third = await RawClient.connect(server.port)
    assert await third.code() == "421 4.7.0"
    assert await third.at_eof()
    await first.send(b"QUIT\r\n")
    assert await first.code() == "221 2.0.0"
    await wait_for_sessions(server, 1)
    fourth = await greeted_client(server.port)
    for client in (first, second, fourth):
        await client.close()


async def test_total_connections(start_server: Starter) -> None:
    server, _ = await start_server(limits=Limits(connections=1))
    first = await greeted_client(server.port)
    second = await RawClient.connect(server.port)
    assert await second.code() == "421 4.7.0"
    assert await second.at_eof()
    await first.close()


async def test_commands_before_a_half_close_are_answered(start_server: Starter) -> None:
    server, _ = await start_server()
    client = await greeted_client(server.port)
    await client.send(b"NOOP\r\nRSET\r\n")
    client.writer.write_eof()
    assert [await client.code() for _ in range(2)] == ["250 2.0.0", "250 2.0.0"]
    assert await client.at_eof()


async def test_handler_failure_is_a_temporary_error(start_server: Starter) -> None:
    server, _ = await start_server()
    client = await greeted_client(server.port)
    await client.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<boom@example.test>\r\nRCPT TO:<u1@example.test>\r\n"
    )
    assert [await client.code() for _ in range(3)] == ["250 2.1.0", "451 4.3.0", "250 2.1.5"]
    await client.close()


async def test_shutdown_says_goodbye(start_server: Starter) -> None:
    server, recorder = await start_server()
    client = await greeted_client(server.port)
    await server.shutdown(grace=5)
    assert await client.code() == "421 4.3.2"
    assert await client.at_eof()
    assert recorder.disconnects == 1


# --- Memory: a 200 MB line and a 200 MB message, measured in a server process ---------------

SERVER_PROCESS = r"""
import asyncio, sys
from postvern.config import Limits
from postvern.smtp import replies
from postvern.smtp.session import BaseHandler, serve_smtp

class Sink(BaseHandler):
    async def on_rcpt(self, state, recipient, params):
        return replies.recipient_ok()
    async def on_message(self, state, message):
        return replies.message_accepted()

async def main():
    limits = Limits(message_size=int(sys.argv[1]))
    server = await serve_smtp("127.0.0.1", 0, Sink, limits=limits)
    print(server.port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def read_reply(sock: socket.socket) -> str:
    """The last line of the next reply, read from a blocking socket."""
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] != b" ":
        chunk = sock.recv(65536)
        assert chunk, "server closed the connection"
        data += chunk
    return data.decode("ascii").split("\r\n")[-2]


MiB = 1024 * 1024


@pytest.fixture
def server_process() -> Iterator[tuple[int, int]]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_PROCESS, str(MiB)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        port = int(process.stdout.readline())
        yield process.pid, port
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def stream_and_measure(
    pid: int, port: int, opening: bytes, payload: bytes, closing: bytes
) -> tuple[str, int, int]:
    """Send ``opening``, then 200 MB of ``payload``, then ``closing``; return the reply and
    how far RSS and peak RSS rose above their values once the session had started."""
    with socket.create_connection(("127.0.0.1", port), timeout=NETWORK_WAIT * 3) as sock:
        read_reply(sock)
        for line in opening.split(b"\r\n")[:-1]:
            sock.sendall(line + b"\r\n")
            read_reply(sock)
        before = memory_of(pid)
        for _ in range(200 * MiB // len(payload)):
            sock.sendall(payload)
        sock.sendall(closing)
        reply = read_reply(sock)
        after = memory_of(pid)
        sock.sendall(b"QUIT\r\n")
    return reply, after["VmRSS"] - before["VmRSS"], after["VmHWM"] - before["VmHWM"]


def test_200_mb_line_does_not_grow_the_server(server_process: tuple[int, int]) -> None:
    pid, port = server_process
    reply, growth, peak_growth = stream_and_measure(
        pid, port, b"EHLO client.test\r\n", b"A" * MiB, b"\r\n"
    )
    assert reply.startswith("500 5.5.2")
    assert growth < 8 * MiB
    assert peak_growth < 8 * MiB


def test_200_mb_message_over_a_1_mb_limit_does_not_grow_the_server(
    server_process: tuple[int, int],
) -> None:
    pid, port = server_process
    opening = (
        b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    )
    line = b"z" * 998 + b"\r\n"
    reply, growth, peak_growth = stream_and_measure(
        pid, port, opening, line * (MiB // len(line)), b".\r\n"
    )
    assert reply.startswith("552 5.3.4")
    # The first megabyte is kept until the limit is passed; nothing after it.
    assert growth < 8 * MiB
    assert peak_growth < 8 * MiB
