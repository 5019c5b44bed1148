"""Bans and greylisting shared through Redis, so that every node refuses the same clients.

Bans live in one Redis hash (field: pseudonym of the network, value: the sealed record),
which outlives any node; every change is also appended to a Redis stream that each node
follows, so a ban made on one node reaches the others within one round trip. Records are
sealed with ChaCha20-Poly1305 under a key derived from the server key: Redis, and any dump
of it, holds neither addresses nor reasons in the clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
import redis.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from postvern.abuse.bans import Ban
from postvern.abuse.greylist import Entry
from postvern.abuse.personal import Pseudonyms
from postvern.abuse.ratelimit import REDIS_PREFIX

log = logging.getLogger(__name__)

BANS_KEY = f"{REDIS_PREFIX}:bans"
EVENTS_KEY = f"{REDIS_PREFIX}:ban-events"
GREYLIST_PREFIX = f"{REDIS_PREFIX}:grey:"
# Every Redis command on the connection path (counters, greylisting) gives up after one
# second: a stalled Redis must not stall every SMTP greeting with it.
REDIS_TIMEOUT = 1.0
# One immediate retry covers a connection the server closed while it sat in the pool.
REDIS_RETRIES = 1
# The change stream is trimmed to about this many events: a node that was cut off for
# longer than that many changes rereads the whole hash anyway when it reconnects.
EVENTS_MAX = 10_000
# A follower waits this long for new events per XREAD before asking again.
FOLLOW_BLOCK_MS = 5_000
# Reconnection back-off while Redis is unreachable.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
# Stopping the follower: how often its socket is closed again, and how many times at most.
STOP_POLL = 0.05
STOP_ATTEMPTS = 100
# AEAD nonce (RFC 8439 §2.8); random nonces are safe far beyond any number of ban records.
NONCE_BYTES = 12

Applier = Callable[[Ban], Awaitable[None]]
Remover = Callable[[str], Awaitable[None]]
Snapshot = Callable[[list[Ban]], Awaitable[None]]

SharedError = (redis.exceptions.RedisError, OSError)


def connection_pool(url: str) -> redis.asyncio.ConnectionPool:
    """The pool for request-path commands: short timeouts, one retry, no back-off sleeps."""
    return redis.asyncio.ConnectionPool.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        retry=Retry(NoBackoff(), REDIS_RETRIES),
    )


class Sealer:
    """Seal and open small JSON records; the associated data binds a record to its place."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    def __repr__(self) -> str:
        return "Sealer(<secret>)"

    def seal(self, record: dict[str, Any], where: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(record, separators=(",", ":")).encode()
        return nonce + self._aead.encrypt(nonce, plain, where)

    def open(self, data: bytes, where: bytes) -> dict[str, Any] | None:
        """The record, or None if it was not sealed by this installation's key."""
        try:
            plain = self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], where)
            record = json.loads(plain)
        except (InvalidTag, ValueError):
            return None
        return record if isinstance(record, dict) else None


def _ban_record(ban: Ban) -> dict[str, Any]:
    return {
        "n": ban.network,
        "u": ban.until,
        "r": ban.reason,
        "o": ban.offences,
        "c": ban.created,
        "t": ban.updated,
    }


def _ban_from(record: dict[str, Any]) -> Ban | None:
    try:
        return Ban(
            str(record["n"]),
            float(record["u"]),
            str(record["r"]),
            int(record["o"]),
            float(record["c"]),
            float(record["t"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


class SharedState:
    """The Redis side of bans and greylisting for one node."""

    def __init__(
        self, url: str, pool: redis.asyncio.ConnectionPool, seal_key: bytes, names: Pseudonyms
    ) -> None:
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._sealer = Sealer(seal_key)
        self._names = names
        # The follower's own connection: its reads block for seconds, so it must not hold
        # one of the request path's, and it must not retry by itself (see follow()).
        self._reader = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=FOLLOW_BLOCK_MS / 1000 + REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._stopping = asyncio.Event()
        self._followed = asyncio.Event()  # set while follow() is not running
        self._followed.set()

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=False)
        await self._reader.aclose()

    def _field(self, network: str) -> bytes:
        return self._names.text("ban", network).encode()

    # -- bans ----------------------------------------------------------------------------

    async def snapshot(self) -> tuple[bytes, list[Ban]]:
        """The id of the latest change event, then every ban (events after that id follow)."""
        latest: Any = await self._redis.xrevrange(EVENTS_KEY, count=1)
        last_id: bytes = latest[0][0] if latest else b"0-0"
        raw: Any = await self._redis.hgetall(BANS_KEY)
        bans = []
        for field, value in raw.items():
            record = self._sealer.open(value, field)
            ban = _ban_from(record) if record is not None else None
            if ban is None:
                log.warning("unreadable ban record in Redis (from another installation?); skipped")
                continue
            bans.append(ban)
        return last_id, bans

    async def save(self, ban: Ban) -> None:
        field = self._field(ban.network)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(BANS_KEY, field, self._sealer.seal(_ban_record(ban), field))
            pipe.xadd(
                EVENTS_KEY,
                {b"ban": self._sealer.seal(_ban_record(ban), b"event")},
                maxlen=EVENTS_MAX,
                approximate=True,
            )
            await pipe.execute()

    async def delete(self, networks: list[str]) -> None:
        if not networks:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(BANS_KEY, *(self._field(n) for n in networks))
            for network in networks:
                pipe.xadd(
                    EVENTS_KEY,
                    {b"remove": self._sealer.seal({"n": network}, b"event")},
                    maxlen=EVENTS_MAX,
                    approximate=True,
                )
            await pipe.execute()

    async def follow(self, on_snapshot: Snapshot, on_ban: Applier, on_remove: Remover) -> None:
        """Apply every change from other nodes until :meth:`stop_following`.

        After any interruption the whole hash is read again (``on_snapshot``), since
        changes may have been missed meanwhile. The loop is stopped by a flag and a closed
        socket, never by cancelling it: redis-py can swallow a cancellation that arrives
        during a blocking read (redis/redis-py#2028), which would hang shutdown.
        """
        last_id: bytes | None = None
        delay = RETRY_FIRST
        self._followed.clear()
        try:
            while not self._stopping.is_set():
                try:
                    if last_id is None:
                        last_id, bans = await self.snapshot()
                        await on_snapshot(bans)
                    last_id = await self._read(last_id, on_ban, on_remove)
                    delay = RETRY_FIRST
                except SharedError as e:
                    if self._stopping.is_set():
                        break
                    log.warning(
                        "lost the shared ban feed; retrying", extra={"error": type(e).__name__}
                    )
                    last_id = None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    delay = min(delay * 2, RETRY_MAX)
        finally:
            self._followed.set()

    async def stop_following(self) -> None:
        """End :meth:`follow`: set the flag, then close the socket its read waits on.

        The read may be just opening its connection when the socket is closed, so the
        close is repeated until the loop has seen the flag.
        """
        self._stopping.set()
        for _ in range(STOP_ATTEMPTS):
            await self._reader.connection_pool.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._followed.wait(), STOP_POLL)
                return

    async def _read(self, last_id: bytes, on_ban: Applier, on_remove: Remover) -> bytes:
        reply: Any = await self._reader.xread(
            {EVENTS_KEY: last_id}, block=FOLLOW_BLOCK_MS, count=100
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id
                await self._apply(fields, on_ban, on_remove)
        return last_id

    async def _apply(self, fields: dict[bytes, bytes], on_ban: Applier, on_remove: Remover) -> None:
        for kind, value in fields.items():
            record = self._sealer.open(value, b"event")
            if record is None:
                log.warning("unreadable ban event in Redis (from another installation?); skipped")
                continue
            if kind == b"ban":
                ban = _ban_from(record)
                if ban is not None:
                    await on_ban(ban)
            elif kind == b"remove" and isinstance(record.get("n"), str):
                await on_remove(record["n"])

    # -- greylisting ---------------------------------------------------------------------

    async def grey_get(self, triplet: bytes) -> Entry | None:
        data: Any = await self._redis.get(GREYLIST_PREFIX + triplet.hex())
        return Entry.unpack(data) if data is not None else None

    async def grey_put(self, triplet: bytes, entry: Entry, keep_seconds: float) -> None:
        seconds = max(1, math.ceil(keep_seconds))
        await self._redis.set(GREYLIST_PREFIX + triplet.hex(), entry.pack(), ex=seconds)
