"""The fronts' shared queue (issue #20, cluster/sharedq.py): a dead front's mail is taken over.

A real cluster as in test_cluster.py (two fronts, two mailbox nodes, the directory in
PostgreSQL, Redis over TLS, SeaweedFS as the object store), with ``[cluster] queue_store`` on
both fronts and a short lease. A front killed with -9 while it holds relay copies (their
mailbox node down) and outbound mail (the remote MX down) has them taken over by the other
front once its lease lapses, and every message arrives exactly once; the front that comes back
drops what was taken. Two coordinators on the real Redis never hold one claim at once.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio

from cluster_kit import (
    FRONTS,
    ClusterKit,
    TlsRedis,
    build,
    inbox_subjects,
    message,
    metrics,
    send_mx,
)
from dnsserver import DNSTestServer
from harness import client_tls_context, free_port, set_config
from mta_kit import Sink
from pg_server import PostgresTestServer
from postvern.backup.targets import open_target
from postvern.cluster.relay import RELAY_DIR, SUFFIX
from postvern.cluster.sharedq import Coordinator
from seaweed import Weed

# The fronts' lease: short, so the test waits little for a lapse (the default is 10 s).
LEASE_SECONDS = 2.0
# Bounds a broken cluster; no time is asserted.
WAIT = 90.0
REMOTE = "remote.test"
# The claim test's time to live and renewal interval (seconds).
CLAIM_TTL = 3.0
RENEW = 0.5


class ThreadSink:
    """mta_kit's SMTP sink on its own event loop in a thread, stopped and started at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sink: Sink | None = None
        self.received: list[bytes] = []

    def start(self) -> None:
        sink = Sink("127.0.0.1", self.port, None)
        self.sink = asyncio.run_coroutine_threadsafe(sink.start(), self.loop).result(30)

    def stop(self) -> None:
        if self.sink is not None:
            asyncio.run_coroutine_threadsafe(self.sink.stop(), self.loop).result(30)
            self.received += [r.message for r in self.sink.received]
            self.sink = None

    def messages(self) -> list[bytes]:
        now = [r.message for r in self.sink.received] if self.sink is not None else []
        return self.received + now

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    pg_server: PostgresTestServer,
    seaweed: tuple[Weed, Weed],
) -> Iterator[tuple[ClusterKit, ThreadSink, str, TlsRedis]]:
    redis_server = TlsRedis(tmp_path_factory.mktemp("redis")).start()
    dns = DNSTestServer().start()
    sink = ThreadSink(free_port())
    dns.add(REMOTE, "MX", (10, f"mx.{REMOTE}"))
    dns.add(f"mx.{REMOTE}", "A", "127.0.0.1")
    store = seaweed[0].url(f"queue-{uuid.uuid4().hex[:8]}")
    kit = build(
        tmp_path_factory.mktemp("cluster"),
        redis_url=redis_server.url,
        directory=pg_server.new_database().settings(),
    )
    for name in FRONTS:
        path = kit.front(name).path
        set_config(path, "cluster", {"queue_store": store, "lease_seconds": LEASE_SECONDS})
        set_config(path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
        set_config(
            path,
            "mta",
            {"allow_loopback_mx": True, "port": sink.port, "retry_base": 0.5,
             "connect_timeout": 2.0},
        )  # fmt: skip
    try:
        kit.start_all()
        yield kit, sink, store, redis_server
    finally:
        kit.stop_all()
        sink.close()
        dns.stop()
        redis_server.stop()


def _submit(kit: ClusterKit, front: str, sender: str, to: str, subject: str) -> None:
    host, port = kit.front(front).addr("submission")
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.starttls(context=client_tls_context())
        smtp.login(sender, kit.passwords[sender])
        smtp.send_message(message(to, subject, sender))


def _names(store: str, front: str) -> set[str]:
    return set(open_target(store).list(f"{front}/"))


def _objects(store: str, front: str) -> dict[str, bytes]:
    """The front's objects and their bytes (while nobody moves them)."""
    target = open_target(store)
    return {name: target.get(name) for name in target.list(f"{front}/")}


def _until(predicate: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.2)


def _subject_count(messages: list[bytes], subject: str) -> int:
    return sum(f"Subject: {subject}".encode() in m for m in messages)


def test_a_killed_fronts_relay_and_outbound_mail_is_taken_over_and_arrives_once(
    world: tuple[ClusterKit, ThreadSink, str, TlsRedis],
) -> None:
    kit, sink, store, _ = world
    local = next(a for a in kit.passwords if kit.owner(a) == "mbx1")
    sender = next(a for a in kit.passwords if kit.owner(a) == "mbx2")
    tag = uuid.uuid4().hex[:8]
    relayed = [f"relay {tag} {i}" for i in range(3)]
    outbound = [f"outbound {tag} {i}" for i in range(3)]
    kit.procs["mbx1"].stop()  # the relay copies wait on front2 ...
    try:
        for subject in relayed:
            send_mx(kit, "front2", local, subject)
        for subject in outbound:  # ... and so does the outbound mail: the sink is down
            _submit(kit, "front2", sender, f"someone@{REMOTE}", subject)
        # 250 meant: in the object store under front2's prefix, sealed.
        held = _objects(store, "front2")
        assert sum(n.startswith("front2/relay/") for n in held) >= len(relayed)
        assert sum(n.startswith("front2/mta/") for n in held) >= len(outbound)
        assert not any(tag.encode() in data for data in held.values())
        # A live front's mail stays its own: front1 takes nothing while front2's lease holds.
        time.sleep(LEASE_SECONDS * 1.5)
        assert _names(store, "front2") >= set(held)
        assert metrics(kit, "front1")["postvern_cluster_queue_taken_over_total"] == 0
        kit.procs["front2"].kill()  # SIGKILL with all of it queued
        _until(lambda: not _names(store, "front2"), "front1 takes front2's mail over")
        taken = _names(store, "front1")
        assert sum(n.startswith("front1/relay/") for n in taken) >= len(relayed)
        assert sum(n.startswith("front1/mta/") for n in taken) >= len(outbound)
        assert metrics(kit, "front1")["postvern_cluster_queue_taken_over_total"] >= 6
    finally:
        kit.start("mbx1")
        sink.start()
    _until(
        lambda: all(_subject_count(sink.messages(), s) for s in outbound),
        "the outbound mail reaches the remote MX",
    )
    _until(lambda: set(relayed) <= set(inbox_subjects(kit, "front1", local)), "the relay copies")
    # front2 comes back: what was taken over is no longer its to deliver.
    kit.start("front2")
    relay_dir = kit.front("front2").path / RELAY_DIR
    _until(lambda: not list(relay_dir.glob(f"*{SUFFIX}")), "front2 drops the copies taken")
    _until(lambda: metrics(kit, "front2")["postvern_queue_entries"] == 0, "front2's queue")
    _until(lambda: not _names(store, "front1"), "front1 finishes and clears its objects")
    subjects = inbox_subjects(kit, "front2", local)
    assert all(subjects.count(s) == 1 for s in relayed), subjects
    assert all(_subject_count(sink.messages(), s) == 1 for s in outbound)


def test_two_live_fronts_never_hold_one_claim_and_a_lapsed_lease_is_seen(
    world: tuple[ClusterKit, ThreadSink, str, TlsRedis],
) -> None:
    _, _, _, redis_server = world

    async def scenario() -> None:
        clients = [redis.asyncio.Redis.from_url(redis_server.url) for _ in range(2)]
        # A time to live far above a renewal's round trip on a loaded machine; renewed every
        # RENEW seconds, as fronts do every third of theirs.
        a, b = (Coordinator(c, f"f{i}", ttl=CLAIM_TTL) for i, c in enumerate(clients))
        try:
            for c in (a, b):
                c.ready.set()
                await c.take_lease()
            ids = [f"msg-{uuid.uuid4().hex}" for _ in range(50)]
            got_a, got_b = await asyncio.gather(a.claim(ids), b.claim(ids[::-1]))
            assert not got_a & got_b and got_a | got_b == set(ids)
            # The holder renews past the claim's time to live; the other never gets it.
            for _ in range(round(1.5 * CLAIM_TTL / RENEW)):
                await asyncio.sleep(RENEW)
                assert await a.renew() and await b.renew()
                assert not await b.claim(sorted(got_a))
            await a.release(sorted(got_a))
            assert await b.claim(sorted(got_a)) == got_a
            # a stops renewing (as if killed): its lease lapses, b sees it and can lock it.
            assert await b.lapsed(["f0", "f1"]) == []
            deadline = time.monotonic() + WAIT
            while await b.lapsed(["f0", "f1"]) != ["f0"]:
                assert time.monotonic() < deadline
                await asyncio.sleep(RENEW)
                assert await b.renew()
            assert await b.lock("f0") and not await a.lock("f0")
            await b.unlock("f0")
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(scenario())
