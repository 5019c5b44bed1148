"""Cluster benchmark (issue #20): one front against two, the cost of proxying, moving a user.

A real loopback cluster (tests/cluster_kit.py: two fronts, two mailbox nodes, the directory in
a private PostgreSQL and Redis, both over verified TLS), every node its own ``postvern serve``
process:

* **SMTP**: N messages to users spread over both mailbox nodes, through one front, then the
  same through both fronts at once (the same connections, split). Reported: messages/s
  accepted (250 from the front: durable in its relay queue) and delivered (every copy
  acknowledged by its mailbox node), the ratio two/one, and CPU seconds per 1,000 messages
  of the fronts and of the mailbox nodes.
* **IMAP**: C clients logged in through the fronts, each repeating NOOP and FETCH 1 (FLAGS)
  for S seconds, through one front and then through both. Reported: operations/s, the ratio,
  and CPU per 1,000 operations on the fronts (the proxying) and on the mailbox nodes (the
  IMAP work itself).
* **Move**: a user whose mailbox holds M messages (seeded directly into the store before the
  cluster starts) is moved to the other node with ``postvern cluster move``; reported: its
  wall time and the bytes moved.

* **Failover (RTO)**: the cluster is restarted with every mailbox node replicating to
  SeaweedFS (its ``[backup] targets``, the default interval of REPLICATE_SECONDS unless
  ``--replicate-seconds``) and nodes.toml naming the replicas; once the node that holds the
  moved user (M messages) has a replication point, mail is sent to its users through both
  fronts, the node is killed with SIGKILL while more is being accepted, and ``postvern
  cluster failover`` runs at once (no operator's reaction time is counted). Reported: the
  failover command's time, and the RTO — from the kill to the first successful IMAP login
  through a front of a user of the dead node — for the first user it restores and for the
  big mailbox; then every message acknowledged is checked to be there exactly once. With
  ``--failover-after S`` no command runs: every node gets ``[cluster] failover_after = S``
  and a front fails the node over by itself (cluster/liveness.py); reported: when the map
  named the new node for all its users, and the RTO as above, now with the detection in it.

* **Front takeover** (``--takeover-only`` runs just this): SMTP through one front with its
  queues on its disk only, then — the fronts restarted with ``[cluster] queue_store`` on
  SeaweedFS — the same through one front whose every accepted message is also written to the
  object store before 250 (cluster/sharedq.py): the cost of that durable write per message.
  Then both mailbox nodes are stopped, T messages are accepted by front2, front2 is killed
  with SIGKILL, the mailbox nodes come back, and front1 takes front2's copies over once its
  lease (``--lease-seconds``) lapses. Reported: the time from the kill to the lapse (when the
  lease key leaves Redis), and from the lapse to every copy delivered to its mailbox node
  (front1's relay queue and front2's prefix empty); then each message is checked to be
  there exactly once. Last, the CPU of one claim check (the Redis round trip a front makes
  before each DATA and each LMTP hand-off), timed on this process against the same Redis.

Every figure is from this run on this machine; the load generator shares its cores with the
four nodes, PostgreSQL and Redis, so the two-front ratio is a lower bound of what two
machines would give.

Usage: python bench/cluster.py [--messages 1000] [--connections 8] [--imap-seconds 10]
       [--imap-clients 8] [--move-messages 10000] [--replicate-seconds 15] [--failover-only]
       [--takeover-only] [--takeover-messages 200] [--lease-seconds 5] [--failover-after S]
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import os
import random
import smtplib
import ssl
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from common import Job, Target, cpu_seconds, machine_load, send_all, text_message, trust_anything

from cluster_kit import FRONTS, MAILBOX_NODES, ClusterKit, TlsRedis, build  # isort: skip
from cluster_kit import enable_replicas  # isort: skip
from harness import set_config  # isort: skip
from pg_server import PostgresTestServer  # isort: skip
from seaweed import S3_ENV, Weed  # isort: skip

from postvern import cli
from postvern.app import App
from postvern.backup.catalog import Catalog
from postvern.backup.manifest import Opening
from postvern.backup.targets import Targets
from postvern.cluster import proxyline
from postvern.cluster.nodes import CLUSTER_DIR
from postvern.cluster.pki import NodeIdentity
from postvern.cluster.relay import RELAY_DIR
from postvern.cluster.sharedq import KEY_PREFIX, Coordinator
from postvern.crypto.serverkey import ServerKey
from postvern.store.mailbox import INBOX, Mailbox

MESSAGE_SIZE = 4096
# Every wait in this benchmark ends: a cluster that stops delivering fails the run.
DRAIN_TIMEOUT = 600.0
CONNECT_TIMEOUT = 30.0


@dataclass
class Run:
    label: str
    seconds: float
    count: int
    front_cpu: float
    mailbox_cpu: float
    extra: float = 0.0  # delivered-at time for SMTP

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def _cpu(kit: ClusterKit, names: tuple[str, ...]) -> float:
    total = 0.0
    for name in names:
        proc = kit.procs[name].proc
        assert proc is not None
        total += cpu_seconds(proc.pid)
    return total


def _relay_pending(kit: ClusterKit, fronts: tuple[str, ...] = FRONTS) -> int:
    return sum(
        1
        for front in fronts
        for p in (kit.nodes[front].path / RELAY_DIR).glob("*.relay")
        if p.is_file()
    )


def _wait_drained(kit: ClusterKit) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while _relay_pending(kit):
        if time.monotonic() > deadline:
            raise RuntimeError("the relay queues did not drain")
        time.sleep(0.02)


def smtp_run(kit: ClusterKit, fronts: tuple[str, ...], n: int, connections: int, seed: int) -> Run:
    rng = random.Random(seed)
    users = sorted(kit.passwords)
    jobs = [
        Job("sender@outside.test", [users[i % len(users)]],
            text_message(rng, f"b{seed}-{i}", "sender@outside.test", users[i % len(users)],
                         MESSAGE_SIZE))
        for i in range(n)
    ]  # fmt: skip
    shares = [jobs[i :: len(fronts)] for i in range(len(fronts))]
    targets = []
    for front in fronts:
        host, port = kit.nodes[front].addr("smtp")
        targets.append(Target(host, port, tls="starttls"))
    cpu0 = _cpu(kit, FRONTS), _cpu(kit, MAILBOX_NODES)
    start = time.perf_counter()

    async def load() -> list[int]:
        per = max(1, connections // len(fronts))
        results = await asyncio.gather(
            *(send_all(t, share, per) for t, share in zip(targets, shares, strict=True))
        )
        for r in results:
            if r.refused:
                print(f"  refused: {r.refused}")
        return [r.accepted for r in results]

    accepted = sum(asyncio.run(load()))
    accepted_at = time.perf_counter() - start
    _wait_drained(kit)
    delivered_at = time.perf_counter() - start
    cpu1 = _cpu(kit, FRONTS), _cpu(kit, MAILBOX_NODES)
    if accepted != n:
        raise RuntimeError(f"only {accepted} of {n} messages accepted")
    return Run(
        f"SMTP via {len(fronts)} front(s)",
        accepted_at,
        n,
        cpu1[0] - cpu0[0],
        cpu1[1] - cpu0[1],
        extra=delivered_at,
    )


async def _imap_client(
    where: tuple[str, int, ssl.SSLContext, str | None],
    address: str,
    password: str,
    ready: asyncio.Queue[None],
    go: asyncio.Future[float],
) -> int:
    host, port, ctx, node = where
    async with asyncio.timeout(CONNECT_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=node)
        if node is not None:  # straight to the mailbox node, as a front would
            writer.write(proxyline.build(("127.0.0.1", 1), ("127.0.0.1", port)))
        await reader.readline()

        async def command(tag: str, text: str) -> None:
            writer.write(f"{tag} {text}\r\n".encode())
            while not (line := await reader.readline()).startswith(tag.encode() + b" "):
                if not line:
                    raise RuntimeError(f"IMAP connection closed during {text.split()[0]}")
            if not line.startswith(f"{tag} OK".encode()):  # every operation must succeed
                raise RuntimeError(f"IMAP {text.split()[0]} failed: {line[:80]!r}")

        await command("l", f'LOGIN "{address}" "{password}"')
        await command("s", "SELECT INBOX")
    ready.put_nowait(None)
    until = await go  # every client logged in: the timed window starts for all at once
    ops = 0
    while time.monotonic() < until:
        await command("n", "NOOP")
        await command("f", "FETCH 1 (FLAGS)")
        ops += 2
    writer.write(b"z LOGOUT\r\n")
    writer.close()
    return ops


def imap_run(kit: ClusterKit, fronts: tuple[str, ...], clients: int, seconds: float) -> Run:
    """Through ``fronts``; with none, straight to each user's mailbox node (the reference:
    the same IMAP work without the proxy hop), over mutual TLS with a front's certificate."""
    users = sorted(kit.passwords)
    ctx = trust_anything()
    internal = NodeIdentity.in_dir(kit.nodes[FRONTS[0]].path / CLUSTER_DIR).client_context("imap")

    def where(i: int, user: str) -> tuple[str, int, ssl.SSLContext, str | None]:
        if not fronts:
            node = kit.owner(user)
            host, port = kit.node_list[node].hostport
            return host, port, internal, node
        host, port = kit.nodes[fronts[i % len(fronts)]].addr("imaps")
        return host, port, ctx, None

    cpu: list[tuple[float, float]] = []

    async def load() -> int:
        ready: asyncio.Queue[None] = asyncio.Queue()
        go: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        tasks = []
        for i in range(clients):
            user = users[i % len(users)]
            client = _imap_client(where(i, user), user, kit.passwords[user], ready, go)
            tasks.append(asyncio.ensure_future(client))
        for _ in range(clients):
            await ready.get()
        cpu.append((_cpu(kit, FRONTS), _cpu(kit, MAILBOX_NODES)))
        go.set_result(time.monotonic() + seconds)
        return sum(await asyncio.gather(*tasks))

    ops = asyncio.run(load())
    elapsed = seconds
    cpu1 = _cpu(kit, FRONTS), _cpu(kit, MAILBOX_NODES)
    cpu0 = cpu[0]
    label = f"IMAP via {len(fronts)} front(s)" if fronts else "IMAP straight to the nodes"
    return Run(label, elapsed, ops, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


def seed_mailbox(kit: ClusterKit, address: str, count: int, seed: int) -> None:
    """``count`` messages straight into the user's store file on its node (before start)."""
    rng = random.Random(seed)
    app = App.open(kit.seed.path)
    try:
        unlocked = app.accounts.authenticate(address, kit.passwords[address])
        owner = kit.owner(address)
        path = kit.nodes[owner].path / "mailboxes" / f"{unlocked.user.id}.sqlite"
        with Mailbox.open(path, unlocked.mailbox_key) as box:
            inbox = box.folder(INBOX).id
            for start in range(0, count, 500):
                batch = [
                    text_message(rng, f"m{start + k}", "a@outside.test", address, MESSAGE_SIZE)
                    for k in range(min(500, count - start))
                ]
                box.append_many(inbox, [(raw, ("\\Seen",), None) for raw in batch])
    finally:
        app.close()


def move_run(kit: ClusterKit, address: str) -> tuple[float, str]:
    source = kit.owner(address)
    target = next(n for n in MAILBOX_NODES if n != source)
    start = time.perf_counter()
    if cli.main(["--data", str(kit.admin), "cluster", "move", address, target]) != 0:
        raise RuntimeError("cluster move failed")
    return time.perf_counter() - start, f"{source} -> {target}"


REPLICA_WAIT = 600.0  # the first full replication of the big mailbox, on a loaded machine


def _replicated_since(kit: ClusterKit, node: str, since: float) -> bool:
    """The node's replica has a point taken after ``since`` (its first, after the restart)."""
    target = Targets.from_urls([kit.node_list[node].replica]).targets[0]
    catalog = Catalog(target, Opening(server_key=ServerKey.load(kit.seed.path)))
    summaries, _ = catalog.summaries()
    return any(s.created > since for s in summaries)


def _login_works(kit: ClusterKit, front: str, address: str) -> bool:
    host, port = kit.nodes[front].addr("imaps")
    try:
        imap = imaplib.IMAP4_SSL(host, port, ssl_context=trust_anything(), timeout=10)
    except OSError:
        return False
    try:
        imap.login(address, kit.passwords[address])
        return imap.select("INBOX")[0] == "OK"
    except (imaplib.IMAP4.error, OSError):
        return False
    finally:
        try:
            imap.logout()
        except (imaplib.IMAP4.error, OSError):
            pass


def _send(kit: ClusterKit, front: str, to: str) -> str:
    msg_id = f"<{uuid.uuid4()}@outside.test>"
    host, port = kit.nodes[front].addr("smtp")
    raw = f"From: a@outside.test\r\nTo: {to}\r\nMessage-ID: {msg_id}\r\nSubject: f\r\n\r\nx\r\n"
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.sendmail("a@outside.test", [to], raw.encode())
    return msg_id


def _present(kit: ClusterKit, address: str, msg_ids: list[str]) -> int:
    """How many of ``msg_ids`` are in the user's INBOX more than once (raises if one is
    missing after DRAIN_TIMEOUT)."""
    host, port = kit.nodes[FRONTS[0]].addr("imaps")
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        imap = imaplib.IMAP4_SSL(host, port, ssl_context=trust_anything(), timeout=30)
        imap.login(address, kit.passwords[address])
        imap.select("INBOX")
        counts = []
        for msg_id in msg_ids:  # the id's uuid: an atom, no quoting to get wrong
            _, data = imap.uid("SEARCH", "HEADER", "Message-ID", msg_id.strip("<>").split("@")[0])
            counts.append(len(data[0].split()))
        imap.logout()
        if all(counts):
            return sum(c > 1 for c in counts)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{counts.count(0)} acknowledged messages never arrived")
        time.sleep(0.5)


def failover_run(kit: ClusterKit, args: argparse.Namespace, mover: str) -> None:
    victim = kit.owner(mover)
    survivor = next(n for n in MAILBOX_NODES if n != victim)
    users = sorted(a for a in kit.passwords if kit.owner(a) == victim)
    kit.stop_all()
    weed = Weed("bench", kit.root / "weed").start()
    try:
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        enable_replicas(kit, lambda node: weed.url(f"{prefix}-{node}"), args.replicate_seconds)
        if args.failover_after:  # automatic failover: every node, as cluster.md says
            for data in kit.nodes.values():
                set_config(data.path, "cluster", {"failover_after": args.failover_after})
        since = time.time()
        kit.start_all()
        deadline = time.monotonic() + REPLICA_WAIT
        while not _replicated_since(kit, victim, since):
            if time.monotonic() > deadline:
                raise RuntimeError("the node never replicated")
            time.sleep(1.0)
        acked: dict[str, list[str]] = {u: [] for u in users}
        for i in range(20):
            user = users[i % len(users)]
            acked[user].append(_send(kit, FRONTS[i % 2], user))
        stop = threading.Event()

        def keep_sending() -> None:
            i = 0
            while not stop.is_set():
                user = users[i % len(users)]
                try:
                    acked[user].append(_send(kit, FRONTS[i % 2], user))
                except (smtplib.SMTPException, OSError):
                    pass
                i += 1

        sender = threading.Thread(target=keep_sending)
        sender.start()
        time.sleep(2.0)
        proc = kit.procs[victim]
        assert proc.proc is not None
        killed_at = time.perf_counter()
        proc.kill()
        if args.failover_after:
            while _placed_on(kit, victim):
                if time.perf_counter() - killed_at > DRAIN_TIMEOUT:
                    raise RuntimeError("no automatic failover")
                time.sleep(0.1)
        else:
            code = cli.main(["--data", str(kit.admin), "cluster", "failover", victim,
                             "--to", survivor])  # fmt: skip
            if code != 0:
                raise RuntimeError("cluster failover failed")
        failover_done = time.perf_counter()
        first = users[0]
        rto: dict[str, float] = {}
        for who in (first, mover):
            while not _login_works(kit, FRONTS[1], who):
                if time.perf_counter() - killed_at > DRAIN_TIMEOUT:
                    raise RuntimeError("no login after the failover")
                time.sleep(0.05)
            rto[who] = time.perf_counter() - killed_at
        stop.set()
        sender.join()
        doubled = sum(_present(kit, u, ids) for u, ids in acked.items() if ids)
    finally:
        weed.stop()
    total = sum(len(ids) for ids in acked.values())
    print(
        f"\nFailover of {victim} ({len(users)} users, one of {args.move_messages} messages;"
        f" replication every {args.replicate_seconds:.0f} s), killed while mail was accepted:"
    )
    how = (
        f"automatic failover (failover_after {args.failover_after:g} s), every user's map flipped"
        if args.failover_after
        else "cluster failover command"
    )
    print(f"  {how}: {failover_done - killed_at:.2f} s after the kill")
    big = "" if first == mover else f", {rto[mover]:.2f} s for the big mailbox"
    print(f"  RTO, kill -> first IMAP login through a front on {survivor}:"
          f" {rto[first]:.2f} s for {first} (restored first){big}")  # fmt: skip
    print(f"  {total} messages acknowledged around the kill: all present, {doubled} twice")


def _placed_on(kit: ClusterKit, node: str) -> int:
    """How many users the directory places on ``node``."""
    app = App.open(kit.seed.path)
    try:
        return len(app.directory.users_on_node(node))
    finally:
        app.close()


def _lease_held(redis: TlsRedis, front: str) -> bool:
    return redis.command(f"EXISTS {KEY_PREFIX}:lease:{front}".encode()).startswith(b":1")


def _objects(store: str, front: str) -> int:
    return len(Targets.from_urls([store]).targets[0].list(f"{front}/"))


# Claim checks timed for the per-call CPU figure (a few seconds on a loaded machine).
CLAIM_CHECKS = 2000


def _claim_check_cpu(redis: TlsRedis, calls: int = CLAIM_CHECKS) -> float:
    """CPU seconds (this process) per claim check — the Redis round trip a front makes
    before each DATA and each LMTP hand-off (sharedq.Coordinator.holds) — over TLS to the
    run's Redis, as the fronts reach it."""
    import redis.asyncio as aioredis

    from postvern.abuse.shared import connection_pool

    async def measure() -> float:
        client = aioredis.Redis(connection_pool=connection_pool(redis.url))
        coord = Coordinator(client, "bench-front", ttl=60.0)
        try:
            coord.ready.set()
            await coord.take_lease()
            await coord.claim(["bench-message"])
            assert await coord.holds("bench-message")  # connected and warm
            start = time.process_time()
            for _ in range(calls):
                await coord.holds("bench-message")
            return (time.process_time() - start) / calls
        finally:
            await client.aclose()

    return asyncio.run(measure())


def takeover_run(kit: ClusterKit, args: argparse.Namespace, redis: TlsRedis) -> None:
    """The shared queue's cost per message, then a killed front's mail taken over."""
    weed = Weed("bench-queue", kit.root / "weed-queue").start()
    try:
        _takeover(kit, args, redis, weed)
    finally:
        weed.stop()


def _takeover(kit: ClusterKit, args: argparse.Namespace, redis: TlsRedis, weed: Weed) -> None:
    smtp_run(kit, FRONTS[:1], min(100, args.messages), args.connections, seed=10)  # warm-up
    local = smtp_run(kit, FRONTS[:1], args.messages, args.connections, seed=11)
    store = weed.url(f"bench-queue-{uuid.uuid4().hex[:8]}")
    for front in FRONTS:
        kit.procs[front].stop()
        set_config(kit.nodes[front].path, "cluster",
                   {"queue_store": store, "lease_seconds": args.lease_seconds})  # fmt: skip
        kit.start(front)
    smtp_run(kit, FRONTS[:1], min(100, args.messages), args.connections, seed=12)  # warm-up
    shared = smtp_run(kit, FRONTS[:1], args.messages, args.connections, seed=13)
    print(f"\nShared queue, {args.messages} messages of {MESSAGE_SIZE} B through one front,"
          f" {args.connections} connections")  # fmt: skip
    for label, r in (("queues on the front's disk", local), ("+ object store before 250", shared)):
        print(f"  {label}: accepted {r.rate:.1f} msg/s, delivered {r.count / r.extra:.1f} msg/s;"
              f" front CPU per 1,000 msgs {1000 * r.front_cpu / r.count:.2f} s")  # fmt: skip
    extra_ms = 1000 * (shared.seconds - local.seconds) / args.messages
    print(f"  shared / local: accepted x{shared.rate / local.rate:.2f}, delivered"
          f" x{(shared.count / shared.extra) / (local.count / local.extra):.2f};"
          f" {extra_ms:+.2f} ms of wall time per message")  # fmt: skip
    users = sorted(kit.passwords)
    for node in MAILBOX_NODES:
        kit.procs[node].stop()
    sent: dict[str, list[str]] = {}
    try:
        for i in range(args.takeover_messages):
            to = users[i % len(users)]
            sent.setdefault(to, []).append(_send(kit, FRONTS[1], to))
        held = _objects(store, FRONTS[1])
        kit.procs[FRONTS[1]].kill()
        killed = time.monotonic()
    finally:
        # The mailbox nodes come back meanwhile (a start takes seconds here): timed apart.
        starter = threading.Thread(target=lambda: [kit.start(n) for n in MAILBOX_NODES])
        starter.start()
    deadline = killed + DRAIN_TIMEOUT
    while _lease_held(redis, FRONTS[1]):
        if time.monotonic() > deadline:
            raise RuntimeError("the killed front's lease never lapsed")
        time.sleep(0.01)
    lapsed = time.monotonic()
    while _objects(store, FRONTS[1]):
        if time.monotonic() > deadline:
            raise RuntimeError("the killed front's mail was not taken over")
        time.sleep(0.02)
    moved = time.monotonic()
    starter.join()
    ready = time.monotonic()
    while _relay_pending(kit, FRONTS[:1]):
        if time.monotonic() > deadline:
            raise RuntimeError("the taken-over copies were not delivered")
        time.sleep(0.02)
    done = time.monotonic()
    doubled = sum(_present(kit, address, ids) for address, ids in sent.items())
    print(f"\nTakeover of a killed front ({args.takeover_messages} relay copies queued, "
          f"{held} objects under its prefix; lease {args.lease_seconds:.1f} s)")  # fmt: skip
    print(f"  kill -> lease lapsed: {lapsed - killed:.2f} s; lapse -> all {held} taken over by"
          f" front1: {moved - lapsed:.2f} s")  # fmt: skip
    print(f"  mailbox nodes back {ready - killed:.2f} s after the kill; from the lapse (or their"
          f" return, if later) to all delivered: {done - max(lapsed, ready):.2f} s;"
          f" kill -> all delivered: {done - killed:.2f} s")  # fmt: skip
    print(f"  {args.takeover_messages} messages accepted by the killed front: all present,"
          f" {doubled} twice")  # fmt: skip
    check = _claim_check_cpu(redis)
    print(f"  claim check before each DATA / LMTP hand-off: {1000 * check:.3f} ms of CPU per call"
          f" on the caller, x{check / (shared.front_cpu / shared.count):.3f} of the shared"
          f" front's CPU per message")  # fmt: skip
    kit.start(FRONTS[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--imap-clients", type=int, default=8)
    parser.add_argument("--imap-seconds", type=float, default=10.0)
    parser.add_argument("--move-messages", type=int, default=10000)
    parser.add_argument("--replicate-seconds", type=float, default=15.0)
    parser.add_argument("--failover-only", action="store_true", help="only the failover (RTO)")
    parser.add_argument("--takeover-only", action="store_true", help="only the front takeover")
    parser.add_argument("--takeover-messages", type=int, default=200)
    parser.add_argument("--lease-seconds", type=float, default=5.0)
    parser.add_argument(
        "--failover-after", type=float, default=0.0, help="automatic failover, this lease (s)"
    )
    args = parser.parse_args()
    os.environ.update(S3_ENV)
    print(f"machine: {machine_load()}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
        PostgresTestServer() as pg,
    ):
        redis = TlsRedis(Path(tmp) / "redis").start()
        try:
            run(Path(tmp), pg, redis, args)
        finally:
            redis.stop()
    print(f"machine at the end: {machine_load()}")  # the load moves during a long run


def run(tmp: Path, pg: PostgresTestServer, redis: TlsRedis, args: argparse.Namespace) -> None:
    kit = build(tmp / "cluster", redis_url=redis.url, directory=pg.new_database().settings())
    mover = sorted(a for a in kit.passwords if kit.owner(a) == MAILBOX_NODES[0])[0]
    if not args.takeover_only:
        seed_mailbox(kit, mover, args.move_messages, seed=7)
    try:
        kit.start_all()
        if args.takeover_only:
            takeover_run(kit, args, redis)
            return
        report(kit, args, mover)
    except BaseException:
        for name, proc in kit.procs.items():  # what the nodes said, to see why
            print(f"--- {name}", *proc.output[-20:], sep="\n", file=sys.stderr)
        raise
    finally:
        kit.stop_all()


def report(kit: ClusterKit, args: argparse.Namespace, mover: str) -> None:
    if args.failover_only:
        failover_run(kit, args, mover)
        return
    smtp_run(kit, FRONTS[:1], min(100, args.messages), args.connections, seed=0)  # warm-up
    one = smtp_run(kit, FRONTS[:1], args.messages, args.connections, seed=1)
    two = smtp_run(kit, FRONTS, args.messages, args.connections, seed=2)
    print(f"\nSMTP, {args.messages} messages of {MESSAGE_SIZE} B, {args.connections} connections")
    for run in (one, two):
        print(
            f"  {run.label}: accepted {run.rate:.1f} msg/s, delivered to the mailbox nodes"
            f" {run.count / run.extra:.1f} msg/s; CPU per 1,000 msgs: fronts"
            f" {1000 * run.front_cpu / run.count:.2f} s, mailbox nodes"
            f" {1000 * run.mailbox_cpu / run.count:.2f} s"
        )
    print(f"  two fronts / one front: accepted x{two.rate / one.rate:.2f},"
          f" delivered x{(two.count / two.extra) / (one.count / one.extra):.2f}")  # fmt: skip
    imap_run(kit, FRONTS, args.imap_clients, 1.0)  # warm-up: every user's first login
    i0 = imap_run(kit, (), args.imap_clients, args.imap_seconds)
    i1 = imap_run(kit, FRONTS[:1], args.imap_clients, args.imap_seconds)
    i2 = imap_run(kit, FRONTS, args.imap_clients, args.imap_seconds)
    print(f"\nIMAP, {args.imap_clients} clients, NOOP + FETCH 1 (FLAGS), {args.imap_seconds:.0f} s")
    for run in (i0, i1, i2):
        print(
            f"  {run.label}: {run.rate:.0f} ops/s; CPU per 1,000 ops: fronts (proxying)"
            f" {1000 * run.front_cpu / run.count:.3f} s, mailbox nodes (IMAP)"
            f" {1000 * run.mailbox_cpu / run.count:.3f} s"
        )
    print(f"  one front / no proxy: x{i1.rate / i0.rate:.2f};"
          f" two fronts / one front: x{i2.rate / i1.rate:.2f}")  # fmt: skip
    seconds, path = move_run(kit, mover)
    print(f"\nMove of a user with {args.move_messages} messages ({path}): {seconds:.2f} s")
    failover_run(kit, args, mover)


if __name__ == "__main__":
    main()
