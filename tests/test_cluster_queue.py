"""The fronts' shared queue (issue #20, cluster/sharedq.py): a dead front's mail is taken over.

A real cluster as in test_cluster.py (two fronts, two mailbox nodes, the directory in
PostgreSQL, Redis over TLS, SeaweedFS as the object store), with ``[cluster] queue_store`` on
both fronts and a short lease. A front killed with -9 while it holds relay copies (their
mailbox node down) and outbound mail (the remote MX down) has them taken over by the other
front once its lease lapses, and every message arrives exactly once; the front that comes back
drops what was taken. Two coordinators on the real Redis never hold one claim at once.

Per recipient: a front that delivered some recipients of a message (and queued the notice for
one refused) and then died has only the others sent by the front that takes over, and the
notice is not sent twice. ``postvern queue delete`` on a front removes the entry from its
queue, the object store and Redis, and the front's next start does not bring it back. A front
frozen (SIGSTOP) in the middle of a transaction past its lease sends nothing of the mail taken
over when it runs again. A front that is no longer in nodes.toml has its mail taken over too.
"""

from __future__ import annotations

import asyncio
import collections
import email.policy
import os
import signal
import smtplib
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio

from cluster_kit import (
    FRONTS,
    OUTSIDE_SENDER,
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
from mta_kit import Sink, _SinkHandler
from pg_server import PostgresTestServer
from postvern import cli
from postvern.app import App
from postvern.backup.targets import open_target
from postvern.cluster.relay import RELAY_DIR, SUFFIX
from postvern.cluster.sharedq import KEY_PREFIX, OUTBOUND, Coordinator, SharedStore
from postvern.delivery.headers import new_queue_id
from postvern.mta.dsn import _SUBJECTS, Action
from postvern.smtp.address import Address
from postvern.smtp.commands import RcptParams
from postvern.smtp.replies import Reply
from postvern.smtp.session import SessionState, serve_smtp
from seaweed import Weed

# The fronts' lease: short, so the test waits little for a lapse (the default is 10 s).
LEASE_SECONDS = 2.0
# Bounds a broken cluster; no time is asserted.
WAIT = 90.0
REMOTE = "remote.test"
# The claim test's time to live and renewal interval (seconds).
CLAIM_TTL = 3.0
RENEW = 0.5


class _Handler(_SinkHandler):
    """The sink's handler, with the scripted answers and holds of :class:`ThreadSink`."""

    def __init__(self, sink: Sink, owner: ThreadSink) -> None:
        super().__init__(sink)
        self.owner = owner

    async def on_rcpt(self, state: SessionState, recipient: Address, params: RcptParams) -> Reply:
        address = str(recipient)
        owner = self.owner
        owner.rcpts[address] += 1
        if address.startswith("bounce-"):
            return Reply(550, "5.1.1", "No such user here")
        if address in owner.deferred:
            return Reply(451, "4.3.0", "Try again later")
        if address in owner.holds and address not in owner.held:
            owner.held.add(address)  # the first RCPT of it waits until the test lets it go
            await owner.holds[address].wait()
        return await super().on_rcpt(state, recipient, params)


class ThreadSink:
    """mta_kit's SMTP sink on its own event loop in a thread, stopped and started at will.

    It refuses ``bounce-*`` recipients (550), defers those in ``deferred`` (451), and answers
    the first RCPT of an address given to :meth:`hold` only once :meth:`let_go` is called."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sink: Sink | None = None
        self.received: list[tuple[list[str], bytes]] = []
        self.rcpts: collections.Counter[str] = collections.Counter()
        self.deferred: set[str] = set()
        self.holds: dict[str, asyncio.Event] = {}
        self.held: set[str] = set()  # holds reached

    def start(self) -> None:
        sink = Sink("127.0.0.1", self.port, None)

        async def start() -> Sink:
            sink.server = await serve_smtp(
                "127.0.0.1", self.port, lambda: _Handler(sink, self), hostname="sink"
            )
            return sink

        self.sink = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def stop(self) -> None:
        if self.sink is not None:
            asyncio.run_coroutine_threadsafe(self.sink.stop(), self.loop).result(30)
            self.received += [(r.recipients, r.message) for r in self.sink.received]
            self.sink = None

    def up(self) -> None:
        """Started, if it is not (the first test stops it and starts it again)."""
        if self.sink is None:
            self.start()

    def hold(self, address: str) -> None:
        self.holds[address] = asyncio.Event()  # set from the sink's loop only (let_go)

    def let_go(self, address: str) -> None:
        self.loop.call_soon_threadsafe(self.holds[address].set)

    def deliveries(self) -> list[tuple[list[str], bytes]]:
        now = [(r.recipients, r.message) for r in self.sink.received] if self.sink else []
        return self.received + now

    def messages(self) -> list[bytes]:
        return [message for _, message in self.deliveries()]

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


# -- per recipient, queue delete, a frozen front, a front gone from nodes.toml ------------------


World = tuple[ClusterKit, ThreadSink, str, TlsRedis]


@pytest.fixture
def live(world: World) -> World:
    """The cluster with the remote MX up (the first test stops it and starts it again)."""
    world[1].up()
    return world


def _sender(kit: ClusterKit) -> str:
    """A local user, whose notices come back through the relay."""
    return next(a for a in kit.passwords if kit.owner(a) == "mbx2")


def _submit_to(kit: ClusterKit, front: str, sender: str, to: list[str], subject: str) -> str:
    """One submitted message to several recipients; its queue id, from the 250."""
    host, port = kit.front(front).addr("submission")
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.starttls(context=client_tls_context())
        smtp.login(sender, kit.passwords[sender])
        smtp.mail(sender)
        for address in to:
            assert smtp.rcpt(address)[0] == 250
        msg = message(", ".join(to), subject, sender)
        code, reply = smtp.data(msg.as_bytes(policy=email.policy.SMTP))
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def _redis(redis_server: TlsRedis, *words: str) -> int:
    """An integer reply (HLEN, EXISTS, SISMEMBER)."""
    reply = redis_server.command(" ".join(words).encode())
    assert reply.startswith(b":"), reply
    return int(reply[1:].strip())


def _progress(entry_id: str) -> str:
    return f"{KEY_PREFIX}:progress:{entry_id}"


def _copies(sink: ThreadSink, subject: str) -> list[list[str]]:
    """The recipients of each copy of ``subject`` the remote MX took."""
    return [rcpts for rcpts, m in sink.deliveries() if f"Subject: {subject}".encode() in m]


def _bounces(kit: ClusterKit, front: str, address: str) -> int:
    return inbox_subjects(kit, front, address).count(_SUBJECTS[Action.FAILED])


def _local_entry(kit: ClusterKit, front: str, entry_id: str) -> bool:
    """The front's own queue holds ``entry_id`` (`postvern queue show`, as an operator)."""
    return cli.main(["--data", str(kit.front(front).path), "queue", "show", entry_id]) == 0


def _restart_front2(kit: ClusterKit) -> None:
    """front2 again, and its shared queue reconciled: a message accepted through it waits
    for the reconciliation (sharedq.Gate) before its 250."""
    kit.start("front2")
    local = next(a for a in kit.passwords if kit.owner(a) == "mbx1")
    send_mx(kit, "front2", local, f"after restart {uuid.uuid4().hex[:8]}")


def test_a_takeover_sends_only_to_the_recipients_not_finished_and_no_notice_twice(
    live: World,
) -> None:
    kit, sink, store, redis_server = live
    sender = _sender(kit)
    tag = uuid.uuid4().hex[:8]
    done, refused, late = (f"{k}-{tag}@{REMOTE}" for k in ("done", "bounce", "late"))
    subject = f"per recipient {tag}"
    bounces = _bounces(kit, "front1", sender)
    sink.deferred.add(late)  # the remote MX takes one now, refuses one, defers one
    entry_id = _submit_to(kit, "front2", sender, [done, refused, late], subject)
    _until(lambda: _copies(sink, subject) == [[done]], "front2 delivers one recipient")
    _until(lambda: _bounces(kit, "front1", sender) == bounces + 1, "the refusal's notice")
    # Both finished recipients are in Redis, sealed, keyed by entry (no address in it).
    assert _redis(redis_server, "HLEN", _progress(entry_id)) == 2
    assert tag.encode() not in redis_server.command(f"HGETALL {_progress(entry_id)}".encode())
    kit.procs["front2"].kill()  # SIGKILL with one recipient left
    try:
        _until(lambda: not _names(store, "front2"), "front1 takes front2's mail over")
        sink.deferred.discard(late)
        _until(lambda: len(_copies(sink, subject)) == 2, "front1 sends the one left")
        _until(lambda: not _redis(redis_server, "EXISTS", _progress(entry_id)), "progress goes")
        _until(lambda: f"front1/{OUTBOUND}/{entry_id}" not in _names(store, "front1"), "object")
    finally:
        sink.deferred.discard(late)
        _restart_front2(kit)
    # At least once per recipient: the finished ones were not sent again, the refused one was
    # not offered again, and its notice reached the sender once.
    assert sorted(_copies(sink, subject)) == sorted([[done], [late]])
    assert sink.rcpts[refused] == 1 and sink.rcpts[done] == 1
    assert _bounces(kit, "front2", sender) == bounces + 1


def test_queue_delete_on_a_front_removes_the_entry_everywhere(live: World) -> None:
    kit, sink, store, redis_server = live
    sender = _sender(kit)
    tag = uuid.uuid4().hex[:8]
    done, waiting = f"done-{tag}@{REMOTE}", f"waiting-{tag}@{REMOTE}"
    subject = f"deleted {tag}"
    sink.deferred.add(waiting)
    try:
        entry_id = _submit_to(kit, "front2", sender, [done, waiting], subject)
        _until(lambda: _copies(sink, subject) == [[done]], "one recipient delivered")
        _until(lambda: _redis(redis_server, "HLEN", _progress(entry_id)) == 1, "its progress")
        assert f"front2/{OUTBOUND}/{entry_id}" in _names(store, "front2")
        assert _local_entry(kit, "front2", entry_id)
        assert cli.main(["--data", str(kit.front("front2").path), "queue", "delete", entry_id]) == 0
        assert f"front2/{OUTBOUND}/{entry_id}" not in _names(store, "front2")
        assert not _redis(redis_server, "EXISTS", _progress(entry_id))
        assert not _local_entry(kit, "front2", entry_id)
        # The next start reconciles with the store: nothing to fetch back.
        kit.procs["front2"].stop()
        _restart_front2(kit)
        assert not _local_entry(kit, "front2", entry_id)
        assert f"front2/{OUTBOUND}/{entry_id}" not in _names(store, "front2")
        assert not any(entry_id in name for name in _names(store, "front1"))
    finally:
        sink.deferred.discard(waiting)
    assert sink.rcpts[waiting] >= 1 and _copies(sink, subject) == [[done]]


def test_a_front_frozen_past_its_lease_sends_nothing_taken_over(live: World) -> None:
    kit, sink, store, _ = live
    sender = _sender(kit)
    tag = uuid.uuid4().hex[:8]
    slow = f"slow-{tag}@{REMOTE}"
    subject = f"frozen {tag}"
    sink.hold(slow)  # front2's RCPT is answered only after it was frozen and taken over
    _submit_to(kit, "front2", sender, [slow], subject)
    _until(lambda: slow in sink.held, "front2 is in the middle of its transaction")
    proc = kit.procs["front2"].proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)  # a frozen VM: its lease and claim lapse
    try:
        _until(lambda: not _names(store, "front2"), "front1 takes the frozen front's mail")
        _until(lambda: _copies(sink, subject) == [[slow]], "front1 delivers it")
    finally:
        sink.let_go(slow)  # front2's RCPT is answered: it would send DATA next
        os.kill(proc.pid, signal.SIGCONT)
    # front2 asks Redis before DATA, finds the claim no longer its own, sends nothing, and
    # drops the entry when it reconciles.
    _until(lambda: metrics(kit, "front2")["postvern_outbound_in_flight"] == 0, "its attempt")
    _until(lambda: metrics(kit, "front2")["postvern_queue_entries"] == 0, "it reconciles")
    assert sink.rcpts[slow] == 2
    assert _copies(sink, subject) == [[slow]]


def test_the_mail_of_a_front_gone_from_nodes_toml_is_taken_over(live: World) -> None:
    kit, sink, store, redis_server = live
    # front3 shared its queue once (it is in Redis' set of fronts) and has left nodes.toml,
    # with an outbound entry still in the store under its prefix.
    app = App.open(kit.seed.path)
    try:
        key = app.server_key.derive("cluster queue")
    finally:
        app.close()
    gone = SharedStore(open_target(store), "front3", key)
    tag = uuid.uuid4().hex[:8]
    entry_id, to, subject = new_queue_id(), f"left-{tag}@{REMOTE}", f"left behind {tag}"
    envelope = {"from": OUTSIDE_SENDER, "rcpts": [[to, None, None]], "envid": None, "ret": None,
                "utf8": False}  # fmt: skip
    data = message(to, subject).as_bytes(policy=email.policy.SMTP)
    gone.put(OUTBOUND, entry_id, gone.seal(entry_id, envelope, data))
    assert _redis(redis_server, "SADD", f"{KEY_PREFIX}:fronts", "front3") == 1
    _until(lambda: _copies(sink, subject) == [[to]], "a live front delivers front3's entry")
    _until(lambda: not _names(store, "front3"), "front3's objects are moved")
    _until(
        lambda: not _redis(redis_server, "SISMEMBER", f"{KEY_PREFIX}:fronts", "front3"),
        "front3, empty and not in nodes.toml, is no longer looked at",
    )
    assert _copies(sink, subject) == [[to]]
