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

No time is asserted: waits are bounded only to catch a broken cluster.
"""

from __future__ import annotations

import imaplib
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from cluster_kit import ClusterKit, TlsRedis, build, inbox_subjects, metrics, send_mx
from harness import client_tls_context, set_config
from pg_server import PostgresTestServer
from postvern import cli
from postvern.app import App
from postvern.cluster import nodes, pki
from postvern.cluster.liveness import MIN_FAILOVER_AFTER
from postvern.directory.accounts import MAILBOX_DIR
from postvern.store.spool import SPOOL_DIR
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
        for name in (*NODES, FRONT):
            kit.start(name)
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


def _users_on(kit: ClusterKit, node: str) -> list[str]:
    return [a for a in kit.passwords if kit.owner(a) == node]


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


def test_a_killed_node_is_failed_over_by_the_front_without_an_administrator(
    cluster: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    address = _users_on(cluster, "mbx1")[0]
    before = f"before the kill {uuid.uuid4().hex[:8]}"
    send_mx(cluster, FRONT, address, before)
    _until(lambda: before in inbox_subjects(cluster, FRONT, address), "delivery to mbx1")
    cluster.procs["mbx1"].kill()
    after = f"after the kill {uuid.uuid4().hex[:8]}"
    send_mx(cluster, FRONT, address, after)  # queued on the front: its node is dead

    _until(lambda: not _users_on(cluster, "mbx1"), "the automatic failover of mbx1")
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
    address = _users_on(cluster, "mbx2")[0]
    host, port = cluster.front(FRONT).addr("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30)
    imap.login(address, cluster.passwords[address])
    imap.select("INBOX")  # a session open on mbx2, through the front

    with _frozen(cluster, "mbx2"):
        _until(lambda: cluster.owner(address) == "mbx1", "the automatic failover of mbx2")

    # The open session was ended before it could write; the append reached no mailbox.
    written = f"written after the resume {uuid.uuid4().hex[:8]}"
    raw = f"Subject: {written}\r\nFrom: a@outside.test\r\n\r\nbody\r\n".encode()
    try:
        typ, _ = imap.append("INBOX", "", imaplib.Time2Internaldate(time.time()), raw)
        assert typ != "OK"
    except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError, ssl.SSLError):
        pass  # BYE, or the connection closed
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
