"""Automatic failover of a dead mailbox node (issue #20, cluster/liveness.py).

The smallest cluster that shows it, started once: one front, two mailbox nodes, the directory
in PostgreSQL, Redis over TLS, each mailbox node replicating to SeaweedFS, and
``[cluster] failover_after`` set on all three. No administrator's command fails anything over:

* mbx1 is killed with -9; once its liveness lease has lapsed past the margin the front fails
  it over by itself, and its user's mail — sent before the kill and after it — is read on
  mbx2; the front counts it in /metrics and ``cluster status`` shows it. mbx1 restarted says
  it was failed over and serves nobody until ``cluster rejoin``.
* mbx2 is frozen (SIGSTOP) past its lease with an IMAP session open; its users are failed
  over to mbx1; when it resumes, the open session is ended before it can write, and the node
  refuses the moved users (LMTP, straight to it).

Without the cluster, against a real redis-server: a node cut off from Redis fences itself and
serves again once it holds its lease, and never after a failover mark; two fronts never both
hold the watcher lock. No time is asserted: waits are bounded only to catch a broken cluster.
"""

from __future__ import annotations

import asyncio
import imaplib
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cluster_kit import ClusterKit, TlsRedis, build, inbox_subjects, metrics, send_mx
from harness import client_tls_context, set_config
from pg_server import PostgresTestServer
from postvern import cli
from postvern.app import App
from postvern.cluster import liveness, nodes, pki
from postvern.cluster.liveness import MIN_FAILOVER_AFTER, NodeLease, Watcher
from postvern.directory.accounts import MAILBOX_DIR
from postvern.store.spool import SPOOL_DIR
from redis_server import RedisTestServer
from seaweed import Weed

FRONT = "front1"
NODES = ("mbx1", "mbx2")
# The smallest lease allowed: the test waits little for a lapse (the margin comes on top).
FAILOVER_AFTER = MIN_FAILOVER_AFTER
# Bounds a broken cluster (a failover here is the lease, the margin and a restore, on a
# loaded 2-core machine); no time is asserted.
WAIT = 180.0


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    pg_server: PostgresTestServer,
    seaweed: tuple[Weed, Weed],
) -> Iterator[ClusterKit]:
    redis = TlsRedis(tmp_path_factory.mktemp("redis")).start()
    prefix = f"autofailover-{uuid.uuid4().hex[:8]}"
    kit = build(
        tmp_path_factory.mktemp("cluster"),
        redis_url=redis.url,
        directory=pg_server.new_database().settings(),
        replica=lambda node: seaweed[0].url(f"{prefix}-{node}"),
    )
    set_config(kit.admin, "abuse", {"redis_url": redis.url})  # `cluster status`, `rejoin`
    for name in (FRONT, *NODES):
        set_config(kit.nodes[name].path, "cluster", {"failover_after": FAILOVER_AFTER})
    try:
        kit.start_all((*NODES, FRONT))
        yield kit
    finally:
        for proc in kit.procs.values():
            if proc.proc is not None:
                proc.proc.send_signal(signal.SIGCONT)  # a frozen node must be able to stop
        kit.stop_all()
        redis.stop()


def _until(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.3)


def _said(kit: ClusterKit, node: str, text: str) -> bool:
    return any(text in line for line in kit.procs[node].output)


def _status(kit: ClusterKit, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    capsys.readouterr()
    cli.main(["--data", str(kit.admin), "cluster", "status"])
    out = capsys.readouterr().out
    return {line.split("\t")[0]: line for line in out.splitlines() if "\t" in line}


def _lmtp_rcpt(kit: ClusterKit, node: str, address: str) -> bytes:
    """RCPT TO for ``address`` straight to ``node``'s LMTP, with the front's certificate."""
    cluster_dir = kit.front(FRONT).path / nodes.CLUSTER_DIR
    ctx = pki.NodeIdentity.in_dir(cluster_dir).client_context("lmtp")
    with socket.create_connection(kit.node_list[node].hostport, timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname=node) as tls:
            file = tls.makefile("rwb")
            file.readline()  # greeting
            for line in (b"LHLO front1", b"MAIL FROM:<a@outside.test>"):
                file.write(line + b"\r\n")
                file.flush()
                while file.readline()[3:4] == b"-":  # the last line of a reply has a space
                    pass
            file.write(f"RCPT TO:<{address}>\r\n".encode())
            file.flush()
            return file.readline()


def _front_request(kit: ClusterKit, node: str, line: str) -> bytes:
    """One request to ``node`` over ALPN postvern-failover with the front's certificate."""
    ctx = pki.NodeIdentity.in_dir(kit.front(FRONT).path / nodes.CLUSTER_DIR).client_context(
        "postvern-failover"
    )
    with socket.create_connection(kit.node_list[node].hostport, timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname=node) as tls:
            tls.sendall(line.encode() + b"\r\n")
            return tls.recv(512)


def test_a_front_may_only_probe_and_restore_from_another_nodes_replica(
    cluster: ClusterKit,
) -> None:
    assert _front_request(cluster, "mbx1", "STATUS").startswith(b"OK mailboxes-open=")
    for line in ("EVICT abc123", "EXPORT abc123", "RELEASE abc123 moved"):
        assert _front_request(cluster, "mbx1", line).startswith(b"NO MoveError: not allowed")
    own, other = cluster.node_list["mbx1"].replica, cluster.node_list["mbx2"].replica
    for url in (own, "s3://elsewhere/bucket", "file:///etc"):
        answer = _front_request(cluster, "mbx1", f"RESTORE abc123 {url}")
        assert answer.startswith(b"NO MoveError: not the replica of a mailbox node")
    assert not _front_request(cluster, "mbx1", f"RESTORE abc123 {other}").startswith(
        b"NO MoveError: not"
    )  # allowed (it fails later: no such user in the replica)


def test_a_killed_node_is_failed_over_by_the_front_without_an_administrator(
    cluster: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    address = cluster.users_on("mbx1")[0]
    before = f"before the kill {uuid.uuid4().hex[:8]}"
    send_mx(cluster, FRONT, address, before)
    _until(lambda: before in inbox_subjects(cluster, FRONT, address), "delivery to mbx1")
    cluster.procs["mbx1"].kill()
    after = f"after the kill {uuid.uuid4().hex[:8]}"
    send_mx(cluster, FRONT, address, after)  # queued on the front: its node is dead

    _until(lambda: not cluster.users_on("mbx1"), "the automatic failover of mbx1")
    assert cluster.owner(address) == "mbx2"
    _until(
        lambda: {before, after} <= set(inbox_subjects(cluster, FRONT, address)),
        "both messages readable on mbx2",
    )
    gauges = metrics(cluster, FRONT)
    assert gauges["postvern_cluster_nodes_failed_over_total"] == 1
    assert gauges["postvern_cluster_users_failed_over_total"] >= 1
    assert gauges["postvern_cluster_failover_watching"] == 1
    assert "FAILED OVER automatically by front1" in _status(cluster, capsys)["mbx1"]
    assert _said(cluster, FRONT, "mailbox node mbx1 failed over automatically")
    assert not _said(cluster, FRONT, address)  # the log names no user

    # Back, it says what happened and serves nobody, not even to its certificate's fronts.
    cluster.start("mbx1")
    assert _said(cluster, "mbx1", "mailbox node mbx1 was failed over (by front1")
    assert _said(cluster, "mbx1", "mailbox files of users the directory places on other")
    assert _lmtp_rcpt(cluster, "mbx1", address).startswith(b"451")
    assert "serving=no" in _status(cluster, capsys)["mbx1"]

    # The administrator sets the stale files aside and lets it rejoin: it holds its lease
    # again and serves whoever the map places on it (nobody yet).
    data, aside = cluster.nodes["mbx1"].path, cluster.root / "mbx1-aside"
    for folder in (MAILBOX_DIR, SPOOL_DIR):
        (aside / folder).mkdir(parents=True)
        for stale in (data / folder).iterdir() if (data / folder).is_dir() else ():
            stale.rename(aside / folder / stale.name)
    capsys.readouterr()
    assert cli.main(["--data", str(cluster.admin), "cluster", "rejoin", "mbx1"]) == 0
    _until(lambda: _said(cluster, "mbx1", "liveness lease held, serving"), "mbx1 rejoined")
    assert "lease=held" in _status(cluster, capsys)["mbx1"]


@contextmanager
def _frozen(kit: ClusterKit, node: str) -> Iterator[None]:
    """SIGSTOP: the node renews nothing, fences nothing and answers nothing; SIGCONT after."""
    proc = kit.procs[node].proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def test_a_node_frozen_past_its_lease_is_fenced_when_it_resumes(cluster: ClusterKit) -> None:
    """After the test above: every user is on mbx2, and mbx1 serves again."""
    _until(lambda: _said(cluster, "mbx1", "liveness lease held, serving"), "mbx1 serving")
    address = cluster.users_on("mbx2")[0]
    host, port = cluster.front(FRONT).addr("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30)
    imap.login(address, cluster.passwords[address])
    imap.select("INBOX")  # a session open on mbx2, through the front

    with _frozen(cluster, "mbx2"):
        # Every user, not just this one: the front restores several side by side and flips
        # each when its restore is done (one that failed under load is tried again later).
        _until(lambda: not cluster.users_on("mbx2"), "the automatic failover of mbx2")
    assert cluster.owner(address) == "mbx1"

    # The open session was ended before it could write; the append reached no mailbox.
    written = f"written after the resume {uuid.uuid4().hex[:8]}"
    raw = f"Subject: {written}\r\nFrom: a@outside.test\r\n\r\nbody\r\n".encode()
    try:
        typ, _ = imap.append("INBOX", "", imaplib.Time2Internaldate(time.time()), raw)
        assert typ != "OK"
    except (imaplib.IMAP4.abort, imaplib.IMAP4.error, ConnectionError, ssl.SSLError):
        pass  # BYE, or the connection closed (not a timeout: the node must have answered)
    _until(lambda: _said(cluster, "mbx2", "mailbox node mbx2 fenced"), "mbx2 says it fenced")
    assert _lmtp_rcpt(cluster, "mbx2", address).startswith(b"451")
    assert written not in inbox_subjects(cluster, FRONT, address)  # read on mbx1
    app = App.open(cluster.seed.path)
    try:
        assert not app.directory.users_on_node("mbx2")
    finally:
        app.close()
    # Mail sent now reaches the user on mbx1.
    later = f"after the freeze {uuid.uuid4().hex[:8]}"
    send_mx(cluster, FRONT, address, later)
    _until(lambda: later in inbox_subjects(cluster, FRONT, address), "delivery to mbx1")


async def _eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        await asyncio.sleep(0.1)


async def test_a_node_cut_off_from_redis_fences_itself_until_it_holds_its_lease(
    tmp_path: Path,
) -> None:
    redis = RedisTestServer(tmp_path).start()
    lease = NodeLease(liveness.client(redis.url), "mbx9", MIN_FAILOVER_AFTER)
    fenced: list[bool] = []
    lease.on_fence = lambda: fenced.append(lease.serving())
    try:
        assert not lease.serving()  # nothing before its first renewal
        await lease.renew_once()
        assert lease.serving()
        redis.stop()
        await lease.renew_once()  # refused: still within its lease
        await _eventually(lambda: bool(fenced), "the node fences itself")
        assert fenced == [False] and not lease.serving()
        redis.start()  # same port; the lease expired with the old process's memory anyway
        await lease.renew_once()
        assert lease.serving()
        # A front failed it over meanwhile: the mark stops it at once, for good.
        await lease.redis.set(liveness.key("lease", "mbx9"), "failed-over:front9:0")
        await lease.renew_once()
        assert not lease.serving()
        assert lease.failed_over.startswith("by front9 at 1970-01-01")
        assert len(fenced) == 2
    finally:
        await lease.stop()
        redis.stop()


async def test_one_front_holds_the_watcher_lock_until_it_lets_go(tmp_path: Path) -> None:
    redis = RedisTestServer(tmp_path).start()
    # The lock needs no cluster: no node is ever looked at here.
    first, second = (Watcher(liveness.client(redis.url), f, None) for f in ("f1", "f2"))
    try:
        assert await first._hold_lock()
        assert not await second._hold_lock()
        assert await first._hold_lock()  # renewed
        assert not await second._hold_lock()
        await first.stop()  # compare-and-delete
        assert await second._hold_lock()
    finally:
        await second.stop()
        redis.stop()
