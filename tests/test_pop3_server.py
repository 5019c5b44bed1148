"""The POP3 server on loopback, driven by Python's poplib, raw sockets and real fetchmail."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import poplib
import select
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from harness import DataDir, Services, client_tls_context, free_port, make_data_dir, services
from postvern.config import Limits
from postvern.crypto.tls import server_context
from postvern.net import Channel, ChannelServer, ConnectionCaps, serve_channels
from postvern.pop3.protocol import BUSY, to_crlf
from postvern.pop3.server import start_pop3_server
from postvern.pop3.session import POP3Session, unique_id
from postvern.store.mailbox import INBOX
from postvern.store.spool import SpoolItem

ALICE = "alice@example.test"
BOB = "bob@example.test"
HOST = "127.0.0.1"
FETCHMAIL = "/usr/bin/fetchmail"

PLAIN = (
    b"From: Carol <carol@example.test>\r\nTo: alice@example.test\r\nSubject: plain\r\n"
    b"Message-ID: <plain@example.test>\r\n\r\nHello Alice.\r\nSecond line.\r\n"
)
# A lone "." line would end the response early without byte-stuffing (RFC 1939 §3).
DOTS = (
    b"From: carol@example.test\r\nTo: alice@example.test\r\nSubject: dots\r\n"
    b"Message-ID: <dots@example.test>\r\n\r\n.\r\n.hidden\r\n..two\r\nend\r\n"
)
# Stored with bare LF and no final newline: sent with CRLF line endings all the same.
BARE_LF = (
    b"From: dave@example.test\nTo: alice@example.test\nSubject: bare lf\n"
    b"Message-ID: <lf@example.test>\n\nline one\n.line two\nno final newline"
)
MESSAGES = [PLAIN, DOTS, BARE_LF]

T = TypeVar("T")


@dataclass
class Env:
    data: DataDir
    svc: Services
    port: int  # STLS
    tls_port: int  # implicit TLS (pop3s)
    limits: Limits
    ssl_context: ssl.SSLContext

    def password(self, address: str) -> str:
        return self.data.passwords[address]

    async def deliver(self, address: str, raw: bytes) -> None:
        user = self.svc.app.directory.user(address)
        assert user is not None
        await self.svc.registry.deliver(user, SpoolItem(raw))

    async def inbox(self, address: str) -> list[tuple[int, tuple[str, ...], bytes]]:
        """(uid, flags, raw) of every INBOX message, through a handle of our own."""
        logged = await self.svc.login.login(address, self.password(address), HOST, "test")
        try:
            box = logged.mailbox.box
            folder = await logged.mailbox.run(box.folder, INBOX)
            infos = await logged.mailbox.run(box.messages, folder.id)
            return [
                (m.uid, m.flags, await logged.mailbox.run(box.raw, folder.id, m.uid)) for m in infos
            ]
        finally:
            await logged.mailbox.release()

    async def uidvalidity(self, address: str) -> int:
        logged = await self.svc.login.login(address, self.password(address), HOST, "test")
        try:
            folder = await logged.mailbox.run(logged.mailbox.box.folder, INBOX)
            return folder.uidvalidity
        finally:
            await logged.mailbox.release()

    async def released(self, address: str) -> None:
        """Wait until no session holds the mailbox: every exit path must release it."""
        user = self.svc.app.directory.user(address)
        assert user is not None
        # The registry offers no "released" event; polling its public state is enough here.
        while self.svc.registry.is_unlocked(user.id):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    data = make_data_dir(tmp_path / "data", listeners=("pop3", "pop3s"))
    svc = services(data)
    settings = svc.app.settings
    ctx = server_context(settings.path(settings.tls.cert), settings.path(settings.tls.key))
    e = Env(data, svc, data.addr("pop3")[1], data.addr("pop3s")[1], settings.limits, ctx)
    servers = await serve(e, e.port, e.tls_port, e.limits)
    try:
        yield e
    finally:
        for server in servers:
            await server.shutdown()
        await asyncio.wait_for(asyncio.gather(e.released(ALICE), e.released(BOB)), 30)
        await svc.close()


async def serve(e: Env, port: int, tls_port: int, limits: Limits) -> list[ChannelServer]:
    return [
        await start_pop3_server(
            HOST, p, login=e.svc.login, ssl_context=e.ssl_context, implicit_tls=i, limits=limits
        )
        for p, i in ((port, False), (tls_port, True))
    ]


async def in_thread(fn: Callable[[], T]) -> T:
    """poplib and raw sockets block: run them off the loop that serves them."""
    return await asyncio.to_thread(fn)


# poplib has no public way to send AUTH or an arbitrary line; its own helpers do it.
def command(client: poplib.POP3, line: str) -> bytes:
    return client._shortcmd(line)  # type: ignore[attr-defined]


def send_line(client: poplib.POP3, line: str) -> None:
    client._putcmd(line)  # type: ignore[attr-defined]


def reply(client: poplib.POP3) -> bytes:
    return client._getresp()  # type: ignore[attr-defined]


def next_line(client: poplib.POP3) -> bytes:
    return client._getline()[0]  # type: ignore[attr-defined]


def stls_client(e: Env) -> poplib.POP3:
    client = poplib.POP3(HOST, e.port, timeout=30)
    client.stls(client_tls_context())
    return client


def tls_client(e: Env) -> poplib.POP3_SSL:
    return poplib.POP3_SSL(HOST, e.tls_port, context=client_tls_context(), timeout=30)


def wire(raw: bytes) -> bytes:
    """What a client reassembles from RETR: CRLF line endings, CRLF after the last line."""
    text = to_crlf(raw)
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def joined(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


async def fill(e: Env, messages: list[bytes] = MESSAGES) -> None:
    for raw in messages:
        await e.deliver(ALICE, raw)


# -- logging in ------------------------------------------------------------------------------


async def test_stls_then_user_pass_full_transaction(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await fill(env)
    uids = [uid for uid, _, _ in await env.inbox(ALICE)]
    validity = await env.uidvalidity(ALICE)

    def session() -> dict[str, object]:
        client = stls_client(env)
        capa = client.capa()
        client.user(ALICE)
        client.pass_(env.password(ALICE))
        out: dict[str, object] = {"capa": capa, "stat": client.stat()}
        out["list"] = client.list()[1]
        out["uidl"] = client.uidl()[1]
        out["retr"] = [joined(client.retr(n)[1]) for n in (1, 2, 3)]
        out["retr_status"] = client.retr(3)[0]
        out["top"] = joined(client.top(1, 1)[1])
        out["dele"] = client.dele(2)
        out["stat_after_dele"] = client.stat()
        out["quit"] = client.quit()
        return out

    got = await in_thread(session)
    capa = got["capa"]
    assert isinstance(capa, dict)
    assert {"USER", "SASL", "TOP", "UIDL", "PIPELINING", "RESP-CODES"} <= set(capa)
    assert "STLS" not in capa and capa["SASL"] == ["PLAIN"]
    sizes = [len(to_crlf(raw)) for raw in MESSAGES]  # RFC 1939 §11: as sent, CRLF
    assert got["stat"] == (3, sum(sizes))
    assert got["list"] == [f"{n} {size}".encode() for n, size in enumerate(sizes, 1)]
    assert got["retr"] == [wire(raw) for raw in MESSAGES]
    assert got["retr_status"] == f"+OK {len(to_crlf(BARE_LF))} octets".encode()
    assert got["top"] == PLAIN.split(b"\r\n\r\n")[0] + b"\r\n\r\nHello Alice.\r\n"
    assert got["stat_after_dele"] == (2, sizes[0] + sizes[2])
    assert isinstance(got["quit"], bytes) and got["quit"].startswith(b"+OK")

    await env.released(ALICE)
    remaining = await env.inbox(ALICE)
    assert [raw for _, _, raw in remaining] == [PLAIN, BARE_LF]
    # RETR marks \Seen (Dovecot's default), committed at the end of the session.
    assert all("\\Seen" in flags for _, flags, _ in remaining)
    assert got["uidl"] == [
        f"{n} {unique_id(validity, uid)}".encode() for n, uid in enumerate(uids, 1)
    ]
    assert "pop3 session closed" in caplog.text
    assert env.password(ALICE) not in caplog.text


async def test_implicit_tls_auth_plain_initial_response_and_continuation(env: Env) -> None:
    await fill(env, [PLAIN])
    credentials = base64.b64encode(f"\0{ALICE}\0{env.password(ALICE)}".encode()).decode()

    def session() -> tuple[object, ...]:
        first = tls_client(env)
        capa = first.capa()
        ok1 = command(first, f"AUTH PLAIN {credentials}")
        stat = first.stat()
        first.quit()
        second = tls_client(env)
        send_line(second, "AUTH PLAIN")
        challenge = reply(second)
        ok2 = command(second, credentials)
        retr = joined(second.retr(1)[1])
        second.quit()
        return capa, ok1, stat, challenge, ok2, retr

    capa, ok1, stat, challenge, ok2, retr = await in_thread(session)
    assert isinstance(capa, dict) and "STLS" not in capa and capa["SASL"] == ["PLAIN"]
    assert ok1 == ok2 == b"+OK Logged in."
    assert stat == (1, len(PLAIN))
    assert challenge == b"+ "
    assert retr == PLAIN


async def test_wrong_password_is_auth_error_and_three_failures_disconnect(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def session() -> list[str]:
        client = tls_client(env)
        errors = []
        for attempt in range(3):
            client.user(ALICE)
            try:
                client.pass_(f"wrong-{attempt}")
            except poplib.error_proto as e:
                errors.append(e.args[0].decode())
        try:
            client.noop()
        except (poplib.error_proto, OSError, EOFError) as e:
            errors.append(type(e).__name__)
        client.close()
        return errors

    errors = await in_thread(session)
    assert errors[:3] == ["-ERR [AUTH] Authentication failed."] * 3
    assert len(errors) == 4  # the connection was closed after the third failure
    assert "wrong-" not in caplog.text


async def test_credentials_refused_before_stls(env: Env) -> None:
    plain = base64.b64encode(f"\0{ALICE}\0{env.password(ALICE)}".encode()).decode()

    def session() -> tuple[dict[str, list[str]], list[str], bytes]:
        client = poplib.POP3(HOST, env.port, timeout=30)
        capa = client.capa()
        refusals = []
        for line in (f"USER {ALICE}", f"PASS {env.password(ALICE)}", f"AUTH PLAIN {plain}"):
            try:
                command(client, line)
            except poplib.error_proto as e:
                refusals.append(e.args[0].decode())
        client.stls(client_tls_context())
        client.user(ALICE)
        ok = client.pass_(env.password(ALICE))
        client.quit()
        return capa, refusals, ok

    capa, refusals, ok = await in_thread(session)
    assert "STLS" in capa and "USER" not in capa and "SASL" not in capa
    assert len(refusals) == 3 and all(r.startswith("-ERR [AUTH] ") for r in refusals)
    assert ok == b"+OK Logged in."


# -- deletion semantics ----------------------------------------------------------------------


async def test_dele_and_rset_then_quit_deletes_only_what_is_still_marked(env: Env) -> None:
    await fill(env)

    def session() -> None:
        client = tls_client(env)
        client.user(ALICE)
        client.pass_(env.password(ALICE))
        client.dele(1)
        client.rset()
        client.dele(3)
        client.quit()

    await in_thread(session)
    await env.released(ALICE)
    assert [raw for _, _, raw in await env.inbox(ALICE)] == [PLAIN, DOTS]


async def test_dropped_connection_deletes_nothing(env: Env) -> None:
    await fill(env)

    def session() -> None:
        client = tls_client(env)
        client.user(ALICE)
        client.pass_(env.password(ALICE))
        client.retr(2)
        client.dele(1)
        client.dele(2)
        client.sock.shutdown(socket.SHUT_RDWR)
        client.close()

    await in_thread(session)
    await env.released(ALICE)
    inbox = await env.inbox(ALICE)
    assert [raw for _, _, raw in inbox] == MESSAGES
    assert [("\\Seen" in flags) for _, flags, _ in inbox] == [False, True, False]
    assert not any("\\Deleted" in flags for _, flags, _ in inbox)


async def test_idle_timeout_closes_without_update(env: Env) -> None:
    await fill(env)
    quick = dataclasses.replace(env.limits, pop3_idle_timeout=0.3)
    servers = await serve(env, free_port(), free_port(), quick)
    port = servers[1].sockets[0].getsockname()[1]

    def session() -> bytes:
        client = poplib.POP3_SSL(HOST, port, context=client_tls_context(), timeout=30)
        client.user(ALICE)
        client.pass_(env.password(ALICE))
        client.dele(1)
        last = next_line(client)  # blocks until the server gives up on us
        client.close()
        return last

    try:
        assert await in_thread(session) == b"-ERR Disconnected for inactivity."
    finally:
        for server in servers:
            await server.shutdown()
    await env.released(ALICE)
    assert [raw for _, _, raw in await env.inbox(ALICE)] == MESSAGES


async def test_shutdown_closes_without_update(env: Env) -> None:
    await fill(env)

    async def run(channel: Channel) -> None:
        session = POP3Session(
            channel,
            login=env.svc.login,
            limits=env.limits,
            ssl_context=env.ssl_context,
            tls_active=True,
        )
        await session.run()

    listener = await serve_channels(
        "pop3",
        HOST,
        0,
        run=run,
        caps=ConnectionCaps(total=10, per_ip=10),
        busy=BUSY,
        ssl_context=env.ssl_context,
        implicit_tls=True,
    )
    loop = asyncio.get_running_loop()
    deleted = asyncio.Event()

    def session() -> bytes:
        client = poplib.POP3_SSL(HOST, listener.port, context=client_tls_context(), timeout=30)
        client.user(ALICE)
        client.pass_(env.password(ALICE))
        client.dele(1)
        loop.call_soon_threadsafe(deleted.set)
        last = next_line(client)  # blocks until the server goes away
        client.close()
        return last

    task = asyncio.ensure_future(in_thread(session))
    await asyncio.wait_for(deleted.wait(), 30)
    await listener.shutdown(grace=5)
    assert await task == b"-ERR Server shutting down."
    await env.released(ALICE)
    assert [raw for _, _, raw in await env.inbox(ALICE)] == MESSAGES  # DELE never took effect


async def test_uidl_is_stable_across_sessions(env: Env) -> None:
    await fill(env, [PLAIN, DOTS])

    def uidl() -> list[bytes]:
        client = tls_client(env)
        client.user(ALICE)
        client.pass_(env.password(ALICE))
        listing = client.uidl()[1]
        client.quit()
        return [line.split()[1] for line in listing]

    first = await in_thread(uidl)
    await env.released(ALICE)
    await env.deliver(ALICE, BARE_LF)
    second = await in_thread(uidl)
    assert second[:2] == first and len(set(second)) == 3
    await env.released(ALICE)

    def delete_first() -> None:
        client = tls_client(env)
        client.user(ALICE)
        client.pass_(env.password(ALICE))
        client.dele(1)
        client.quit()

    await in_thread(delete_first)
    await env.released(ALICE)
    assert await in_thread(uidl) == second[1:]


async def test_concurrent_expunge_and_imap_deleted_flags_stay_consistent(env: Env) -> None:
    await fill(env)
    other = await env.svc.login.login(ALICE, env.password(ALICE), HOST, "imap")
    box = other.mailbox.box
    folder = await other.mailbox.run(box.folder, INBOX)
    uids = await other.mailbox.run(box.uids, folder.id)
    pop = await in_thread(lambda: tls_client(env))
    try:
        await in_thread(lambda: (pop.user(ALICE), pop.pass_(env.password(ALICE))))
        # Another session expunges message 2 and flags message 3 \Deleted without expunging.
        flagged = [uids[1], uids[2]]
        await other.mailbox.run(box.store_flags, folder.id, flagged, "add", ["\\Deleted"])
        await other.mailbox.run(box.expunge, folder.id, [uids[1]])

        def rest() -> tuple[object, ...]:
            listing = pop.list()[1]
            try:
                pop.retr(2)
                missing = b"retrieved"
            except poplib.error_proto as e:
                missing = e.args[0]
            first = joined(pop.retr(1)[1])
            pop.dele(1)
            return len(listing), missing, first, pop.quit()

        listed, missing, first, quit_reply = await in_thread(rest)
    finally:
        pop.close()
        await other.mailbox.release()
    assert listed == 3  # the maildrop is the snapshot taken at login
    assert missing == b"-ERR Message 2 was removed by another session."
    assert first == PLAIN
    assert isinstance(quit_reply, bytes) and quit_reply.startswith(b"+OK")
    await env.released(ALICE)
    inbox = await env.inbox(ALICE)
    # Only the POP3 deletion was expunged; the IMAP client's \Deleted message is still there.
    assert [(uid, raw) for uid, _, raw in inbox] == [(uids[2], BARE_LF)]
    assert "\\Deleted" in inbox[0][1]


# -- hostile input ---------------------------------------------------------------------------


def read_until(sock: socket.socket | ssl.SSLSocket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


async def test_stls_command_injection_is_discarded(env: Env) -> None:
    def session() -> tuple[bytes, bytes, bytes]:
        raw = socket.create_connection((HOST, env.port), timeout=30)
        read_until(raw, b"\r\n")
        raw.sendall(f"STLS\r\nUSER {ALICE}\r\nCAPA\r\n".encode())
        began = read_until(raw, b"\r\n")
        tls = client_tls_context().wrap_socket(raw, server_hostname="localhost")
        tls.sendall(f"PASS {env.password(ALICE)}\r\n".encode())
        after = read_until(tls, b"\r\n")
        tls.sendall(b"QUIT\r\n")
        bye = read_until(tls, b"\r\n")
        tls.close()
        return began, after, bye

    began, after, bye = await in_thread(session)
    assert began == b"+OK Begin TLS negotiation now.\r\n"
    # Had "USER" (or "CAPA") run inside TLS, PASS would have logged in or a capability
    # list would come first.
    assert after == b"-ERR No username given.\r\n"
    assert bye == b"+OK Logging out.\r\n"


async def test_endless_line_is_refused_and_the_connection_closed(env: Env) -> None:
    chunk = b"A" * 65536
    limit = 200 * 1024 * 1024

    def session() -> tuple[int, bytes]:
        sock = socket.create_connection((HOST, env.port), timeout=30)
        read_until(sock, b"\r\n")
        sent = 0
        reply = b""
        try:
            while sent < limit:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    reply = read_until(sock, b"\r\n")
                    break
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            reply = reply or read_until(sock, b"\r\n")
        sock.close()
        return sent, reply

    sent, reply = await in_thread(session)
    assert reply == b"-ERR Input line too long.\r\n"
    assert sent < limit  # refused long before the client finished

    def still_serving() -> bytes:
        client = poplib.POP3(HOST, env.port, timeout=30)
        return client.quit()

    assert (await in_thread(still_serving)).startswith(b"+OK")


async def test_pipelined_commands_in_one_write_are_answered_in_order(env: Env) -> None:
    await fill(env, [PLAIN, DOTS])

    def session() -> bytes:
        ctx = client_tls_context()
        sock = ctx.wrap_socket(socket.create_connection((HOST, env.tls_port), timeout=30))
        read_until(sock, b"\r\n")
        sock.sendall(
            f"USER {ALICE}\r\nPASS {env.password(ALICE)}\r\nSTAT\r\nRETR 2\r\nNOOP\r\n"
            "LIST 1\r\nQUIT\r\n".encode()
        )
        data = read_until(sock, b"+OK Logging out, 0 messages deleted.\r\n")
        sock.close()
        return data

    data = await in_thread(session)
    expected = (
        b"+OK\r\n+OK Logged in.\r\n"
        + f"+OK 2 {len(PLAIN) + len(DOTS)}\r\n".encode()
        + f"+OK {len(DOTS)} octets\r\n".encode()
        + DOTS.replace(b"\r\n.", b"\r\n..")
        + b".\r\n+OK\r\n"
        + f"+OK 1 {len(PLAIN)}\r\n".encode()
        + b"+OK Logging out, 0 messages deleted.\r\n"
    )
    assert data == expected


# -- fetchmail -------------------------------------------------------------------------------

DELIVER_SCRIPT = """#!/bin/sh
# fetchmail's MDA: one file per message, named in arrival order.
n=$(ls "$1" | wc -l)
exec cat > "$1/$(printf %04d "$n")"
"""


async def run_fetchmail(env: Env, tmp: Path, *, implicit: bool) -> list[bytes]:
    home = tmp / "home"
    out = tmp / "delivered"
    home.mkdir()
    out.mkdir()
    script = tmp / "deliver.sh"
    script.write_text(DELIVER_SCRIPT)
    script.chmod(0o755)
    tls = "ssl" if implicit else "sslproto TLS1.2+"
    rc = home / ".fetchmailrc"
    rc.write_text(
        "set no syslog\nset invisible\n"
        f"poll {HOST} protocol POP3 service {env.tls_port if implicit else env.port}\n"
        f'  user "{ALICE}" there with password "{env.password(ALICE)}"\n'
        f'  {tls} no sslcertck no rewrite fetchall no keep mda "{script} {out}"\n'
    )
    rc.chmod(0o600)
    proc = await asyncio.create_subprocess_exec(
        FETCHMAIL,
        "--nodetach",
        "--fetchmailrc",
        str(rc),
        "--pidfile",
        str(home / "pid"),
        env={"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, output.decode(errors="replace")
    return [path.read_bytes() for path in sorted(out.iterdir())]


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "pop3s"])
async def test_fetchmail_downloads_and_deletes(env: Env, tmp_path: Path, implicit: bool) -> None:
    await fill(env)
    delivered = await run_fetchmail(env, tmp_path, implicit=implicit)
    # fetchmail hands its MDA Unix line endings (it strips the CR of each CRLF).
    assert delivered == [wire(raw).replace(b"\r\n", b"\n") for raw in MESSAGES]
    await env.released(ALICE)
    assert await env.inbox(ALICE) == []


async def test_connections_over_the_per_address_cap_are_turned_away(env: Env) -> None:
    capped = dataclasses.replace(env.limits, connections_per_ip=1)
    servers = await serve(env, free_port(), free_port(), capped)
    port = servers[0].sockets[0].getsockname()[1]

    def session() -> tuple[bytes, bytes]:
        first = poplib.POP3(HOST, port, timeout=30)
        second = socket.create_connection((HOST, port), timeout=30)
        busy = read_until(second, b"\r\n")
        second.close()
        welcome = first.getwelcome()
        first.quit()
        return welcome, busy

    try:
        welcome, busy = await in_thread(session)
    finally:
        for server in servers:
            await server.shutdown()
    assert welcome.startswith(b"+OK")
    assert busy == b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
