"""Two nodes sharing a real redis-server: counters, bans and greylisting are common to both."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from clock import Clock
from postvern import config
from postvern.abuse import Abuse, GreylistPolicy, Reason
from redis_server import RedisTestServer, redis_server, redis_url

__all__ = ["redis_server", "redis_url"]  # the fixtures, used by name

# Propagation through the change stream takes one round trip; this only bounds a failure.
PROPAGATION_DEADLINE = 10.0


Factory = Callable[..., Awaitable[Abuse]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
async def make_node(
    tmp_path: Path, clock: Clock, key: bytes, redis_url: str
) -> AsyncIterator[Factory]:
    """Nodes with their own data directories, one Redis and one server key between them."""
    made: list[Abuse] = []

    async def make(*, url: str | None = None, **kw: Any) -> Abuse:
        data = tmp_path / f"node{len(made)}"
        data.mkdir()
        cfg = config.Settings(data_dir=data)
        cfg.abuse.redis_url = url or redis_url
        for name, value in kw.items():
            setattr(cfg.abuse, name, value)
        node = Abuse(cfg, data, key, clock=clock, greylist_policy=GreylistPolicy(delay=300))
        await node.start()
        made.append(node)
        return node

    yield make
    for node in made:
        await node.close()


async def eventually(check: Callable[[], bool]) -> None:
    """Wait until ``check()`` holds (changes reach other nodes asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROPAGATION_DEADLINE
    while not check():
        if loop.time() > deadline:
            raise AssertionError("the change never reached the other node")
        await asyncio.sleep(0.01)


async def test_nodes_share_connection_counters(make_node: Factory) -> None:
    a = await make_node(connections_per_ip_per_minute=4)
    b = await make_node(connections_per_ip_per_minute=4)
    for node in (a, b, a, b):
        assert await node.on_connect("192.0.2.1", "smtp") is None
    refused = await b.on_connect("192.0.2.1", "smtp")
    assert refused is not None and refused.reason is Reason.RATE_LIMITED
    assert await a.on_connect("192.0.2.1", "smtp") is not None
    assert await a.on_connect("192.0.2.2", "smtp") is None


async def test_nodes_share_message_and_submission_counters(make_node: Factory) -> None:
    a = await make_node(messages_per_ip_per_hour=2, submissions_per_user_per_day=2)
    b = await make_node(messages_per_ip_per_hour=2, submissions_per_user_per_day=2)
    assert await a.on_message("192.0.2.3", "x@example.org", 1) is None
    assert await b.on_message("192.0.2.3", "x@example.org", 1) is None
    assert await a.on_mail("192.0.2.3", "x@example.org") is not None
    assert await a.on_submission("alice@example.test") is None
    assert await b.on_submission("alice@example.test") is None
    assert await a.on_submission("alice@example.test") is not None


async def test_failures_on_two_nodes_ban_on_both(make_node: Factory) -> None:
    a = await make_node(auth_failures_per_ip=4)
    b = await make_node(auth_failures_per_ip=4)
    ip = "198.51.100.30"
    for node in (a, b, a):
        await node.login_failed(ip, "alice@example.test", "imap")
    assert a.is_banned(ip) is None and b.is_banned(ip) is None
    await b.login_failed(ip, "alice@example.test", "smtp")
    assert b.is_banned(ip) is not None
    await eventually(lambda: a.is_banned(ip) is not None)
    assert a.is_banned(ip) == b.is_banned(ip)
    refused = await a.on_connect(ip, "pop3")
    assert refused is not None and refused.reason is Reason.BANNED


async def test_bans_live_in_redis_for_new_nodes(make_node: Factory) -> None:
    a = await make_node()
    ban = await a.ban("203.0.113.0/24", 3600, "shared range")
    await a.close()
    # A node with an empty data directory learns the ban from Redis as it starts.
    fresh = await make_node()
    assert fresh.is_banned("203.0.113.9") == ban


async def test_unban_reaches_the_other_node(make_node: Factory) -> None:
    a = await make_node()
    b = await make_node()
    await a.ban("192.0.2.50", 3600, "by hand")
    await eventually(lambda: b.is_banned("192.0.2.50") is not None)
    await b.unban("192.0.2.50")
    await eventually(lambda: a.is_banned("192.0.2.50") is None)
    assert a.bans(include_expired=True) == []


async def test_greylisting_is_shared(make_node: Factory, clock: Clock) -> None:
    a = await make_node(greylisting=True)
    b = await make_node(greylisting=True)
    first = await a.on_rcpt("192.0.2.60", "s@sender.example", "alice@example.test", True)
    assert first is not None and first.reason is Reason.GREYLISTED
    clock.now += 301
    # The sender's retry lands on the other MX, which knows the first attempt.
    assert await b.on_rcpt("192.0.2.61", "s@sender.example", "alice@example.test", True) is None


async def test_redis_holds_no_address_or_account_in_clear(
    make_node: Factory, redis_url: str
) -> None:
    a = await make_node(auth_failures_per_ip=1, greylisting=True)
    await a.login_failed("198.51.100.31", "carol@example.test", "imap")
    await a.on_rcpt("198.51.100.32", "s@sender.example", "dave@example.test", True)
    await a.on_submission("erin@example.test")
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        dump = b""
        async for name in client.scan_iter():
            dump += name
            kind = await client.type(name)
            content: Any = None
            if kind == b"string":
                content = await client.get(name)
                dump += content
            elif kind == b"hash":
                content = await client.hgetall(name)
                dump += b"".join(field + value for field, value in content.items())
            elif kind == b"stream":
                content = await client.xrange(name)
                for _id, fields in content:
                    dump += b"".join(k + v for k, v in fields.items())
    finally:
        await client.aclose()
    assert dump
    for needle in (b"198.51.100", b"carol", b"dave", b"erin", b"example.test", b"sender"):
        assert needle not in dump


async def test_unreachable_redis_fails_open_to_local_counting(
    make_node: Factory, redis_server: RedisTestServer
) -> None:
    node = await make_node(connections_per_ip_per_minute=2, auth_failures_per_ip=2)
    redis_server.stop()
    try:
        # Counting carries on in memory: the limit still holds on this node.
        assert await node.on_connect("192.0.2.70", "smtp") is None
        assert await node.on_connect("192.0.2.70", "smtp") is None
        assert await node.on_connect("192.0.2.70", "smtp") is not None
        # Bans are still made and kept locally.
        await node.login_failed("192.0.2.71", "a@example.test", "imap")
        await node.login_failed("192.0.2.71", "a@example.test", "imap")
        assert node.is_banned("192.0.2.71") is not None
    finally:
        redis_server.start()


async def test_greylisting_fails_open_without_redis(
    make_node: Factory, redis_server: RedisTestServer
) -> None:
    node = await make_node(greylisting=True)
    redis_server.stop()
    try:
        assert await node.on_rcpt("192.0.2.80", "s@x.example", "a@example.test", True) is None
    finally:
        redis_server.start()


async def test_a_node_starts_while_redis_is_down(
    make_node: Factory, redis_server: RedisTestServer
) -> None:
    redis_server.stop()
    try:
        node = await make_node(connections_per_ip_per_minute=1)
        assert await node.on_connect("192.0.2.90", "smtp") is None
        assert await node.on_connect("192.0.2.90", "smtp") is not None
    finally:
        redis_server.start()
