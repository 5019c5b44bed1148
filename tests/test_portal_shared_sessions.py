"""Portal sessions shared through a real redis-server (web/portal/shared_sessions.py).

Two stores with the same server key stand for two nodes (or worker processes): what one
writes the other loads, what one ends is ended for both, and a write-back from a request
that was still running when the session ended elsewhere does not bring it back. Redis holds
neither the cookie nor anything that opens a session or a mailbox, and every record expires.
A mailbox node's table of portal grants (the front's sessions' stand-in for the key) last.
"""

from __future__ import annotations

import hashlib
import os

import redis as redis_sync

from clock import Clock
from postvern.abuse.shared import connection_pool
from postvern.accounts.sessions import (
    FULL,
    IDLE_SECONDS,
    MAX_AGE_SECONDS,
    PENDING,
    PENDING_SECONDS,
    Session,
)
from postvern.cluster.portal import MAX_GRANTS, Grants
from postvern.directory.db import User
from postvern.web.portal.shared_sessions import SharedSessions
from redis_server import redis_server, redis_url

__all__ = ["redis_server", "redis_url"]  # the fixtures, used by name

MAILBOX_KEY = os.urandom(32)


def _stores(url: str, key: bytes = b"k" * 32) -> tuple[SharedSessions, SharedSessions]:
    return SharedSessions(connection_pool(url), key), SharedSessions(connection_pool(url), key)


async def _logged_in(store: SharedSessions, user: str = "u1") -> tuple[str, Session, str]:
    """A session through a login's steps on ``store``: anonymous, then FULL and rotated.
    Its token now, the session, and its token before the rotation."""
    token, session = store.new("192.0.2.7", "Browser/1.0")
    await store.settle(session)
    await store.load(token)
    session = store.get(token)
    assert session is not None
    session.stage, session.user_id, session.address = FULL, user, f"{user}@example.test"
    session.mailbox_key = MAILBOX_KEY
    session.scratch["assert"] = b"\x00challenge"
    store.mark_authenticated(session)
    new_token = store.rotate(session)
    await store.settle(session)
    return new_token, session, token


async def test_a_session_written_by_one_store_is_loaded_by_the_other(redis_url: str) -> None:
    a, b = _stores(redis_url)
    token, made, _ = await _logged_in(a)
    await b.load(token)
    found = b.get(token)
    assert found is not None and found.stage == FULL and found.user_id == "u1"
    assert found.mailbox_key == MAILBOX_KEY and found.scratch == {"assert": b"\x00challenge"}
    assert found.csrf == made.csrf
    assert b.recently_authenticated(found, 60)  # the re-auth time came along
    await b.settle(found)


async def test_redis_holds_no_token_no_key_and_every_record_expires(redis_url: str) -> None:
    a, _ = _stores(redis_url)
    token, session, _ = await _logged_in(a)
    raw = redis_sync.Redis.from_url(redis_url)
    names = raw.keys("postvern:portal:*")
    assert len([n for n in names if n.startswith(b"postvern:portal:s:")]) == 1
    dump = b"".join(names) + b"".join(
        raw.get(n) or b"" for n in names if n.startswith(b"postvern:portal:s:")
    )
    session_key = hashlib.sha256(token.encode()).digest()
    for secret in (token.encode(), session_key, session_key.hex().encode(), MAILBOX_KEY,
                   session.csrf.encode(), b"u1@example.test", b"Browser/1.0"):  # fmt: skip
        assert secret not in dump
    for name in names:
        assert 0 < raw.ttl(name)
    record = next(n for n in names if n.startswith(b"postvern:portal:s:"))
    assert raw.ttl(record) <= IDLE_SECONDS + 1


async def test_a_pending_session_lives_only_as_long_as_the_second_factor_may_take(
    redis_url: str,
) -> None:
    a, _ = _stores(redis_url)
    _, session = a.new()
    session.stage, session.user_id = PENDING, "u2"
    await a.settle(session)
    raw = redis_sync.Redis.from_url(redis_url)
    record = next(n for n in raw.keys("postvern:portal:s:*"))
    assert 0 < raw.ttl(record) <= PENDING_SECONDS + 1


async def test_ending_a_session_on_one_store_ends_it_for_the_other_and_stays_ended(
    redis_url: str,
) -> None:
    a, b = _stores(redis_url)
    token, _, _ = await _logged_in(a)
    await a.load(token)
    in_flight = a.get(token)  # a request on node A, still running
    assert in_flight is not None
    await b.load(token)
    ending = b.get(token)
    assert ending is not None
    b.drop(ending)  # logout on node B
    await b.settle(ending)
    in_flight.scratch["flash"] = "saved"
    await a.settle(in_flight)  # A's write-back comes after the logout: it must not revive it
    for store in (a, b):
        await store.load(token)
        assert store.get(token) is None


async def test_the_old_token_dies_at_rotation_and_end_user_keeps_only_the_current(
    redis_url: str,
) -> None:
    a, b = _stores(redis_url)
    token, _, before = await _logged_in(a)
    await b.load(before)
    assert b.get(before) is None
    other, _, _ = await _logged_in(b)
    await a.load(token)
    current = a.get(token)
    assert current is not None
    listed = await a.list_user("u1")
    assert len(listed) == 2 and any(s is current for s in listed)
    assert await a.end_user("u1", keep=current) == 1
    await a.settle(current)
    await b.load(other)
    assert b.get(other) is None
    await b.load(token)
    assert b.get(token) is not None


async def test_another_installations_key_opens_nothing(redis_url: str) -> None:
    a, _ = _stores(redis_url)
    token, _, _ = await _logged_in(a)
    stranger = SharedSessions(connection_pool(redis_url), b"x" * 32)
    await stranger.load(token)
    assert stranger.get(token) is None


def test_a_mailbox_nodes_grants_are_its_users_own_and_end_with_the_session() -> None:
    """cluster/portal.py's grant table: tied to one user, ended by idleness, absolute age,
    revocation or the user leaving the node, and bounded."""
    clock = Clock()
    grants = Grants(clock)
    alice = User("u-alice", "alice", "example.test", 0, b"")
    bob = User("u-bob", "bob", "example.test", 0, b"")
    grant = grants.issue(alice, MAILBOX_KEY)
    entry = grants.get(grant, alice.id)
    assert entry is not None and entry.mailbox_key == MAILBOX_KEY
    assert grants.get(grant, bob.id) is None and grants.get("made-up", alice.id) is None
    clock.advance(IDLE_SECONDS - 1)
    assert grants.get(grant, alice.id) is not None  # in use: the idle limit moves on
    clock.advance(IDLE_SECONDS + 1)
    assert grants.get(grant, alice.id) is None

    kept = grants.issue(alice, MAILBOX_KEY)
    for _ in range(MAX_AGE_SECONDS // (IDLE_SECONDS // 2) + 1):
        clock.advance(IDLE_SECONDS // 2)
        grants.get(kept, alice.id)
    assert grants.get(kept, alice.id) is None  # however busy, not past the absolute age

    revoked, moved = grants.issue(alice, MAILBOX_KEY), grants.issue(bob, MAILBOX_KEY)
    grants.revoke(revoked)
    grants.forget_user(bob.id)
    assert grants.get(revoked, alice.id) is None and grants.get(moved, bob.id) is None

    first = grants.issue(alice, MAILBOX_KEY)
    for _ in range(MAX_GRANTS):
        grants.issue(bob, MAILBOX_KEY)
    assert len(grants) == MAX_GRANTS and grants.get(first, alice.id) is None
