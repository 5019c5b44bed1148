"""A real cluster on loopback (issue #20): two fronts, two mailbox nodes, the directory in
PostgreSQL and Redis, both over verified TLS.

Mail goes in through either front (MX and submission) and is read through either front
(IMAP, POP3) whichever mailbox node owns the user; the internal listener refuses anything
but a front's certificate from the cluster's own CA; a mailbox node that is down does not
lose mail a front accepted; a killed mailbox node's users come back on the other from their
replicas in SeaweedFS with every acknowledged message exactly once (run last of all the
tests on the session's shared cluster, tests/cluster_shared.py, as is the drain before it).
"""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster_kit import (
    FRONTS,
    MAILBOX_NODES,
    ClusterKit,
    TlsRedis,
    enable_replicas,
    inbox_subjects,
    message,
    metrics,
    send_mx,
)
from harness import client_tls_context, free_port, make_data_dir, set_config
from postvern import cli, config
from postvern.app import App
from postvern.cluster import nodes, pki, placement, proxyline
from postvern.cluster import relay as relay_module
from postvern.cluster.admin import admin_identity
from postvern.cluster.move import MOVED_DIR
from postvern.cluster.relay import RELAY_DIR
from postvern.directory.db import DB_NAME
from postvern.store.mailbox import Mailbox
from postvern.store.service import _append_item
from postvern.store.spool import Spool, SpoolItem, import_spool
from seaweed import Weed
from test_imap_clients import CONFIG, RELAY, maildir_messages, mbsync

# How long a test waits for a relayed copy to show up: the relay sends at once, so this only
# bounds a broken cluster (no time is asserted).
ARRIVAL_WAIT = 60.0


@pytest.fixture(scope="module")
def cluster(shared_cluster: ClusterKit) -> ClusterKit:
    """The session's cluster (tests/cluster_shared.py). The two tests marked
    ``last_on_shared_cluster`` (the drain, and the failover, which kills mbx1 for good) run
    after every other test that shares it."""
    return shared_cluster


@pytest.fixture
def replicating(cluster: ClusterKit, seaweed: tuple[Weed, Weed]) -> ClusterKit:
    """The shared cluster with its mailbox nodes restarted replicating to SeaweedFS every
    REPLICATE_SECONDS, nodes.toml naming the replicas (cluster_kit.enable_replicas): for the
    failover, the last test on it. (The others run without: a front keeps each copy a
    replicating node acknowledged until a replication covers it.)"""
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    for name in MAILBOX_NODES:
        cluster.procs[name].stop()
    enable_replicas(cluster, lambda node: seaweed[0].url(f"{prefix}-{node}"))
    cluster.start_all(MAILBOX_NODES)
    return cluster


def _imap(kit: ClusterKit, front: str, address: str) -> imaplib.IMAP4_SSL:
    host, port = kit.front(front).addr("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30)
    imap.login(address, kit.passwords[address])
    return imap


def _wait_for(kit: ClusterKit, front: str, address: str, subject: str) -> list[str]:
    deadline = time.monotonic() + ARRIVAL_WAIT
    while True:
        subjects = inbox_subjects(kit, front, address)
        if subject in subjects or time.monotonic() > deadline:
            return subjects
        time.sleep(0.2)


def test_mail_in_and_out_through_both_fronts_for_users_on_both_nodes(cluster: ClusterKit) -> None:
    for node in MAILBOX_NODES:
        address = cluster.users_on(node)[0]
        for sender_front, reader_front in (("front1", "front2"), ("front2", "front1")):
            subject = f"via {sender_front} to {node} {uuid.uuid4().hex[:8]}"
            send_mx(cluster, sender_front, address, subject)
            assert _wait_for(cluster, reader_front, address, subject).count(subject) == 1


def test_submission_on_one_front_reaches_a_user_on_the_other_node(cluster: ClusterKit) -> None:
    sender = cluster.users_on("mbx1")[0]
    recipient = cluster.users_on("mbx2")[0]
    subject = f"submitted {uuid.uuid4().hex[:8]}"
    host, port = cluster.front("front2").addr("submission")
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.starttls(context=client_tls_context())
        smtp.login(sender, cluster.passwords[sender])
        msg = message(recipient, subject)
        msg.replace_header("From", sender)
        smtp.send_message(msg)
    assert _wait_for(cluster, "front1", recipient, subject).count(subject) == 1


def test_pop3_through_a_front_sees_the_owning_nodes_maildrop(cluster: ClusterKit) -> None:
    address = cluster.users_on("mbx2")[-1]
    subject = f"for pop3 {uuid.uuid4().hex[:8]}"
    send_mx(cluster, "front1", address, subject)
    assert subject in _wait_for(cluster, "front1", address, subject)
    host, port = cluster.front("front2").addr("pop3s")
    pop = poplib.POP3_SSL(host, port, context=client_tls_context(), timeout=30)
    try:
        pop.user(address)
        assert pop.pass_(cluster.passwords[address]).startswith(b"+OK")
        count, _ = pop.stat()
        texts = [b"\n".join(pop.retr(i + 1)[1]) for i in range(count)]
        assert sum(f"Subject: {subject}".encode() in t for t in texts) == 1
    finally:
        pop.quit()
    host, port = cluster.front("front1").addr("pop3")  # STLS at the front, then the node
    pop = poplib.POP3(host, port, timeout=30)
    try:
        pop.stls(context=client_tls_context())
        pop.user(address)
        assert pop.pass_(cluster.passwords[address]).startswith(b"+OK")
        assert any(subject.encode() in line for line in pop.top(count, 0)[1])
    finally:
        pop.quit()


@pytest.mark.parametrize("tls", ["IMAPS", "STARTTLS"])
def test_mbsync_syncs_down_and_up_through_a_front(
    cluster: ClusterKit, tmp_path: Path, tls: str
) -> None:
    """A real client (isync's mbsync, as tests/test_imap_clients.py runs it) through the
    proxy: TLS or STARTTLS at the front, everything after the login on the mailbox node."""
    address = cluster.users_on("mbx2")[0]
    subject = f"for mbsync {tls} {uuid.uuid4().hex[:6]}"
    send_mx(cluster, "front2", address, subject)
    assert subject in _wait_for(cluster, "front2", address, subject)
    home = tmp_path / "home"
    maildir = home / "mail"
    maildir.mkdir(parents=True)
    (home / "relay.py").write_text(RELAY)
    front = cluster.front("front1")
    (home / ".mbsyncrc").write_text(
        CONFIG.format(
            python=sys.executable,
            relay=home / "relay.py",
            port=front.addr("imaps" if tls == "IMAPS" else "imap")[1],
            user=address,
            password=cluster.passwords[address],
            tls=tls,
            cert=front.path / "tls" / "cert.pem",
            maildir=maildir,
        )
    )
    done = mbsync(home)
    assert done.returncode == 0, done.stderr
    down = maildir_messages(maildir / "INBOX")
    assert sum(f"Subject: {subject}".encode() in raw for raw in down.values()) == 1
    up = f"up from mbsync {tls} {uuid.uuid4().hex[:6]}"
    (maildir / "INBOX" / "new" / f"{time.time_ns()}.up:2,").write_bytes(
        f"From: {address}\nTo: {address}\nSubject: {up}\n\nwritten offline\n".encode()
    )
    done = mbsync(home)
    assert done.returncode == 0, done.stderr
    assert inbox_subjects(cluster, "front2", address).count(up) == 1  # on the node, via the other


def test_a_wrong_password_is_refused_at_the_front_and_the_right_one_then_works(
    cluster: ClusterKit,
) -> None:
    address = cluster.users_on("mbx1")[0]
    host, port = cluster.front("front1").addr("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(address, "not the password")
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login("nobody@example.test", "whatever")
        assert imap.login(address, cluster.passwords[address])[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"
    finally:
        imap.logout()


def test_idle_through_the_proxy_reports_a_delivery_made_through_the_other_front(
    cluster: ClusterKit,
) -> None:
    address = cluster.users_on("mbx2")[0]
    imap = _imap(cluster, "front2", address)
    try:
        _, data = imap.select("INBOX")
        before = int(data[0])
        imap.send(b"i1 IDLE\r\n")
        assert imap.readline().startswith(b"+")
        send_mx(cluster, "front1", address, f"wake {uuid.uuid4().hex[:8]}")
        line = imap.readline()  # the socket's timeout (30 s) bounds a missing report
        assert line == f"* {before + 1} EXISTS\r\n".encode()
        imap.send(b"DONE\r\n")
        while not (line := imap.readline()).startswith(b"i1 "):
            pass
        assert line.startswith(b"i1 OK")
    finally:
        imap.logout()


def test_a_front_reports_its_relay_queue_and_proxied_sessions_in_metrics(
    cluster: ClusterKit,
) -> None:
    address = cluster.users_on("mbx1")[0]
    subject = f"counted {uuid.uuid4().hex[:8]}"
    send_mx(cluster, "front1", address, subject)
    assert subject in _wait_for(cluster, "front1", address, subject)
    gauges = metrics(cluster, "front1")
    assert gauges["postvern_cluster_relayed_total"] >= 1
    assert gauges["postvern_cluster_proxied_sessions_total"] >= 1
    assert gauges["postvern_cluster_relay_queued"] >= 0


def _status(kit: ClusterKit, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    capsys.readouterr()
    code = cli.main(["--data", str(kit.admin), "cluster", "status"])
    out = capsys.readouterr().out
    return code, {line.split("\t")[0]: line for line in out.splitlines()}


def test_cluster_status_shows_every_node_and_its_users(
    cluster: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = _status(cluster, capsys)
    assert code == 0
    assert set(lines) == set(cluster.nodes)
    for node in MAILBOX_NODES:
        assert f"users={len(cluster.users_on(node))}\tup " in lines[node]


def test_mail_for_a_node_that_is_down_waits_on_the_front_sealed_and_arrives_later(
    cluster: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    address = cluster.users_on("mbx2")[0]
    subject = f"while down {uuid.uuid4().hex[:8]}"
    cluster.procs["mbx2"].stop()
    try:
        code, lines = _status(cluster, capsys)
        assert code == 1 and "DOWN" in lines["mbx2"] and "up " in lines["mbx1"]
        host, port = cluster.front("front2").addr("imaps")
        imap = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30)
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):  # not a failure
            imap.login(address, cluster.passwords[address])
        imap.logout()
        host, port = cluster.front("front1").addr("pop3s")
        pop = poplib.POP3_SSL(host, port, context=client_tls_context(), timeout=30)
        pop.user(address)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            pop.pass_(cluster.passwords[address])
        pop.quit()
        send_mx(cluster, "front1", address, subject)  # accepted: 250 from the front
        queued = [p for p in (cluster.front("front1").path / RELAY_DIR).iterdir() if p.is_file()]
        assert queued, "the accepted copy is in the front's relay queue"
        assert all(subject.encode() not in p.read_bytes() for p in queued)  # sealed at rest
        assert all(p.stat().st_mode & 0o077 == 0 for p in queued)
    finally:
        cluster.start("mbx2")
    assert _wait_for(cluster, "front2", address, subject).count(subject) == 1
    relay = cluster.front("front1").path / RELAY_DIR
    deadline = time.monotonic() + ARRIVAL_WAIT
    while any(p.is_file() for p in relay.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in relay.iterdir() if p.is_file()]


def test_a_front_killed_with_mail_in_its_relay_queue_delivers_it_after_restart(
    cluster: ClusterKit,
) -> None:
    address = cluster.users_on("mbx1")[0]
    subject = f"survives kill -9 {uuid.uuid4().hex[:8]}"
    cluster.procs["mbx1"].stop()
    try:
        send_mx(cluster, "front2", address, subject)  # 250: on the front's disk
        cluster.procs["front2"].kill()  # SIGKILL, as a crash or power cut
    finally:
        cluster.start("mbx1")
    cluster.start("front2")
    assert _wait_for(cluster, "front1", address, subject).count(subject) == 1


# -- mutual TLS on the internal listener ---------------------------------------------------


def _internal(kit: ClusterKit, node: str) -> tuple[str, int]:
    return kit.node_list[node].hostport


def _context(cluster_dir: Path, alpn: str, *, cert: bool = True) -> ssl.SSLContext:
    """A client context trusting the cluster CA, with a node's certificate or none."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cluster_dir / pki.CA_CERT))
    if cert:
        ctx.load_cert_chain(str(cluster_dir / pki.NODE_CERT), str(cluster_dir / pki.NODE_KEY))
    ctx.set_alpn_protocols([alpn])
    return ctx


def _first_bytes(address: tuple[str, int], ctx: ssl.SSLContext, name: str) -> bytes:
    """What the internal listener says first; b"" if it closed; raises if TLS failed."""
    with socket.create_connection(address, timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            return tls.recv(256)


def _refused(address: tuple[str, int], ctx: ssl.SSLContext, name: str) -> bool:
    """The handshake failed, or the listener closed without a byte of its service. (In TLS
    1.3 the client finishes its side first, so the server's refusal of its certificate may
    reach it as an alert on the first read or as a plain close.)"""
    try:
        return _first_bytes(address, ctx, name) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_the_internal_listener_answers_a_front_over_mutual_tls(cluster: ClusterKit) -> None:
    ctx = _context(cluster.front("front1").path / nodes.CLUSTER_DIR, "lmtp")
    assert _first_bytes(_internal(cluster, "mbx1"), ctx, "mbx1").startswith(b"220 mbx1 LMTP")


def test_the_internal_listener_refuses_a_client_without_a_certificate(
    cluster: ClusterKit,
) -> None:
    ctx = _context(cluster.front("front1").path / nodes.CLUSTER_DIR, "lmtp", cert=False)
    assert _refused(_internal(cluster, "mbx1"), ctx, "mbx1")


def test_the_internal_listener_refuses_a_certificate_from_another_ca(
    cluster: ClusterKit, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    issued = pki.issue_node(other, "front1", "front")  # same name and role, wrong CA
    ctx = _context(cluster.front("front1").path / nodes.CLUSTER_DIR, "lmtp", cert=False)
    ctx.load_cert_chain(str(issued / pki.NODE_CERT), str(issued / pki.NODE_KEY))
    assert _refused(_internal(cluster, "mbx1"), ctx, "mbx1")


def test_a_mailbox_nodes_certificate_may_not_act_as_a_front(cluster: ClusterKit) -> None:
    ctx = _context(cluster.nodes["mbx2"].path / nodes.CLUSTER_DIR, "lmtp")
    assert _refused(_internal(cluster, "mbx1"), ctx, "mbx1")


def test_only_the_admin_certificate_may_move_mailboxes_and_it_may_not_deliver(
    cluster: ClusterKit,
) -> None:
    front = _context(cluster.front("front1").path / nodes.CLUSTER_DIR, "postvern-admin")
    assert _refused(_internal(cluster, "mbx1"), front, "mbx1")
    admin_dir = cluster.admin / nodes.CLUSTER_DIR
    admin = admin_identity(admin_dir)
    for alpn in ("lmtp", "postvern-admin"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(admin.ca))
        ctx.load_cert_chain(str(admin.cert), str(admin.key))
        ctx.set_alpn_protocols([alpn])
        if alpn == "lmtp":
            assert _refused(_internal(cluster, "mbx1"), ctx, "mbx1")
        else:
            with socket.create_connection(_internal(cluster, "mbx1"), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="mbx1") as tls:
                    tls.sendall(b"STATUS\r\n")
                    assert tls.recv(256).startswith(b"OK mailboxes-open=")


def test_a_front_pins_the_name_of_the_node_it_meant_to_reach(cluster: ClusterKit) -> None:
    ctx = _context(cluster.front("front1").path / nodes.CLUSTER_DIR, "lmtp")
    with pytest.raises(ssl.SSLCertVerificationError):
        _first_bytes(_internal(cluster, "mbx1"), ctx, "mbx2")  # mbx1 answers: not mbx2


def test_a_connection_offering_no_internal_service_is_closed(cluster: ClusterKit) -> None:
    ctx = _context(cluster.front("front1").path / nodes.CLUSTER_DIR, "http/1.1")
    assert _refused(_internal(cluster, "mbx1"), ctx, "mbx1")


def test_a_proxied_session_without_a_proxy_line_gets_nothing(cluster: ClusterKit) -> None:
    ctx = _context(cluster.front("front1").path / nodes.CLUSTER_DIR, "imap")
    with socket.create_connection(_internal(cluster, "mbx1"), timeout=15) as raw:
        with ctx.wrap_socket(raw, server_hostname="mbx1") as tls:
            tls.sendall(b"a LOGIN alice@example.test x\r\n")
            assert tls.recv(256) == b""  # no greeting, no login: closed


def test_every_node_reads_the_directory_in_postgresql_with_its_placements(
    cluster: ClusterKit,
) -> None:
    for name, data in cluster.nodes.items():
        assert config.load(data.path, environ={}).directory.url, name
        assert not (data.path / DB_NAME).exists(), name
    app = App.open(cluster.seed.path)
    try:
        placed = {
            node: {u.address for u in app.directory.users_on_node(node)} for node in MAILBOX_NODES
        }
    finally:
        app.close()
    for address in cluster.passwords:
        assert address in placed[cluster.owner(address)]


# -- moving a user while connected ----------------------------------------------------------


def _move(kit: ClusterKit, address: str, node: str) -> None:
    assert cli.main(["--data", str(kit.admin), "cluster", "move", address, node]) == 0


def test_a_user_moved_during_idle_gets_bye_unavailable_reconnects_and_loses_nothing(
    cluster: ClusterKit,
) -> None:
    address = cluster.users_on("mbx2")[-1]
    subjects = [f"before move {i} {uuid.uuid4().hex[:6]}" for i in range(3)]
    for subject in subjects:
        send_mx(cluster, "front1", address, subject)
    assert subjects[-1] in _wait_for(cluster, "front2", address, subjects[-1])
    imap = _imap(cluster, "front2", address)
    imap.select("INBOX")
    imap.send(b"i1 IDLE\r\n")
    assert imap.readline().startswith(b"+")
    during = [f"during move {i} {uuid.uuid4().hex[:6]}" for i in range(8)]
    sender = threading.Thread(
        target=lambda: [(send_mx(cluster, "front1", address, s), time.sleep(0.05)) for s in during]
    )
    sender.start()
    try:
        _move(cluster, address, "mbx1")
    finally:
        sender.join()
    lines = []
    while (line := imap.readline()) and not line.startswith(b"* BYE"):
        lines.append(line)  # EXISTS reports of what arrived before the move
    assert line.startswith(b"* BYE [UNAVAILABLE]")
    assert imap.readline() == b""  # then the connection closes
    imap.shutdown()
    assert cluster.owner(address) == "mbx1"
    aside = list((cluster.nodes["mbx2"].path / MOVED_DIR).glob("*/mailboxes/*.sqlite"))
    assert len(aside) == 1  # the old copy, set aside on the source, not served
    expected = subjects + during
    got = _wait_for(cluster, "front1", address, during[-1])
    deadline = time.monotonic() + ARRIVAL_WAIT
    while not set(expected) <= set(got) and time.monotonic() < deadline:
        time.sleep(0.2)
        got = inbox_subjects(cluster, "front1", address)
    assert sorted(s for s in got if s in expected) == sorted(expected)  # each exactly once
    _move(cluster, address, "mbx2")  # and back: the other direction, over an existing spool
    assert sorted(s for s in inbox_subjects(cluster, "front2", address) if s in expected) == sorted(
        expected
    )
    assert cluster.owner(address) == "mbx2"


def test_a_move_the_target_refuses_is_undone_and_the_source_serves_the_user_again(
    cluster: ClusterKit,
) -> None:
    address = cluster.users_on("mbx1")[0]
    subject = f"before a failed move {uuid.uuid4().hex[:8]}"
    send_mx(cluster, "front1", address, subject)
    assert subject in _wait_for(cluster, "front2", address, subject)
    app = App.open(cluster.seed.path)
    try:
        user = app.directory.user(address)
        assert user is not None
    finally:
        app.close()
    squatter = cluster.nodes["mbx2"].path / "mailboxes" / f"{user.id}.sqlite"
    squatter.parent.mkdir(mode=0o700, exist_ok=True)
    squatter.write_bytes(b"not this user's mailbox")  # the target refuses to overwrite it
    try:
        assert cli.main(["--data", str(cluster.admin), "cluster", "move", address, "mbx2"]) == 1
    finally:
        squatter.unlink()
    assert cluster.owner(address) == "mbx1"
    assert inbox_subjects(cluster, "front1", address).count(subject) == 1  # served again, intact
    assert not list((cluster.nodes["mbx2"].path / "mailboxes").glob(".tmp-*"))


@pytest.mark.last_on_shared_cluster
def test_draining_a_node_moves_every_user_and_their_mail_to_the_other(cluster: ClusterKit) -> None:
    """Run after every other test of the shared cluster: afterwards every user lives on mbx1."""
    drained = cluster.users_on("mbx2")
    subjects = {a: f"before drain {uuid.uuid4().hex[:6]}" for a in drained}
    for address, subject in subjects.items():
        send_mx(cluster, "front2", address, subject)
        assert subject in _wait_for(cluster, "front1", address, subject)
    assert cli.main(["--data", str(cluster.admin), "cluster", "drain", "mbx2"]) == 0
    assert cluster.users_on("mbx2") == []
    for address, subject in subjects.items():
        assert cluster.owner(address) == "mbx1"
        assert inbox_subjects(cluster, "front2", address).count(subject) == 1


def test_every_node_holds_a_verified_tls_connection_to_redis(
    cluster: ClusterKit, tls_redis: TlsRedis
) -> None:
    """Redis here has no plaintext port, so each connection it lists came over TLS."""
    clients = [c for c in tls_redis.command(b"CLIENT LIST").decode().splitlines() if "id=" in c]
    others = [c for c in clients if "cmd=client|list" not in c]  # all but this connection
    # Every node reads the shared bans at start and then follows them (a blocking XREAD).
    assert len(others) >= len(cluster.nodes)
    assert sum("cmd=xread" in c for c in others) >= 1


# -- the sans-I/O pieces ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "local", "line"),
    [
        (("192.0.2.7", 50123), ("127.0.0.1", 993), b"PROXY TCP4 192.0.2.7 127.0.0.1 50123 993\r\n"),
        (("2001:db8::1", 4000), ("::1", 143), b"PROXY TCP6 2001:db8::1 ::1 4000 143\r\n"),
        (("192.0.2.7", 1), ("::1", 143), b"PROXY UNKNOWN\r\n"),  # mixed families
    ],
)
def test_proxy_lines_round_trip(
    client: tuple[str, int], local: tuple[str, int], line: bytes
) -> None:
    assert proxyline.build(client, local) == line
    assert proxyline.parse(line) == (None if b"UNKNOWN" in line else client[0])


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 127.0.0.1 50123 993",  # no CRLF
        b"PROXY TCP4 2001:db8::1 127.0.0.1 1 2\r\n",  # family and address disagree
        b"PROXY TCP4 192.0.2.7 127.0.0.1 70000 993\r\n",  # port out of range
        b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n",
        b"a LOGIN alice secret\r\n",  # a client's first line is not a PROXY line
        b"PROXY TCP4 " + b"1" * 120 + b"\r\n",  # longer than the spec's 107 bytes
    ],
)
def test_malformed_proxy_lines_are_refused(line: bytes) -> None:
    with pytest.raises(proxyline.ProxyLineError):
        proxyline.parse(line)


def test_rendezvous_placement_is_stable_and_spreads_users() -> None:
    candidates = [nodes.Node(f"mbx{i}", "mailbox", f"127.0.0.1:{7000 + i}") for i in range(3)]
    picks = [placement.rendezvous(f"user{i}", candidates).name for i in range(300)]
    assert picks == [placement.rendezvous(f"user{i}", candidates).name for i in range(300)]
    assert all(picks.count(n.name) > 50 for n in candidates)  # about 100 each
    # Removing a node moves only the users that were on it.
    fewer = candidates[:2]
    moved = [i for i in range(300) if placement.rendezvous(f"user{i}", fewer).name != picks[i]]
    assert all(picks[i] == "mbx2" for i in moved)


def test_node_names_and_addresses_are_checked_before_they_reach_a_certificate() -> None:
    for bad in ("Front1", "front_1", "-front", "a" * 64, "front1.example"):
        with pytest.raises(nodes.ClusterError):
            nodes.check_node(bad, "front", "127.0.0.1:1")
    with pytest.raises(nodes.ClusterError):
        nodes.check_node("front1", "admin", "127.0.0.1:1")  # admin is no node role
    with pytest.raises(nodes.ClusterError):
        nodes.check_node("front1", "front", '127.0.0.1:1"\n[x]')
    for role, replica in (("front", "s3://b/p"), ("mailbox", 's3://b/p"\n[x]'), ("mailbox", "x")):
        with pytest.raises(nodes.ClusterError):
            nodes.check_node("mbx9", role, "127.0.0.1:1", replica)


def test_a_mailbox_nodes_replica_goes_into_nodes_toml_and_back(tmp_path: Path) -> None:
    url = "s3://bucket/mbx9?endpoint=http://127.0.0.1:8333&region=x"
    written = {"mbx9": nodes.check_node("mbx9", "mailbox", "127.0.0.1:1", url)}
    nodes.save(tmp_path, written)
    assert nodes.load(tmp_path) == written


def test_serve_refuses_a_node_that_nodes_toml_does_not_list(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "ghost", passwords={}, listeners=("imap",))
    set_config(data.path, "cluster", {"role": "front", "node": "ghost"})
    if "workers" in config.Server.__dataclass_fields__:
        set_config(data.path, "server", {"workers": 1})
    done = subprocess.run(
        [sys.executable, "-m", "postvern.cli", "--data", str(data.path), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "postvern: [cluster] node 'ghost' is not a front node in nodes.toml"
    )


async def test_a_long_outage_of_one_node_does_not_hold_back_mail_for_another(
    cluster: ClusterKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay (in this process, on the front's certificate) whose oldest copies all wait
    for a dead node still sends a newer copy for a live one, however many there are."""
    monkeypatch.setattr(relay_module, "BATCH", 4)  # instead of sending hundreds first
    data = make_data_dir(tmp_path / "d", passwords={"a@example.test": "a-long-password-1",
                                                    "b@example.test": "b-long-password-2"},
                         listeners=())  # fmt: skip
    app = App.open(data.path)
    executor = ThreadPoolExecutor(2)
    try:
        a, b = app.directory.user("a@example.test"), app.directory.user("b@example.test")
        assert a is not None and b is not None
        app.directory.set_mailbox_node(a.id, "dead")
        app.directory.set_mailbox_node(b.id, "mbx1")
        known = {
            "dead": nodes.Node("dead", "mailbox", f"127.0.0.1:{free_port()}"),  # nobody there
            "mbx1": cluster.node_list["mbx1"],
        }
        store = relay_module.RelayStore(tmp_path / "relay", b"k" * 32)
        identity = pki.NodeIdentity.in_dir(cluster.front("front1").path / nodes.CLUSTER_DIR)
        relay = relay_module.Relay(
            store, placement.Placement(app.directory, known), identity, executor
        )
        raw = b"Subject: queued\r\n\r\nqueued\r\n"
        for _ in range(10):
            relay.release(await relay.deposit(relay_module.Copy(a.id, a.address, False, raw)))
        late = await relay.deposit(relay_module.Copy(b.id, b.address, False, raw))
        relay.release(late)
        await relay._pass()  # the dead node's four oldest copies fail: it backs off
        await relay._pass()  # passed over unread now, so the live node's copy goes
        # mbx1 answered it: the cluster's directory has no b@, so 550, and failed/ keeps it.
        assert (store.failed / late).exists()
        assert len(store.names()) == 10
        await relay.stop()
    finally:
        executor.shutdown()
        app.close()


async def test_a_back_off_run_out_with_nothing_left_for_its_node_does_not_spin_the_relay(
    cluster: ClusterKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's copies may leave the queue another way than through it (a failover sends
    them to the users' new node): its back-off, once run out, is no reason for the relay's
    loop to go round again at once (seen: a front at 94% of a core for minutes)."""
    monkeypatch.setattr(relay_module, "RETRY_BASE", 0.2)
    data = make_data_dir(tmp_path / "d", passwords={"a@example.test": "a-long-password-1"},
                         listeners=())  # fmt: skip
    app = App.open(data.path)
    executor = ThreadPoolExecutor(2)
    try:
        a = app.directory.user("a@example.test")
        assert a is not None
        app.directory.set_mailbox_node(a.id, "dead")
        known = {"dead": nodes.Node("dead", "mailbox", f"127.0.0.1:{free_port()}")}
        store = relay_module.RelayStore(tmp_path / "relay", b"k" * 32)
        identity = pki.NodeIdentity.in_dir(cluster.front("front1").path / nodes.CLUSTER_DIR)
        relay = relay_module.Relay(
            store, placement.Placement(app.directory, known), identity, executor
        )
        name = await relay.deposit(relay_module.Copy(a.id, a.address, False, b"S: x\r\n\r\n"))
        relay.release(name)
        assert 0 < await relay._pass() <= 0.2  # nobody there: it backs off
        await relay.withdraw(name)  # the copy left another way
        await asyncio.sleep(0.3)  # the back-off has run out
        assert await relay._pass() == relay_module.RETRY_MAX  # nothing queued, nothing due
        await relay.stop()
    finally:
        executor.shutdown()
        app.close()


def test_a_copy_sent_twice_under_one_delivery_id_is_stored_once(tmp_path: Path) -> None:
    """What makes a front's sending again after a failover harmless: in the spool (twice in
    one import, and again later) and straight into an open mailbox."""
    data = make_data_dir(tmp_path / "d", listeners=())
    address = next(iter(data.passwords))
    app = App.open(data.path)
    try:
        unlocked = app.accounts.authenticate(address, data.passwords[address])
        user = unlocked.user
        spool = Spool(data.path)
        raw = b"Subject: once\r\n\r\nonce\r\n"
        for _ in range(2):
            spool.deposit(user.id, user.spool_public, SpoolItem(raw, delivery_id="0001-aa.relay"))
        spool.deposit(user.id, user.spool_public, SpoolItem(raw))  # no id: always stored
        path = app.accounts.mailbox_path(user)
        with Mailbox.open(path, unlocked.mailbox_key) as box:
            assert len(import_spool(box, spool, user.id)) == 2
            spool.deposit(user.id, user.spool_public, SpoolItem(raw, delivery_id="0001-aa.relay"))
            assert import_spool(box, spool, user.id) == []
            assert _append_item(box, SpoolItem(raw, delivery_id="0001-aa.relay"))[1] == 0
            assert _append_item(box, SpoolItem(raw, delivery_id="0002-bb.relay"))[1] > 0
            assert _append_item(box, SpoolItem(raw, delivery_id="0002-bb.relay"))[1] == 0
            inbox = box.folder("INBOX").id
            assert len(box.uids(inbox)) == 3
    finally:
        app.close()


def _message_ids(kit: ClusterKit, front: str, address: str) -> list[str]:
    imap = _imap(kit, front, address)
    try:
        imap.select("INBOX")
        _, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        ids = []
        for part in data:
            if isinstance(part, tuple):
                header = part[1].decode().strip()
                if header:
                    ids.append(header.split(":", 1)[1].strip())
        return ids
    finally:
        imap.logout()


@pytest.mark.last_on_shared_cluster
def test_a_killed_mailbox_nodes_users_fail_over_from_replicas_with_every_message_once(
    replicating: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last test of the shared cluster: mbx1 is killed and stays dead; its users live on
    mbx2 after."""
    cluster = replicating
    victim, survivor = "mbx1", "mbx2"
    admin = ["--data", str(cluster.admin), "cluster", "failover"]
    assert cli.main([*admin, survivor]) == 1  # it answers over mutual TLS: refused
    assert "answers over mutual TLS" in capsys.readouterr().err
    address = cluster.users_on(victim)[0]
    acked = [send_mx(cluster, FRONTS[i % 2], address, f"before kill {i}") for i in range(6)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_sending() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                acked.append(send_mx(cluster, FRONTS[i % 2], address, f"around kill {i}"))
            except (smtplib.SMTPException, OSError) as e:  # not acknowledged: not counted
                errors.append(e)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        deadline = time.monotonic() + ARRIVAL_WAIT
        while len(acked) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.procs[victim].kill()  # SIGKILL while mail is being acknowledged
        at_kill = len(acked)
        while len(acked) < at_kill + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        sender.join()
    assert len(acked) >= at_kill + 4  # mail acknowledged after the kill too
    assert cli.main([*admin, victim, "--to", survivor]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert f"{address}: {victim} -> {survivor} from the replica of" in out
    assert cluster.users_on(victim) == []
    deadline = time.monotonic() + ARRIVAL_WAIT
    while not set(acked) <= set(ids := _message_ids(cluster, "front2", address)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert sorted(i for i in ids if i in set(acked)) == sorted(acked)  # each exactly once
    assert len(ids) == len(set(ids))  # nor any earlier message twice
    # Copies mbx1 acknowledged just before it died were not in a completed replication yet:
    # the fronts had kept them, and sent them to mbx2.
    gauges = [metrics(cluster, front) for front in FRONTS]
    assert sum(g["postvern_cluster_relay_resent_total"] for g in gauges) >= 1
