"""Moving a user's mailbox from one mailbox node to another, the node's side.

The administrator's ``postvern cluster move`` (admin.py) drives it over the internal listener
with the cluster's *admin* certificate (ALPN ``postvern-admin``), one line per request:

``EVICT <user-id>``
    The node stops serving the user: new logins and LMTP recipients are refused with a
    temporary failure (the fronts keep mail in their relay queues, clients retry), every
    IMAP session of the user ends with ``* BYE [UNAVAILABLE]`` (RFC 5530) so the client
    reconnects, POP3 sessions end, deliveries in flight settle, and the mailbox is closed —
    its file is then complete on disk and nobody writes it.
``EXPORT <user-id>``
    The user's files — the encrypted mailbox (still encrypted: the node never had its key
    outside a session) and the sealed spool — as ``FILE <path> <size>`` records.
``IMPORT <user-id> <count>``
    The target writes those files durably (temp, fsync, rename, fsync of the folder).
``STATUS``
    For ``cluster status``: the node answers, with how many mailboxes it has open.
``RESTORE <user-id> <replica-url>``
    Failover (failover.py): the user's files from the newest point of a dead node's
    replica in object storage, written here; answers ``OK restored <files> <bytes>
    <point-time>``.
``RELEASE <user-id> moved|stay``
    ``moved``: the map now points elsewhere; the old files are kept aside under
    ``moved/`` (removed by the administrator) and the user is no longer served here.
    ``stay``: the move was abandoned; the node serves the user again.

Because the source writes nothing for the user between EVICT and RELEASE and the fronts
hold new mail until the map names the target, every message is in exactly one place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postvern.cluster.failover import FailoverError, ReplicaReader
from postvern.crypto.serverkey import ServerKey
from postvern.directory.accounts import MAILBOX_DIR
from postvern.durable import TEMP_PREFIX, fsync_dir
from postvern.imap.serialize import Code, Condition, ResponseCode, Status
from postvern.imap.session import ImapSession
from postvern.net import Channel
from postvern.pop3.session import POP3Session
from postvern.store.service import MailboxRegistry
from postvern.store.spool import SPOOL_DIR, SUFFIX

log = logging.getLogger(__name__)

ALPN = "postvern-admin"
# A front's watcher (liveness.py) fails a dead node over through this protocol: of the
# requests above only STATUS and RESTORE, the replica one of a mailbox node in nodes.toml.
FAILOVER_ALPN = "postvern-failover"
FAILOVER_VERBS = frozenset({"STATUS", "RESTORE"})
MOVED_DIR = "moved"
# Sessions get this long to say goodbye and release the mailbox at EVICT.
EVICT_GRACE = 10.0
MAX_LINE = 512
# Files cross in pieces of this size: memory stays bounded whatever the mailbox's size.
CHUNK = 1 << 20
# The files of one user a move may carry; anything else in a request is refused.
_USER_ID = re.compile(r"[A-Za-z0-9]{1,64}")
BYE_MOVING = Condition(
    Status.BYE, "mailbox moving to another node, reconnect", ResponseCode(Code.UNAVAILABLE)
)


class MoveError(Exception):
    pass


def user_files(data_dir: Path, user_id: str) -> list[str]:
    """Paths (relative to the data directory) of the user's mailbox and spool, if any."""
    paths = []
    for suffix in ("", "-wal"):
        rel = f"{MAILBOX_DIR}/{user_id}.sqlite{suffix}"
        if (data_dir / rel).exists():
            paths.append(rel)
    spool = data_dir / SPOOL_DIR / user_id
    if spool.is_dir():
        paths += [
            f"{SPOOL_DIR}/{user_id}/{n}" for n in sorted(os.listdir(spool)) if n.endswith(SUFFIX)
        ]
    return paths


def check_path(user_id: str, rel: str) -> str:
    """A path an IMPORT may write: this user's mailbox or one of their spool segments."""
    mailbox = re.fullmatch(rf"{MAILBOX_DIR}/{user_id}\.sqlite(-wal)?", rel)
    segment = re.fullmatch(rf"{SPOOL_DIR}/{user_id}/[0-9]{{20}}-[0-9a-f]{{16}}\{SUFFIX}", rel)
    if not (mailbox or segment):
        raise MoveError("not a path of this user")
    return rel


class EvictableImap(ImapSession):
    """An IMAP session a move can end with BYE [UNAVAILABLE] instead of a shutdown's BYE."""

    def __init__(self, *args: Any, sessions: Sessions, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sessions = sessions
        self.evicted = False

    def _received(self, data: bytes | None) -> None:
        if data is not None and not self.sessions.serving():  # fenced (liveness.py)
            self.evicted, data = True, None
        if data is None and self.evicted:
            self._pending_read = None
            self.conn.send(BYE_MOVING)
            return
        super()._received(data)

    async def _login(self, command: Any) -> Any:
        completion = await super()._login(command)
        if self._user_id is not None:
            self.sessions.add(self._user_id, self)
        return completion

    async def _finish(self) -> None:
        user_id = self._user_id
        try:
            await super()._finish()
        finally:
            if user_id is not None:
                self.sessions.remove(user_id, self)


class EvictablePop3(POP3Session):
    def __init__(self, *args: Any, sessions: Sessions, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sessions = sessions
        self.evicted = False
        self._user_id: str | None = None

    async def _authenticate(self, event: Any) -> None:
        await super()._authenticate(event)
        if self.handle is not None:
            self._user_id = self.handle.user.id
            self.sessions.add(self._user_id, self)

    async def _finish(self) -> None:
        try:
            await super()._finish()
        finally:
            if self._user_id is not None:
                self.sessions.remove(self._user_id, self)


class Sessions:
    """Logged-in IMAP/POP3 sessions per user, so a move can end them."""

    def __init__(self) -> None:
        self._by_user: dict[str, set[Any]] = {}
        self._changed = asyncio.Event()
        self.serving: Callable[[], bool] = lambda: True  # False once fenced (liveness.py)

    def add(self, user_id: str, session: Any) -> None:
        self._by_user.setdefault(user_id, set()).add(session)

    def remove(self, user_id: str, session: Any) -> None:
        self._by_user.get(user_id, set()).discard(session)
        self._changed.set()

    def users(self) -> list[str]:
        """Users with a session open here."""
        return [user_id for user_id, held in self._by_user.items() if held]

    def of(self, user_id: str) -> set[Any]:
        return set(self._by_user.get(user_id, ()))

    async def end(self, user_id: str, grace: float) -> None:
        """Interrupt every session of the user; wait (bounded) until they have finished."""
        for session in self.of(user_id):
            session.evicted = True
            session.channel.interrupt()
        async with asyncio.timeout(grace):
            while self._by_user.get(user_id):
                self._changed.clear()
                await self._changed.wait()


async def close_mailbox(registry: MailboxRegistry, user_id: str) -> bool:
    """Close the user's mailbox now (not after its linger), once deliveries in flight have
    settled; False if something still holds it."""
    return await registry.close_now(user_id)


class MoveService:
    """The node's half of a move, spoken over ALPN ``postvern-admin``."""

    def __init__(
        self,
        data_dir: Path,
        registry: MailboxRegistry,
        sessions: Sessions,
        *,
        server_key: ServerKey | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.registry = registry
        self.sessions = sessions
        self.evicted: set[str] = set()  # users this node must not serve (moving away)
        self.replicas = None if server_key is None else ReplicaReader(data_dir, server_key)
        self.serving: Callable[[], bool] = lambda: True  # False once fenced (liveness.py)

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.registry.executor, fn, *args)

    async def serve(
        self,
        channel: Channel,
        *,
        verbs: frozenset[str] | None = None,
        replica_ok: Callable[[str], bool] | None = None,
    ) -> str:
        """``verbs``: the only requests allowed (None: all); ``replica_ok``: which replica
        URLs a RESTORE may read (None: any)."""
        reader = _LineReader(channel)
        while True:
            line = await reader.line()
            if line is None:
                return "closed"
            verb, *args = line.split(" ")
            try:
                if verbs is not None and verb.upper() not in verbs:
                    raise MoveError("not allowed here")
                restore = verb.upper() == "RESTORE"
                if restore and replica_ok and not (args and replica_ok(args[-1])):
                    raise MoveError("not the replica of a mailbox node")
                answer = await self._request(verb.upper(), args, reader, channel)
            except (MoveError, FailoverError, OSError, TimeoutError, ValueError) as e:
                answer = f"NO {type(e).__name__}: {e}"
            channel.write(answer.encode() + b"\r\n")
            await channel.drain()

    async def _request(
        self, verb: str, args: list[str], reader: _LineReader, channel: Channel
    ) -> str:
        if verb == "STATUS":  # `cluster status`: alive, and what it holds open
            open_now = self.registry.unlocked_count
            serving = "yes" if self.serving() else "no"
            return f"OK mailboxes-open={open_now} evicted={len(self.evicted)} serving={serving}"
        if not args or not _USER_ID.fullmatch(args[0]):
            raise MoveError("a user id is needed")
        user_id = args[0]
        if verb == "EVICT":
            self.evicted.add(user_id)
            await self.sessions.end(user_id, EVICT_GRACE)
            deadline = time.monotonic() + EVICT_GRACE
            while not await close_mailbox(self.registry, user_id):
                if time.monotonic() > deadline:
                    raise MoveError("the mailbox is still in use")
                await asyncio.sleep(0.05)
            log.info("user evicted for a move")
            return "OK evicted"
        if verb == "EXPORT":
            if user_id not in self.evicted:
                raise MoveError("EVICT first")
            files = await self._thread(user_files, self.data_dir, user_id)
            channel.write(f"OK {len(files)}\r\n".encode())
            for rel in files:
                await self._send_file(channel, rel)
            return "OK exported"
        if verb == "IMPORT":
            count = int(args[1])
            received: list[tuple[Path, Path]] = []
            try:
                for _ in range(count):
                    received.append(await self._receive_file(reader, user_id))
                await self._thread(_install, received)
            finally:
                for temp, _ in received:
                    temp.unlink(missing_ok=True)  # after _install, none is left
            return f"OK imported {count}"
        if verb == "RESTORE":
            if self.replicas is None or len(args) != 2:
                raise MoveError("RESTORE <user-id> <replica-url>")
            done = await self._thread(self.replicas.restore, args[1], user_id)
            log.info("user restored from a replica for a failover")
            return f"OK restored {done.files} {done.bytes} {done.point_created:.3f}"
        if verb == "RELEASE":
            if args[1:] == ["moved"]:
                await self._thread(self._set_aside, user_id)
            self.evicted.discard(user_id)
            return "OK released"
        raise MoveError("unknown request")

    async def _send_file(self, channel: Channel, rel: str) -> None:
        """One file in CHUNK pieces: a mailbox of many gigabytes never sits in memory."""
        path = self.data_dir / rel
        size = (await self._thread(path.stat)).st_size
        channel.write(f"FILE {rel} {size}\r\n".encode())
        offset = 0
        while offset < size:
            chunk = await self._thread(_read_at, path, offset, min(CHUNK, size - offset))
            if not chunk:
                raise MoveError(f"{rel} shrank while being sent")
            channel.write(chunk)
            await channel.drain()
            offset += len(chunk)

    async def _receive_file(self, reader: _LineReader, user_id: str) -> tuple[Path, Path]:
        """One file into a temp file beside its place, fsynced; (temp, final path)."""
        parts = (await reader.line() or "").split(" ")
        if len(parts) != 3 or parts[0] != "FILE":
            raise MoveError("FILE <path> <size> expected")
        target = self.data_dir / check_path(user_id, parts[1])
        remaining = int(parts[2])
        if await self._thread(target.exists):
            raise MoveError(f"{parts[1]} already exists here")
        await self._thread(lambda: target.parent.mkdir(mode=0o700, parents=True, exist_ok=True))
        temp = target.with_name(f"{TEMP_PREFIX}{target.name}")
        fd = await self._thread(os.open, temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while remaining:
                chunk = await reader.take(min(CHUNK, remaining))
                await self._thread(_write_all, fd, chunk)
                remaining -= len(chunk)
            await self._thread(os.fsync, fd)
        finally:
            os.close(fd)
        return temp, target

    def _set_aside(self, user_id: str) -> None:
        """The old copy: kept under moved/<time>-<user>/ until the administrator removes it."""
        aside = self.data_dir / MOVED_DIR / f"{time.time_ns()}-{user_id}"
        for rel in user_files(self.data_dir, user_id):
            target = aside / rel
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.replace(self.data_dir / rel, target)
        spool = self.data_dir / SPOOL_DIR / user_id
        if spool.is_dir() and not any(spool.iterdir()):
            spool.rmdir()


class _LineReader:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.buf = bytearray()

    async def _fill(self) -> bool:
        data = await self.channel.read()
        if not data:
            return False
        self.buf += data
        return True

    async def line(self) -> str | None:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_LINE or not await self._fill():
                return None
        text = bytes(self.buf[:end]).decode("ascii", "replace")
        del self.buf[: end + 2]
        return text

    async def take(self, most: int) -> bytes:
        """Up to ``most`` bytes of what follows (at least one)."""
        if not self.buf and not await self._fill():
            raise MoveError("connection closed inside a file")
        data = bytes(self.buf[:most])
        del self.buf[:most]
        return data


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _install(received: list[tuple[Path, Path]]) -> None:
    """Every received file under its name, then the folders fsynced: durable together."""
    for temp, target in received:
        if target.exists():
            raise MoveError(f"{target.name} already exists here")
        os.replace(temp, target)
    for folder in {target.parent for _, target in received}:
        fsync_dir(folder)
