"""Portal sessions in Redis, so that every node serving HTTPS sees the same ones.

With a Redis backend configured (``[abuse] redis_url``, which a cluster has), a session made
on one front is valid on every other, and ending it anywhere (logout, "log out everywhere
else", a disabled account, too many wrong codes) ends it everywhere: the record is gone.

What Redis holds, per session, under ``postvern:portal:s:<id>``:

* the id is HMAC-SHA256, under a server subkey, of the session's key (itself the SHA-256 of
  the cookie token): neither the token nor anything that opens a session is stored, and ids
  cannot be guessed from one another;
* the record is sealed (ChaCha20-Poly1305, server subkey, bound to its id) so a dump of Redis
  shows no address, stage, network or browser;
* inside it, what opens something — the CSRF token, the mailbox key (one machine with Redis)
  or the mailbox node's grant (a cluster front), WebAuthn challenges — is sealed again under
  a key derived from the session's key, which only the cookie gives: Redis and the server key
  together are still not enough to use a session or reach a mailbox.

Each record expires by itself (Redis TTL) at the session's idle limit or its absolute age,
whichever is first; every request pushes the idle limit on. A set per user (keyed by an HMAC
of the user id) lists the user's sessions for the Sessions page and for ending them all.

The per-request life: :meth:`load` fetches the cookie's session into the in-process store
(whose synchronous calls the pages and the account service keep using), and :meth:`settle`
writes it back after the response — or deletes it, if it was dropped. A write-back only
replaces a record that still exists (``SET XX``), so a request that was in flight while the
session ended elsewhere cannot bring it back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis.asyncio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from postvern.abuse.shared import Sealer, SharedError
from postvern.accounts.sessions import (
    IDLE_SECONDS,
    MAX_AGE_SECONDS,
    PENDING,
    PENDING_SECONDS,
    Session,
    SessionStore,
)

log = logging.getLogger(__name__)

PREFIX = "postvern:portal"
NONCE_BYTES = 12  # RFC 8439 §2.8
# Longest cookie token we look up (ours are 43 characters); anything longer is not ours.
MAX_TOKEN = 100
# At most this many sessions listed (and ended) per user: a page, and a bound on a round trip.
MAX_LISTED = 200


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _bytes(value: bytes | str) -> bytes:
    """What redis-py returns (bytes: the pool does not decode responses)."""
    return value if isinstance(value, bytes) else value.encode()


def _scratch_out(scratch: dict[str, Any]) -> dict[str, list[str]]:
    """Scratch values as tagged strings (WebAuthn challenges are bytes, flashes text)."""
    out: dict[str, list[str]] = {}
    for name, value in scratch.items():
        if isinstance(value, bytes):
            out[name] = ["b", _b64(value)]
        elif isinstance(value, str):
            out[name] = ["s", value]
        else:  # nothing else is kept between requests today; say so if that changes
            log.warning("portal session scratch %r is not kept across nodes", name)
    return out


def _scratch_in(data: dict[str, list[str]]) -> dict[str, Any]:
    return {k: _unb64(v) if t == "b" else v for k, (t, v) in data.items()}


class SharedSessions(SessionStore):
    """The in-process store as a per-request cache in front of Redis."""

    def __init__(
        self,
        pool: redis.asyncio.ConnectionPool,
        key: bytes,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock=clock)
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._id_key = hmac.digest(key, b"ids", "sha256")
        self._inner_key = hmac.digest(key, b"inner", "sha256")
        self._outer = Sealer(hmac.digest(key, b"records", "sha256"))
        # Per request: the key a session had when loaded (None: made in this request), and
        # which sessions were dropped; weak, so a finished request leaves nothing behind.
        self._origin: weakref.WeakKeyDictionary[Session, bytes | None] = weakref.WeakKeyDictionary()
        self._gone: weakref.WeakSet[Session] = weakref.WeakSet()

    def __repr__(self) -> str:
        return "SharedSessions(<secret>)"

    # -- names and seals ---------------------------------------------------------------

    def _rid(self, session_key: bytes) -> str:
        return f"{PREFIX}:s:{hmac.digest(self._id_key, session_key, 'sha256').hex()}"

    def _uid(self, user_id: str) -> str:
        digest = hmac.digest(self._id_key, b"user\0" + user_id.encode(), "sha256")
        return f"{PREFIX}:u:{digest.hex()}"

    def _inner_aead(self, session_key: bytes) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(hmac.digest(self._inner_key, session_key, "sha256"))

    def _seal(self, session: Session, rid: str) -> bytes:
        inner = {
            "csrf": session.csrf,
            "mk": _b64(session.mailbox_key) if session.mailbox_key else None,
            "gr": session.mailbox_grant,
            "sc": _scratch_out(session.scratch),
        }
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(inner, separators=(",", ":")).encode()
        secret = nonce + self._inner_aead(session.key).encrypt(nonce, plain, rid.encode())
        outer = {
            "u": session.user_id,
            "a": session.address,
            "st": session.stage,
            "m": session.method,
            "n": session.network,
            "ag": session.agent,
            "c": session.created,
            "l": session.last_seen,
            "t": session.tries,
            "au": session.authenticated_at,
            "x": _b64(secret),
        }
        return self._outer.seal(outer, rid.encode())

    def _listing(self, record: dict[str, Any]) -> Session:
        """A session as the Sessions page shows it (nothing inner: no key opens it here)."""
        session = Session(b"", "", stage=str(record["st"]), user_id=record["u"])
        session.address, session.method = record["a"], str(record["m"])
        session.network, session.agent = str(record["n"]), str(record["ag"])
        session.created, session.last_seen = float(record["c"]), float(record["l"])
        session.tries, session.authenticated_at = int(record["t"]), float(record["au"])
        return session

    def _open(self, session_key: bytes, rid: str, blob: bytes) -> Session | None:
        record = self._outer.open(blob, rid.encode())
        if record is None:
            return None
        try:
            secret = _unb64(record["x"])
            plain = self._inner_aead(session_key).decrypt(
                secret[:NONCE_BYTES], secret[NONCE_BYTES:], rid.encode()
            )
            inner = json.loads(plain)
            session = self._listing(record)
            session.key, session.csrf = session_key, str(inner["csrf"])
            session.mailbox_key = _unb64(inner["mk"]) if inner["mk"] else None
            session.mailbox_grant = inner["gr"]
            session.scratch = _scratch_in(inner["sc"])
        except (InvalidTag, KeyError, TypeError, ValueError):
            return None
        return session

    def _ttl(self, session: Session) -> int:
        """Seconds the record may live: to the idle limit or the absolute age, if sooner."""
        idle = PENDING_SECONDS if session.stage == PENDING else IDLE_SECONDS
        left = session.created + MAX_AGE_SECONDS - self._clock()
        return max(1, int(min(idle, left)) + 1)

    # -- the request's life ------------------------------------------------------------

    async def load(self, token: str | None) -> None:
        """Bring the cookie's session into the in-process store, if Redis has it."""
        if not token or len(token) > MAX_TOKEN:
            return
        session_key = hashlib.sha256(token.encode()).digest()
        rid = self._rid(session_key)
        try:
            blob = await self._redis.get(rid)
        except SharedError as e:
            # Without Redis nobody can be recognised: the visitor is anonymous until it
            # answers again (and says so, once per failure, in the log).
            log.warning("portal sessions: Redis unreachable (%s)", type(e).__name__)
            return
        session = None if blob is None else self._open(session_key, rid, _bytes(blob))
        if session is None:
            return
        self._sessions[session_key] = session
        self._origin[session] = session_key

    def new(self, network: str = "", agent: str = "") -> tuple[str, Session]:
        token, session = super().new(network, agent)
        self._origin[session] = None
        return token, session

    def drop(self, session: Session) -> None:
        self._gone.add(session)
        super().drop(session)

    async def settle(self, session: Session) -> None:
        """After the request: write the session back, or delete it if it ended."""
        origin = self._origin.pop(session, None)
        self._sessions.pop(session.key, None)
        keys = {k for k in (origin, session.key) if k}
        try:
            if session in self._gone:
                self._gone.discard(session)
                await self._delete(session, keys)
                return
            await self._write(session, origin)
        except SharedError as e:
            log.warning("portal sessions: Redis unreachable (%s)", type(e).__name__)

    async def _write(self, session: Session, origin: bytes | None) -> None:
        rid = self._rid(session.key)
        blob = self._seal(session, rid)
        ttl = self._ttl(session)
        if origin is not None and origin != session.key:
            # Rotated (a step of login): the old record must still exist, or the session was
            # ended elsewhere meanwhile and stays ended.
            if not await self._redis.delete(self._rid(origin)):
                return
            await self._redis.set(rid, blob, ex=ttl)
        elif origin is None:
            await self._redis.set(rid, blob, ex=ttl)
        elif not await self._redis.set(rid, blob, ex=ttl, xx=True):
            return  # ended elsewhere while this request ran
        if session.user_id is not None:
            uid = self._uid(session.user_id)
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.sadd(uid, rid)
                pipe.expire(uid, MAX_AGE_SECONDS)
                await pipe.execute()

    async def _delete(self, session: Session, keys: set[bytes]) -> None:
        rids = [self._rid(k) for k in keys]
        if rids:
            await self._redis.delete(*rids)
        if session.user_id is not None and rids:
            await self._redis.srem(self._uid(session.user_id), *rids)

    # -- a user's sessions -------------------------------------------------------------

    async def _user_records(self, user_id: str) -> list[tuple[str, dict[str, Any]]]:
        uid = self._uid(user_id)
        rids = sorted(_bytes(m).decode() for m in await self._redis.smembers(uid))[:MAX_LISTED]
        if not rids:
            return []
        blobs = await self._redis.mget(rids)
        found, stale = [], []
        for rid, blob in zip(rids, blobs, strict=True):
            record = None if blob is None else self._outer.open(_bytes(blob), rid.encode())
            if record is None or record.get("u") != user_id:
                stale.append(rid)
            else:
                found.append((rid, record))
        if stale:
            await self._redis.srem(uid, *stale)
        return found

    def _loaded(self) -> dict[str, Session]:
        return {self._rid(k): s for k, s in self._sessions.items()}

    async def list_user(self, user_id: str) -> list[Session]:
        """The user's logged-in sessions on every node (the current one as itself)."""
        loaded = self._loaded()
        listed = [
            loaded.get(rid) or self._listing(record)
            for rid, record in await self._user_records(user_id)
            if record["st"] == "full"
        ]
        return sorted(listed, key=lambda s: s.created)

    async def end_user(self, user_id: str, *, keep: Session | None = None) -> int:
        """End every session of the user but ``keep``, on every node; how many ended."""
        kept = self._rid(keep.key) if keep is not None else None
        ended = [rid for rid, _ in await self._user_records(user_id) if rid != kept]
        for session in list(self._sessions.values()):
            if session.user_id == user_id and session is not keep:
                self.drop(session)
        if ended:
            await self._redis.delete(*ended)
            await self._redis.srem(self._uid(user_id), *ended)
        return len(ended)
