"""The IMAP server on loopback, driven by Python's imaplib and a raw socket client: every
command and extension, as IMAP4rev1 and as IMAP4rev2 (ENABLE), with the real store behind."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import re
import socket
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import pytest

from harness import DataDir, Services, client_tls_context, make_data_dir, services
from postvern.config import Limits
from postvern.crypto.tls import server_context
from postvern.imap.server import BUSY, start_imap_server
from postvern.imap.session import ImapSession, SessionCounter
from postvern.net import Channel, ChannelServer, ConnectionCaps, serve_channels
from postvern.store.spool import SpoolItem

ALICE = "alice@example.test"
BOB = "bob@example.test"
HOST = "127.0.0.1"
T = TypeVar("T")


def message(
    subject: str, body: str = "Hello there.", extra: str = "", sender: str = "carol"
) -> bytes:
    return (
        f"From: {sender.title()} <{sender}@example.test>\r\nTo: Alice <alice@example.test>\r\n"
        f"Subject: {subject}\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.test>\r\n{extra}\r\n{body}\r\n"
    ).encode()


MULTIPART = (
    b"From: Dave <dave@example.test>\r\nTo: alice@example.test\r\nSubject: parts\r\n"
    b"Date: Tue, 2 Jan 2024 11:00:00 +0100\r\nMessage-ID: <parts@example.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
    b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9 au lait\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
    b"\r\nAAECAwQ=\r\n--XX--\r\n"
)


@dataclass
class Env:
    data: DataDir
    svc: Services
    port: int  # STARTTLS
    tls_port: int  # imaps
    limits: Limits
    ssl_context: ssl.SSLContext
    servers: list[ChannelServer] = field(default_factory=list)

    def password(self, address: str) -> str:
        return self.data.passwords[address]

    async def deliver(self, address: str, raw: bytes, special_use: str | None = None) -> None:
        user = self.svc.app.directory.user(address)
        assert user is not None
        await self.svc.registry.deliver(user, SpoolItem(raw, special_use=special_use))

    def client(self, address: str | None = ALICE, *, implicit: bool = False) -> imaplib.IMAP4:
        """A logged-in imaplib client (STARTTLS, or imaps with ``implicit``)."""
        if implicit:
            client: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                HOST, self.tls_port, ssl_context=client_tls_context(), timeout=30
            )
        else:
            client = imaplib.IMAP4(HOST, self.port, timeout=30)
            client.starttls(client_tls_context())
        if address is not None:
            client.login(address, self.password(address))
        return client

    def wire(self, address: str | None = ALICE) -> Wire:
        wire = Wire(self.tls_port)
        if address is not None:
            wire.ok(f'LOGIN {address} "{self.password(address)}"')
        return wire

    async def released(self, address: str) -> None:
        user = self.svc.app.directory.user(address)
        assert user is not None
        # The registry offers no "released" event; polling its public state is enough here.
        while self.svc.registry.is_unlocked(user.id):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def start(env: Env, limits: Limits) -> None:
    for port, implicit in ((env.port, False), (env.tls_port, True)):
        server = await start_imap_server(
            HOST,
            port,
            login=env.svc.login,
            registry=env.svc.registry,
            ssl_context=env.ssl_context,
            implicit_tls=implicit,
            limits=limits,
            hostname="mx.example.test",
        )
        env.servers.append(server)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path):
        yield e


async def make_env(tmp_path: Path, limits: Limits | None = None) -> AsyncIterator[Env]:
    data = make_data_dir(tmp_path / "data", listeners=("imap", "imaps"))
    svc = services(data)
    settings = svc.app.settings
    ctx = server_context(settings.path(settings.tls.cert), settings.path(settings.tls.key))
    limits = limits or settings.limits
    e = Env(data, svc, data.addr("imap")[1], data.addr("imaps")[1], limits, ctx)
    await start(e, limits)
    try:
        yield e
    finally:
        for server in e.servers:
            await server.shutdown()
        await asyncio.wait_for(asyncio.gather(e.released(ALICE), e.released(BOB)), 30)
        await svc.close()


async def in_thread(fn: Callable[[], T]) -> T:
    """imaplib and raw sockets block: run them off the loop that serves them."""
    return await asyncio.to_thread(fn)


class Wire:
    """A raw IMAP client over implicit TLS: exact bytes out, every response line back."""

    def __init__(self, port: int, *, tls: bool = True) -> None:
        sock = socket.create_connection((HOST, port), timeout=30)
        self.sock: socket.socket = (
            client_tls_context().wrap_socket(sock, server_hostname=HOST) if tls else sock
        )
        self.file = self.sock.makefile("rb")
        self.counter = 0
        self.greeting = self.line()

    def line(self) -> bytes:
        """One response line; literals are read and kept inline."""
        out = self.file.readline()
        while (m := re.search(rb"~?\{(\d+)\}\r\n$", out)) is not None:
            out += self.file.read(int(m.group(1)))
            out += self.file.readline()
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: str | bytes) -> tuple[list[bytes], bytes]:
        """Send a tagged command; return (untagged lines, the tagged completion)."""
        self.counter += 1
        tag = f"W{self.counter}".encode()
        raw = text.encode() if isinstance(text, str) else text
        self.send(tag + b" " + raw + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> tuple[list[bytes], bytes]:
        lines = []
        while True:
            line = self.line()
            if not line:
                raise ConnectionError("server closed the connection")
            if line.startswith(tag + b" "):
                return lines, line
            lines.append(line)

    def ok(self, text: str | bytes) -> list[bytes]:
        lines, done = self.command(text)
        assert re.match(rb"W\d+ OK", done), (text, lines, done)
        return lines

    def close(self) -> None:
        self.file.close()  # the socket's descriptor stays open while its file is open
        self.sock.close()


def run_in(env: Env, fn: Callable[[], T]) -> asyncio.Future[T]:
    return asyncio.ensure_future(in_thread(fn))


def ok(result: tuple[str, list[object]]) -> list[object]:
    typ, data = result
    assert typ == "OK", data
    return data


def untagged(client: imaplib.IMAP4, name: str) -> list[object]:
    return client.untagged_responses.pop(name, [])


# -- logging in ------------------------------------------------------------------------------


async def test_starttls_login_and_capabilities(env: Env) -> None:
    def session() -> dict[str, object]:
        client = imaplib.IMAP4(HOST, env.port, timeout=30)
        before = client.capabilities
        refused = None
        try:
            client.login(ALICE, env.password(ALICE))
        except imaplib.IMAP4.error as e:
            refused = str(e)
        client.starttls(client_tls_context())
        after_tls = client.capabilities
        client.login(ALICE, env.password(ALICE))
        caps = ok(client.capability())[0]
        client.logout()
        return {"before": before, "refused": refused, "tls": after_tls, "caps": caps}

    out = await in_thread(session)
    assert "LOGINDISABLED" in out["before"] and "STARTTLS" in out["before"]
    assert "PRIVACYREQUIRED" in str(out["refused"])
    assert "AUTH=PLAIN" in out["tls"] and "STARTTLS" not in out["tls"]
    caps = out["caps"].split()
    for cap in (
        b"IMAP4rev2",
        b"CONDSTORE",
        b"QRESYNC",
        b"MOVE",
        b"SPECIAL-USE",
        b"THREAD=REFERENCES",
    ):
        assert cap in caps
    assert b"QUOTA=RES-MESSAGE" not in caps
    assert any(c.startswith(b"APPENDLIMIT=") for c in caps)


def read_line(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """One line, read a byte at a time so nothing behind it (a TLS handshake) is consumed."""
    data = b""
    while not data.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        data += byte
    return data


async def test_starttls_command_injection_is_discarded(env: Env) -> None:
    def session() -> tuple[bytes, bytes]:
        raw = socket.create_connection((HOST, env.port), timeout=30)
        read_line(raw)
        # CVE-2011-0411: the CAPABILITY rides in the same packet as STARTTLS.
        raw.sendall(b"S1 STARTTLS\r\nS2 CAPABILITY\r\n")
        began = read_line(raw)
        tls = client_tls_context().wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"S3 NOOP\r\n")
        after = read_line(tls)
        tls.close()
        return began, after

    began, after = await in_thread(session)
    assert began.startswith(b"S1 OK")
    # Had the CAPABILITY run inside TLS, its untagged response would come first.
    assert after.startswith(b"S3 OK")


async def test_wrong_password_and_authenticate_plain(env: Env) -> None:
    def session() -> tuple[str, str, list[bytes]]:
        client = env.client(None, implicit=True)
        try:
            client.login(ALICE, "wrong password")
        except imaplib.IMAP4.error as e:
            failed = str(e)
        plain = f"\0{ALICE}\0{env.password(ALICE)}".encode()
        typ, _ = client.authenticate("PLAIN", lambda _: plain)
        client.logout()
        wire = env.wire(None)
        ir = base64.b64encode(f"{BOB}\0{ALICE}\0{env.password(ALICE)}".encode()).decode()
        _, as_other = wire.command(f"AUTHENTICATE PLAIN {ir}")
        wire.close()
        return failed, typ, [as_other]

    failed, typ, (as_other,) = await in_thread(session)
    assert "AUTHENTICATIONFAILED" in failed
    assert typ == "OK"
    assert b"NO [AUTHORIZATIONFAILED]" in as_other


async def test_sessions_per_user_limit(tmp_path: Path) -> None:
    async for env in make_env(tmp_path, replace(Limits(), imap_sessions_per_user=2)):

        def session() -> tuple[bytes, bytes]:
            first, second = env.wire(), env.wire()
            third = env.wire(None)
            _, refused = third.command(f'LOGIN {ALICE} "{env.password(ALICE)}"')
            first.close()
            time.sleep(0.2)
            _, accepted = third.command(f'LOGIN {ALICE} "{env.password(ALICE)}"')
            for w in (second, third):
                w.close()
            return refused, accepted

        refused, accepted = await in_thread(session)
        assert b"NO [LIMIT]" in refused
        assert b"OK" in accepted


async def test_idle_timeout_logs_out(tmp_path: Path) -> None:
    async for env in make_env(tmp_path, replace(Limits(), imap_idle_timeout=0.5)):

        def session() -> list[bytes]:
            wire = env.wire()
            wire.ok("SELECT INBOX")
            wire.send(b"I1 IDLE\r\n")
            lines = [wire.line()]
            lines.append(wire.line())
            lines.append(wire.line())
            wire.close()
            return lines

        lines = await in_thread(session)
        assert lines[0].startswith(b"+ ")
        assert lines[1].startswith(b"* BYE")
        assert lines[2] == b""


# -- folders -------------------------------------------------------------------------------


async def test_list_create_rename_delete_subscribe(env: Env) -> None:
    def session() -> dict[str, list[object]]:
        client = env.client()
        out: dict[str, list[object]] = {}
        out["root"] = ok(client.list('""', '""'))
        ok(client.create("Work/Projects/2024"))
        ok(client._simple_command("CREATE", '"Receipts" (USE (\\All))'))
        out["create_again"] = list(client.create("Work"))
        out["reserved"] = list(client.create("#shared/x"))
        out["all"] = ok(client.list())
        out["percent"] = ok(client.list('""', "%"))
        out["work_children"] = ok(client.list("Work/", "%"))
        out["inbox_case"] = ok(client.list('""', "inbox"))
        ok(client.rename("Work/Projects", "Work/Archive2"))
        out["renamed"] = ok(client.list("Work", "*"))
        out["delete_parent"] = list(client.delete("Work"))
        ok(client.unsubscribe("Drafts"))
        out["lsub"] = ok(client.lsub('""', "*"))
        ok(client.subscribe("Drafts"))
        out["extended"] = ok(
            client._simple_command(
                "LIST", '(SUBSCRIBED RECURSIVEMATCH) "" "Work"', "RETURN", "(CHILDREN)"
            )
        ) and untagged(client, "LIST")
        out["special"] = ok(client._simple_command("LIST", '(SPECIAL-USE) "" "*"')) and untagged(
            client, "LIST"
        )
        out["status_list"] = ok(
            client._simple_command("LIST", '"" "INBOX" RETURN (STATUS (MESSAGES UIDNEXT SIZE))')
        ) and [*untagged(client, "LIST"), *untagged(client, "STATUS")]
        out["delete_inbox"] = list(client.delete("INBOX"))
        out["delete_missing"] = list(client.delete("Nope"))
        ok(client.delete("Work/Archive2/2024"))
        out["after_delete"] = ok(client.list("Work", "*"))
        client.logout()
        return out

    out = await in_thread(session)
    assert out["root"] == [b'(\\Noselect) "/" ""']
    assert out["create_again"][0] == "NO" and b"ALREADYEXISTS" in out["create_again"][1][0]
    assert out["reserved"][0] == "NO"
    names = [line.rsplit(b" ", 1)[1] for line in out["all"]]
    assert names == sorted(names, key=lambda n: n)  # stable order
    assert b'(\\HasChildren) "/" "Work"' in out["all"]
    assert b'(\\HasNoChildren \\Sent) "/" "Sent"' in out["all"]
    assert b'(\\HasNoChildren \\All) "/" "Receipts"' in out["all"]
    assert all(b"Work/" not in line for line in out["percent"])
    assert out["work_children"] == [b'(\\HasChildren) "/" "Work/Projects"']
    assert out["inbox_case"] == [b'(\\HasNoChildren) "/" "INBOX"']
    assert b'(\\HasChildren) "/" "Work/Archive2"' in out["renamed"]
    assert b'(\\HasNoChildren) "/" "Work/Archive2/2024"' in out["renamed"]
    assert out["delete_parent"][0] == "NO" and b"HASCHILDREN" in out["delete_parent"][1][0]
    assert all(b"Drafts" not in line for line in out["lsub"])
    assert any(b"\\Subscribed" in line and b"Work" in line for line in out["extended"])
    assert sorted(line.split(b'"/" ')[1] for line in out["special"]) == [
        b'"Archive"',
        b'"Drafts"',
        b'"Junk"',
        b'"Receipts"',
        b'"Sent"',
        b'"Trash"',
    ]
    assert out["status_list"][1] == b'"INBOX" (MESSAGES 0 UIDNEXT 1 SIZE 0)'
    assert out["delete_inbox"][0] == "NO" and out["delete_missing"][0] == "NO"
    assert b"NONEXISTENT" in out["delete_missing"][1][0]
    assert out["after_delete"] == [b'(\\HasNoChildren) "/" "Work/Archive2"']


async def test_status_append_and_quota(env: Env) -> None:
    def session() -> dict[str, object]:
        client = env.client()
        out: dict[str, object] = {}
        when = imaplib.Time2Internaldate(time.mktime((2023, 3, 4, 5, 6, 7, 0, 0, -1)))
        typ, data = client.append("INBOX", "(\\Flagged $Work)", when, message("one"))
        out["append"] = (typ, data)
        out["trycreate"] = list(client.append("Missing", None, None, message("x")))
        out["status"] = ok(
            client.status(
                "INBOX",
                "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE HIGHESTMODSEQ RECENT"
                " APPENDLIMIT)",
            )
        )
        out["quotaroot"] = ok(client.getquotaroot("INBOX"))
        out["quota"] = ok(client.getquota('""'))
        client.select("INBOX")
        out["fetch"] = ok(client.fetch("1", "(FLAGS INTERNALDATE RFC822.SIZE)"))
        client.logout()
        return out

    out = await in_thread(session)
    typ, data = out["append"]
    assert typ == "OK" and re.match(rb"\[APPENDUID \d+ 1\]", data[0])
    assert out["trycreate"][0] == "NO" and b"TRYCREATE" in out["trycreate"][1][0]
    status = out["status"][0]
    size = len(message("one"))
    assert re.search(rb"MESSAGES 1 UIDNEXT 2 UIDVALIDITY \d+ UNSEEN 1 DELETED 0", status)
    assert f"SIZE {size} ".encode() in status and b"RECENT 1" in status  # nobody saw it yet
    assert b"APPENDLIMIT 52428800" in status
    assert out["quotaroot"] == [[b'"INBOX" ""'], [b'"" ()']]  # no limit: no resource
    assert out["quota"] == [b'"" ()']
    fetched = out["fetch"][0]
    assert b"\\Flagged" in fetched and b"$Work" in fetched
    assert b'INTERNALDATE "04-Mar-2023 05:06:07' in fetched
    assert f"RFC822.SIZE {size}".encode() in fetched


async def test_quota_and_over_quota_append(env: Env) -> None:
    user = env.svc.app.directory.user(ALICE)
    assert user is not None
    env.svc.app.directory.set_quota(user.id, 4096)  # read at login, as an operator's change
    big = message("big", "x" * 5000)

    def session() -> dict[str, object]:
        client = env.client()
        out: dict[str, object] = {"small": client.append("INBOX", None, None, message("small"))}
        out["big"] = client.append("INBOX", None, None, big)
        out["quota"] = ok(client.getquotaroot("Sent"))
        out["bad_root"] = client.getquota("other")
        client.logout()
        return out

    out = await in_thread(session)
    assert out["small"][0] == "OK"
    assert out["big"][0] == "NO" and b"[OVERQUOTA]" in out["big"][1][0]
    roots, quotas = out["quota"]
    assert roots == [b'"Sent" ""']
    used = -(-len(message("small")) // 1024)
    assert quotas == [f'"" (STORAGE {used} 4)'.encode()]
    assert out["bad_root"][0] == "NO"


# -- selecting and fetching ------------------------------------------------------------------


async def fill(env: Env, address: str = ALICE) -> list[bytes]:
    messages = [
        message("first report", "The quarterly budget meeting is on Monday."),
        message("Re: first report", "Thanks, see you at the meeting.", sender="bob"),
        MULTIPART,
        message("[list] Fwd: holiday plans", "Beach or mountains?", sender="erin"),
    ]
    for raw in messages:
        await env.deliver(address, raw)
    return messages


async def test_select_examine_rev1_and_rev2(env: Env) -> None:
    await fill(env)

    def session() -> tuple[list[bytes], bytes, list[bytes], bytes, list[bytes]]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        wire.ok("STORE 1 +FLAGS (\\Seen)")
        rev1, done1 = wire.command("SELECT INBOX")
        examine, _ = wire.command("EXAMINE INBOX")
        wire.close()
        wire = env.wire()
        wire.ok("ENABLE IMAP4rev2")
        rev2, done2 = wire.command("SELECT INBOX")
        wire.close()
        return rev1, done1, rev2, done2, examine

    rev1, done1, rev2, done2, examine = await in_thread(session)
    text1 = b"".join(rev1)
    assert b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)" in text1
    assert b"[PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)]" in text1
    assert b"* 4 EXISTS" in text1 and b"* 0 RECENT" in text1
    assert b"[UNSEEN 2]" in text1 and b"[UIDNEXT 5]" in text1
    assert re.search(rb"\[UIDVALIDITY \d+\]", text1) and b"[HIGHESTMODSEQ " in text1
    assert b"OK [READ-WRITE]" in done1
    text2 = b"".join(rev2)
    assert b"RECENT" not in text2 and b"UNSEEN" not in text2
    assert b'* LIST () "/" "INBOX"' in text2
    assert b"OK [READ-WRITE]" in done2
    assert b"[CLOSED]" in b"".join(examine)
    assert b"[PERMANENTFLAGS ()]" in b"".join(examine)


async def test_fetch_items_and_seen(env: Env) -> None:
    messages = await fill(env)

    def session() -> dict[str, object]:
        client = env.client()
        client.select("INBOX")
        out: dict[str, object] = {}
        out["all"] = ok(client.fetch("1:*", "(UID FLAGS RFC822.SIZE ENVELOPE)"))
        out["peek"] = ok(client.fetch("1", "(BODY.PEEK[])"))
        out["flags_after_peek"] = ok(client.fetch("1", "FLAGS"))
        out["body"] = ok(client.fetch("1", "(BODY[TEXT])"))
        out["flags_after_body"] = ok(client.fetch("1", "FLAGS"))
        out["rfc822"] = ok(client.fetch("2", "(RFC822.HEADER RFC822)"))
        out["partial"] = ok(client.fetch("1", "(BODY.PEEK[]<0.40>)"))
        out["fields"] = ok(client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (Subject From)])"))
        out["fields_not"] = ok(client.fetch("1", "(BODY.PEEK[HEADER.FIELDS.NOT (Subject)])"))
        out["structure"] = ok(client.fetch("3", "(BODYSTRUCTURE BODY)"))
        out["parts"] = ok(client.fetch("3", "(BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[9])"))
        out["binary"] = ok(client.fetch("3", "(BINARY.PEEK[1] BINARY.PEEK[2] BINARY.SIZE[2])"))
        out["uid"] = ok(client.uid("FETCH", "2:*", "(FLAGS)"))
        try:
            client.fetch("9", "FLAGS")
        except imaplib.IMAP4.error as e:
            out["bad_number"] = str(e)
        client.logout()
        return out

    out = await in_thread(session)
    lines = [x for x in out["all"] if isinstance(x, bytes)]
    assert len(lines) == 4
    assert (
        b'ENVELOPE ("Mon, 1 Jan 2024 10:00:00 +0000" "first report" '
        b'(("Carol" NIL "carol" "example.test"))' in lines[0]
    )
    assert out["peek"][0][1] == messages[0]
    assert b"\\Seen" not in out["flags_after_peek"][0]
    assert b"\\Seen" in out["body"][-1] or b"\\Seen" in out["body"][0][0]
    assert b"\\Seen" in out["flags_after_body"][0]
    header, whole = out["rfc822"][0][1], out["rfc822"][1][1]
    assert messages[1].startswith(header) and whole == messages[1]
    assert out["partial"][0][1] == messages[0][:40]
    fields = out["fields"][0][1]
    assert fields.startswith(b"From: ") and b"Subject: first report" in fields
    assert b"Subject" not in out["fields_not"][0][1] and b"Message-ID" in out["fields_not"][0][1]
    structure = out["structure"][0]
    assert (
        b'("TEXT" "PLAIN" ("CHARSET" "UTF-8") NIL NIL "QUOTED-PRINTABLE" 17 0' in structure.upper()
    )
    assert b'"MIXED" ("BOUNDARY" "XX")' in structure.upper()
    parts = b"".join(p if isinstance(p, bytes) else b"".join(p) for p in out["parts"])
    assert b"caf=C3=A9 au lait" in parts and b"BODY[9] NIL" in parts
    binary = b"".join(p if isinstance(p, bytes) else b"".join(p) for p in out["binary"])
    assert "café au lait".encode() in binary
    assert (
        b"~{5}\x00\x01\x02\x03\x04" in binary
    )  # literal8: it holds NUL and b"BINARY.SIZE[2] 5" in binary
    assert len([x for x in out["uid"] if isinstance(x, bytes)]) == 3
    assert "BAD" in out["bad_number"] and "out of range" in out["bad_number"]


async def test_store_copy_move_expunge(env: Env) -> None:
    await fill(env)

    def session() -> dict[str, object]:
        wire = env.wire()
        out: dict[str, object] = {}
        wire.ok("SELECT INBOX")
        out["store"] = wire.command("STORE 1:2 +FLAGS (\\Flagged $Important)")
        out["silent"] = wire.command("STORE 1 -FLAGS.SILENT (\\Flagged)")
        out["replace"] = wire.command("UID STORE 3 FLAGS (\\Deleted)")
        out["copy"] = wire.command("COPY 1:2 Archive")
        out["copy_missing"] = wire.command("COPY 1 Nowhere")
        out["move"] = wire.command("UID MOVE 4 Trash")
        out["expunge"] = wire.command("EXPUNGE")
        out["status"] = wire.command("STATUS Archive (MESSAGES)")
        out["uid_expunge"] = wire.command("UID EXPUNGE 1:*")
        wire.ok("SELECT Archive")
        out["archive"] = wire.command("FETCH 1:* (UID FLAGS)")
        out["close"] = wire.command("CLOSE")
        out["after_close"] = wire.command("FETCH 1 FLAGS")
        wire.close()
        return out

    out = await in_thread(session)
    lines, _ = out["store"]
    assert b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Important)" in lines[0]
    assert (
        b"[PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Important \\*)]"
        in lines[1]
    )
    assert lines[2:] == [
        b"* 1 FETCH (FLAGS ($Important \\Flagged \\Recent))\r\n",
        b"* 2 FETCH (FLAGS ($Important \\Flagged \\Recent))\r\n",
    ]
    assert out["silent"][0] == []
    assert out["replace"][0] == [b"* 3 FETCH (FLAGS (\\Deleted \\Recent) UID 3)\r\n"]
    assert re.search(rb"OK \[COPYUID \d+ 1:2 1:2\]", out["copy"][1])
    assert b"NO [TRYCREATE]" in out["copy_missing"][1]
    move_lines, move_done = out["move"]
    assert re.match(rb"\* OK \[COPYUID \d+ 4 1\]", move_lines[0])
    assert move_lines[1] == b"* 4 EXPUNGE\r\n" and b"OK" in move_done
    assert out["expunge"][0] == [b"* 3 EXPUNGE\r\n"]
    assert out["status"][0] == [b'* STATUS "Archive" (MESSAGES 2)\r\n']
    assert out["uid_expunge"][0] == []
    assert out["archive"][0] == [
        b"* 1 FETCH (UID 1 FLAGS ($Important \\Recent))\r\n",
        b"* 2 FETCH (UID 2 FLAGS ($Important \\Flagged \\Recent))\r\n",
    ]
    assert b"OK" in out["close"][1] and b"BAD" in out["after_close"][1]


async def test_condstore_unchangedsince_conflict(env: Env) -> None:
    await fill(env)

    def session() -> dict[str, object]:
        first, second = env.wire(), env.wire()
        out: dict[str, object] = {}
        select = first.ok("SELECT INBOX (CONDSTORE)")
        modseq = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(select)).group(1))
        second.ok("SELECT INBOX")
        second.ok("STORE 2 +FLAGS (\\Answered)")
        out["conflict"] = first.command(f"STORE 1:3 (UNCHANGEDSINCE {modseq}) +FLAGS (\\Seen)")
        out["changed"] = first.command(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq})")
        out["search"] = first.command(f"SEARCH MODSEQ {modseq + 1}")
        out["uid_conflict"] = first.command("UID STORE 2 (UNCHANGEDSINCE 1) +FLAGS (\\Draft)")
        first.close()
        second.close()
        return out

    out = await in_thread(session)
    lines, done = out["conflict"]
    assert b"OK [MODIFIED 2]" in done
    # The first SELECT made the delivered messages its own recent ones (RFC 3501 §2.3.2).
    assert any(line.startswith(b"* 1 FETCH (FLAGS (\\Seen \\Recent) MODSEQ (") for line in lines)
    assert not any(line.startswith(b"* 2 FETCH (FLAGS (\\Answered \\Seen)") for line in lines)
    changed = out["changed"][0]
    assert {line.split(b" ")[1] for line in changed if b"FETCH" in line} == {b"1", b"2", b"3"}
    assert re.match(rb"\* SEARCH 1 2 3 \(MODSEQ \d+\)", out["search"][0][0])
    assert b"OK [MODIFIED 2]" in out["uid_conflict"][1]


async def test_search_keys_esearch_and_searchres(env: Env) -> None:
    await fill(env)

    def session() -> dict[str, object]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        wire.ok("STORE 1 +FLAGS (\\Seen \\Flagged)")
        queries = {
            "all": "SEARCH ALL",
            "unseen": "SEARCH UNSEEN",
            "flagged_or": "SEARCH OR FLAGGED FROM erin",
            "not": "SEARCH NOT SEEN NOT FROM bob",
            "subject": "SEARCH SUBJECT report",
            "header": 'SEARCH HEADER Message-ID "parts@"',
            "header_exists": 'SEARCH HEADER Content-Type ""',
            "body": "SEARCH BODY meeting",
            "text_decoded": 'SEARCH CHARSET UTF-8 TEXT "café"',
            "text_header": "SEARCH TEXT holiday",
            "since": "SEARCH SENTSINCE 2-Jan-2024",
            "on": "SEARCH SENTON 1-Jan-2024",
            "internal": "SEARCH SINCE 1-Jan-2020 BEFORE 1-Jan-2100",
            "larger": f"SEARCH LARGER {len(MULTIPART) - 1}",
            "seq": "SEARCH 2:3 UID 3:*",
            "younger": "SEARCH YOUNGER 3600",
            "keyword": "SEARCH UNKEYWORD $x KEYWORD $y",
            "uid": "UID SEARCH TO alice",
            "esearch": "SEARCH RETURN (MIN MAX COUNT ALL) NOT DELETED",
            "esearch_none": "SEARCH RETURN (COUNT) DELETED",
            "save": "SEARCH RETURN (SAVE) FROM bob",
            "use_saved": "FETCH $ (UID)",
            "search_saved": "UID SEARCH $",
            "charset": "SEARCH CHARSET KOI8-R ALL",
            "nested": "SEARCH " + "(" * 10 + "ALL" + ")" * 10,
            "too_deep": "SEARCH " + "NOT " * 40 + "ALL",
        }
        out = {name: wire.command(q) for name, q in queries.items()}
        wire.close()
        wire = env.wire()
        wire.ok("ENABLE IMAP4rev2")
        wire.ok("SELECT INBOX")
        out["rev2"] = wire.command("SEARCH FROM carol")
        wire.close()
        return out

    out = await in_thread(session)

    def found(name: str) -> list[int]:
        lines, done = out[name]
        assert b"OK" in done, (name, done)
        return [int(n) for n in lines[0].split()[2:]] if lines else []

    assert found("all") == [1, 2, 3, 4]
    assert found("unseen") == [2, 3, 4]
    assert found("flagged_or") == [1, 4]
    assert found("not") == [3, 4]
    assert found("subject") == [1, 2]
    assert found("header") == [3]
    assert found("header_exists") == [3]
    assert found("body") == [1, 2]
    assert found("text_decoded") == [3]
    assert found("text_header") == [4]
    assert found("since") == [3]
    assert found("on") == [1, 2, 4]
    assert found("internal") == [1, 2, 3, 4]
    assert found("larger") == [3]
    assert found("seq") == [3]
    assert found("younger") == [1, 2, 3, 4]
    assert found("keyword") == []
    assert found("uid") == [1, 2, 3, 4]
    assert re.fullmatch(
        rb'\* ESEARCH \(TAG "W\d+"\) MIN 1 MAX 4 COUNT 4 ALL 1:4\r\n', out["esearch"][0][0]
    )
    assert re.fullmatch(rb'\* ESEARCH \(TAG "W\d+"\) COUNT 0\r\n', out["esearch_none"][0][0])
    assert out["save"][0] == []
    assert out["use_saved"][0] == [b"* 2 FETCH (UID 2)\r\n"]
    assert out["search_saved"][0] == [b"* SEARCH 2\r\n"]
    assert b"NO [BADCHARSET" in out["charset"][1]
    assert found("nested") == [1, 2, 3, 4]
    assert b"BAD" in out["too_deep"][1]
    assert re.fullmatch(rb'\* ESEARCH \(TAG "W\d+"\) ALL 1\r\n', out["rev2"][0][0])


async def test_sort_and_thread(env: Env) -> None:
    await fill(env)
    await env.deliver(
        ALICE,
        message(
            "Re: Re: first report",
            "Again.",
            extra="In-Reply-To: <Re:.first.report@example.test>\r\n"
            "References: <first.report@example.test> <Re:.first.report@example.test>\r\n",
        ),
    )

    def session() -> dict[str, object]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        out = {
            "subject": wire.command("SORT (SUBJECT) UTF-8 ALL"),
            "reverse_date": wire.command("SORT (REVERSE DATE) UTF-8 ALL"),
            "from_size": wire.command("UID SORT (FROM SIZE) UTF-8 ALL"),
            "references": wire.command("THREAD REFERENCES UTF-8 ALL"),
            "ordered": wire.command("THREAD ORDEREDSUBJECT UTF-8 ALL"),
        }
        wire.close()
        return out

    out = await in_thread(session)
    assert out["subject"][0] == [b"* SORT 1 2 5 4 3\r\n"]
    assert out["reverse_date"][0][0].startswith(b"* SORT 3 ")
    assert out["from_size"][0][0].startswith(b"* SORT 2 ")
    assert out["references"][0] == [b"* THREAD (1 2 5)(4)(3)\r\n"]
    assert out["ordered"][0] == [b"* THREAD (1 (2)(5))(4)(3)\r\n"]


async def test_shutdown_says_bye_even_during_idle(env: Env) -> None:
    counter = SessionCounter(env.limits.imap_sessions_per_user)

    async def run(channel: Channel) -> None:
        session = ImapSession(
            channel,
            login=env.svc.login,
            limits=env.limits,
            ssl_context=env.ssl_context,
            tls_active=True,
            hostname="mx.example.test",
            counter=counter,
        )
        await session.run()

    listener = await serve_channels(
        "imap",
        HOST,
        0,
        run=run,
        caps=ConnectionCaps(total=10, per_ip=10),
        busy=BUSY,
        ssl_context=env.ssl_context,
        implicit_tls=True,
    )
    loop = asyncio.get_running_loop()
    idling = asyncio.Event()

    def session() -> list[bytes]:
        wire = Wire(listener.port)
        wire.ok(f'LOGIN {ALICE} "{env.password(ALICE)}"')
        wire.ok("SELECT INBOX")
        wire.send(b"I1 IDLE\r\n")
        assert wire.line().startswith(b"+ ")
        loop.call_soon_threadsafe(idling.set)
        lines = [wire.line(), wire.line()]
        wire.close()
        return lines

    task = asyncio.ensure_future(in_thread(session))
    await asyncio.wait_for(idling.wait(), 30)
    await listener.shutdown(grace=5)
    assert await task == [b"* BYE server shutting down\r\n", b""]
    assert listener.active_sessions == 0


# -- several sessions on one mailbox ---------------------------------------------------------


async def test_idle_hears_direct_delivery(env: Env) -> None:
    await fill(env)
    idling = asyncio.Event()
    loop = asyncio.get_running_loop()

    def session() -> tuple[list[bytes], float]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        wire.send(b"I1 IDLE\r\n")
        assert wire.line().startswith(b"+ ")
        loop.call_soon_threadsafe(idling.set)
        exists = wire.line()
        heard = time.monotonic()
        wire.send(b"DONE\r\n")
        lines, done = wire.until(b"I1")
        wire.close()
        return [exists, *lines, done], heard

    task = asyncio.ensure_future(in_thread(session))
    await idling.wait()
    sent = time.monotonic()
    await env.deliver(ALICE, message("pushed"))
    lines, heard = await task
    assert lines[0] == b"* 5 EXISTS\r\n"
    assert lines[-1] == b"I1 OK IDLE terminated\r\n"
    print(f"IDLE push latency: {(heard - sent) * 1000:.1f} ms")


async def test_changes_reported_between_sessions(env: Env) -> None:
    await fill(env)

    def session() -> dict[str, object]:
        first, second = env.wire(), env.wire()
        first.ok("SELECT INBOX")
        second.ok("SELECT INBOX")
        out: dict[str, object] = {}
        second.ok("STORE 2 +FLAGS (\\Deleted)")
        second.ok("STORE 4 +FLAGS (\\Answered)")
        second.ok("EXPUNGE")
        # FETCH by number must not hear of the expunge (RFC 9051 §7.5.1), only of flags.
        out["fetch"] = first.command("FETCH 1:4 (UID FLAGS)")
        out["noop"] = first.command("NOOP")
        out["after"] = first.command("FETCH 1:* (UID)")
        late = message("late")
        second.ok(b"APPEND INBOX {%d+}\r\n" % len(late) + late)
        out["idle_exists"] = first.command("NOOP")
        first.close()
        second.close()
        return out

    out = await in_thread(session)
    fetch_lines = out["fetch"][0]
    assert b"EXPUNGE" not in b"".join(fetch_lines)
    assert b"* 4 FETCH (FLAGS (\\Answered \\Recent) UID 4)\r\n" in fetch_lines
    assert not [line for line in fetch_lines if b"(UID 2 " in line]
    assert b"OK [EXPUNGEISSUED]" in out["fetch"][1]
    assert out["noop"][0] == [b"* 2 EXPUNGE\r\n"]
    assert out["after"][0] == [
        b"* 1 FETCH (UID 1)\r\n",
        b"* 2 FETCH (UID 3)\r\n",
        b"* 3 FETCH (UID 4)\r\n",
    ]
    assert out["idle_exists"][0] == [b"* 4 EXISTS\r\n", b"* 3 RECENT\r\n"]


async def test_qresync_after_another_session_expunged(env: Env) -> None:
    await fill(env)

    def session() -> dict[str, object]:
        first = env.wire()
        first.ok("ENABLE QRESYNC")
        select = b"".join(first.ok("SELECT INBOX"))
        validity = int(re.search(rb"UIDVALIDITY (\d+)", select).group(1))
        modseq = int(re.search(rb"HIGHESTMODSEQ (\d+)", select).group(1))
        first.close()
        other = env.wire()
        other.ok("SELECT INBOX")
        other.ok("UID STORE 1,3 +FLAGS (\\Deleted)")
        other.ok("UID STORE 4 +FLAGS (\\Flagged)")
        other.ok("EXPUNGE")
        other.close()
        again = env.wire()
        out: dict[str, object] = {"enable": again.command("ENABLE QRESYNC CONDSTORE")}
        out["select"] = again.command(f"SELECT INBOX (QRESYNC ({validity} {modseq} 1:4))")
        live = env.wire()
        live.ok("SELECT INBOX")
        live.ok("STORE 1 +FLAGS (\\Deleted)")
        live.ok("EXPUNGE")
        out["vanished"] = again.command("NOOP")
        out["fetch_vanished"] = again.command(
            f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq} VANISHED)"
        )
        live.close()
        again.close()
        return out

    out = await in_thread(session)
    assert (
        out["enable"][0] == [b"* ENABLED CONDSTORE QRESYNC\r\n"]
        or b"ENABLED" in out["enable"][0][0]
    )
    lines, done = out["select"]
    assert b"* VANISHED (EARLIER) 1,3\r\n" in lines
    assert any(
        re.match(rb"\* 2 FETCH \(UID 4 FLAGS \(\\Flagged\) MODSEQ \(\d+\)\)", x) for x in lines
    )
    assert b"OK [READ-WRITE]" in done
    assert out["vanished"][0] == [b"* VANISHED 2\r\n"]
    fetched = out["fetch_vanished"][0]
    assert fetched[0] == b"* VANISHED (EARLIER) 1:3\r\n"
    assert re.match(rb"\* 1 FETCH \(FLAGS \(\\Flagged\) UID 4 MODSEQ \(\d+\)\)", fetched[1])


async def test_enable_namespace_id_and_compress(env: Env) -> None:
    await fill(env)

    def session() -> dict[str, object]:
        wire = env.wire()
        out: dict[str, object] = {
            "enable": wire.command("ENABLE CONDSTORE UTF8=ACCEPT X-UNKNOWN"),
            "namespace": wire.command("NAMESPACE"),
            "id": wire.command('ID ("name" "test")'),
        }
        _, done = wire.command("COMPRESS DEFLATE")
        out["compress"] = done
        inflate = zlib.decompressobj(-15)
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        wire.send(
            deflate.compress(
                b"C1 SELECT INBOX\r\n"
                b"C2 FETCH 3 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\nC3 LOGOUT\r\n"
            )
            + deflate.flush(zlib.Z_SYNC_FLUSH)
        )
        data = b""
        while b"C3 OK" not in data:
            chunk = wire.sock.recv(65536)
            if not chunk:
                break
            data += inflate.decompress(chunk)
        out["compressed"] = data
        wire.close()
        return out

    out = await in_thread(session)
    assert out["enable"][0] == [b"* ENABLED CONDSTORE UTF8=ACCEPT\r\n"]
    assert out["namespace"][0] == [b'* NAMESPACE (("" "/")) NIL NIL\r\n']
    assert out["id"][0][0].startswith(b'* ID ("name" "Postvern"')
    assert b"OK" in out["compress"]
    assert b"Subject: parts" in out["compressed"] and b"C3 OK" in out["compressed"]


async def test_multiappend_binary_append_check_unselect(env: Env) -> None:
    first, second = message("multi one"), message("multi two")
    binary = b"From: x@example.test\r\nSubject: nul\r\n\r\nbefore\x00after\r\n"

    def session() -> dict[str, object]:
        wire = env.wire()
        out: dict[str, object] = {}
        out["multi"] = wire.command(
            b"APPEND Drafts (\\Draft) {%d+}\r\n" % len(first)
            + first
            + b' (\\Seen) "05-Feb-2024 06:07:08 +0100" {%d+}\r\n' % len(second)
            + second
        )
        out["binary"] = wire.command(b"APPEND INBOX ~{%d+}\r\n" % len(binary) + binary)
        out["empty"] = wire.command(b"APPEND INBOX {0+}\r\n")
        wire.ok("EXAMINE Drafts")
        out["check"] = wire.command("CHECK")
        out["drafts"] = wire.command("FETCH 1:* (FLAGS INTERNALDATE)")
        out["store_read_only"] = wire.command("STORE 1 +FLAGS (\\Seen)")
        out["unselect"] = wire.command("UNSELECT")
        out["after_unselect"] = wire.command("FETCH 1 FLAGS")
        wire.ok("SELECT INBOX")
        out["binary_back"] = wire.command("FETCH 1 (BODY.PEEK[] BINARY.SIZE[1])")
        wire.close()
        return out

    out = await in_thread(session)
    assert re.search(rb"OK \[APPENDUID \d+ 1:2\]", out["multi"][1])
    assert re.search(rb"OK \[APPENDUID \d+ 1\]", out["binary"][1])
    assert b"NO" in out["empty"][1]
    assert b"OK" in out["check"][1]
    assert out["drafts"][0][0].startswith(b"* 1 FETCH (FLAGS (\\Draft \\Recent) INTERNALDATE ")
    assert out["drafts"][0][1] == (
        b'* 2 FETCH (FLAGS (\\Seen \\Recent) INTERNALDATE "05-Feb-2024 06:07:08 +0100")\r\n'
    )
    assert b"NO [READ-ONLY]" in out["store_read_only"][1]
    assert b"OK" in out["unselect"][1] and b"BAD" in out["after_unselect"][1]
    fetched = out["binary_back"][0][0]
    # A plain literal never holds NUL: it goes out as 0x80 (issue #12, RFC 9051 §4.3).
    assert binary.replace(b"\x00", b"\x80") in fetched and b"BINARY.SIZE[1] " in fetched


async def test_imaplib_as_imap4rev2_client(env: Env) -> None:
    await fill(env)

    def session() -> dict[str, object]:
        client = env.client()
        ok(client.enable("IMAP4rev2"))
        out: dict[str, object] = {"enable": untagged(client, "ENABLED")}
        ok(client.enable("UTF8=ACCEPT"))  # imaplib sends UTF-8 names only after this one
        out["select"] = ok(client.select("INBOX"))
        out["list_in_select"] = untagged(client, "LIST")
        ok(client.search(None, "UNSEEN"))
        out["esearch"] = untagged(client, "ESEARCH")
        out["sort"] = ok(client.sort("(SUBJECT)", "UTF-8", "ALL"))
        out["thread"] = ok(client.thread("REFERENCES", "UTF-8", "ALL"))
        out["uid_move"] = ok(client.uid("MOVE", "4", "Trash"))
        out["after_move"] = ok(client.fetch("1:*", "(UID)"))
        ok(client.create('"Nächste/Woche"'))  # imaplib leaves 8-bit names unquoted
        out["utf8_list"] = ok(client.list('""', "N*"))
        out["namespace"] = ok(client.namespace())
        client.logout()
        return out

    out = await in_thread(session)
    assert out["enable"] == [b"IMAP4rev2"]
    assert out["list_in_select"] == [b'() "/" "INBOX"']
    assert re.fullmatch(rb'\(TAG "\w+"\) ALL 1:4', out["esearch"][0])
    assert out["sort"] == [b"1 2 4 3"]
    assert out["thread"] == [b"(1 2)(4)(3)"]
    assert len(out["after_move"]) == 3
    assert out["utf8_list"][0].endswith('"Nächste"'.encode()) or any(
        "Nächste/Woche".encode() in line for line in out["utf8_list"]
    )
    assert out["namespace"] == [b'(("" "/")) NIL NIL']
