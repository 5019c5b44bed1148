"""The front's relay queue: local copies on their way to the owning mailbox node.

A front stores no mailbox, so where a single server writes a user's copy into the mailbox
or its sealed spool, a front writes it here: one file per copy, sealed with ChaCha20-Poly1305
under a key derived from the server key (the name is the associated data, so files cannot be
swapped), written durably (temp file, fsync, rename, fsync of the folder). Only then may SMTP
answer 250 — the single-server rule, "250 means on disk", kept.

:class:`RelayRegistry` stands in for the mailbox registry in the delivery pipeline, so the
pipeline's all-or-nothing rule still holds: a copy is *held* until the pipeline closes its
receipt, and a withdrawn copy is deleted before it was ever sent. :class:`Relay` hands copies
to the owning node by LMTP over mutual TLS and deletes each only after that node's 250 (its
copy durable there). A node that is down or answers 4xx keeps its copies queued and is tried
again after a growing delay; a 5xx (the user is gone) moves the copy to ``failed/`` for the
administrator rather than dropping mail that was accepted.

**Kept until replicated.** A mailbox node can die with its disk, and its users then come back
on another node from their replicas in object storage (failover.py), which lag behind by up
to a replication interval. So a node's 250 does not delete the copy: it moves to
``delivered/<node>/`` under the time the node says it became durable (``at=``, the node's
clock), and is deleted only once the node reports a completed replication that started after
that time (LMTP ``XREPLICATED``, asked every COVERAGE_INTERVAL) — or that it does not
replicate at all. A kept copy whose user the directory no longer places on that node (a
failover, or a move) goes back into the queue and is sent to the user's node now; it carries
its delivery id (the file name), so a copy the replica already holds is not stored twice
(store/spool.py keeps the ids).

**Shared with the other fronts** (sharedq.py, with ``[cluster] queue_store``): each file also
goes, byte for byte (it is sealed already), to the object store under this front's prefix
before the pipeline may answer 250, and leaves it when the copy is finished here (delivered
and covered, or failed: in batches, UNSHARE_INTERVAL; withdrawn: at once); a copy is sent only
under its claim in Redis, so another front that takes this one's copies over after its lease
lapsed never sends one at the same time.

Exactly-once holds except in one window, as for the outbound queue (mta/queue.py): a crash
after the node's 250 and before the move to ``delivered/`` is durable sends that copy once
more — and then the node recognises its delivery id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from postvern.cluster import pki
from postvern.cluster.lmtp import LMTPClient, LMTPError, stored_at
from postvern.cluster.nodes import ClusterError, Node
from postvern.cluster.placement import Placement, UserGone
from postvern.cluster.sharedq import RELAY, Coordinator, Gate, SharedStore
from postvern.directory.db import User
from postvern.durable import TEMP_PREFIX, fsync_dir, write_durably
from postvern.smtp.replies import Reply
from postvern.store.service import MailboxRegistry
from postvern.store.spool import SpoolItem

log = logging.getLogger(__name__)
T = TypeVar("T")

RELAY_DIR = "cluster-relay"
FAILED_DIR = "failed"
DELIVERED_DIR = "delivered"
SUFFIX = ".relay"
NONCE_BYTES = 12
# A node that failed is tried again after RETRY_BASE·2^n seconds, at most RETRY_MAX: quick
# enough that a restarted node gets its mail within a minute, slow enough not to hammer it.
RETRY_BASE = 0.5
RETRY_MAX = 30.0
# A dead node's address may not even refuse: the connect (and LMTP greeting) gives up then.
CONNECT_TIMEOUT = 5.0
# One copy's transaction, the node's fsync included; far above what a healthy node needs.
SEND_TIMEOUT = 120.0
# One pass reads at most this many copies (memory), over at most this many connections per
# node: the node commits concurrent copies together (its spool's group commit).
BATCH = 256
CONNECTIONS_PER_NODE = 4
# How often the copies kept for replication are looked at: which are covered (one question
# per node) and which belong to a user who now lives elsewhere (one directory query per
# node). A failover's mail reaches the new node within about this, after the map flips.
COVERAGE_INTERVAL = 1.0
# With a shared queue, finished copies leave the object store in batches: one request per
# this many seconds (or BATCH copies) rather than one per copy. A crash before a batch goes
# leaves its objects behind; the copies are then sent again, and stored once (delivery ids).
UNSHARE_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Copy:
    """One relayed copy: for whom, where it is filed, and the message."""

    user_id: str
    address: str
    junk: bool
    raw: bytes


@dataclass(frozen=True, slots=True)
class Kept:
    """A copy a node acknowledged, kept until its replication covers it."""

    file: str  # its name under delivered/<node>/
    name: str  # its name in the queue: the delivery id
    at: float  # when the node had it durable (the node's clock)
    user_id: str

    @classmethod
    def parse(cls, file: str) -> Kept | None:
        at, _, rest = file.partition(".")
        user_id, _, name = rest.partition(".")
        if not (at.isdigit() and user_id.isalnum() and name.endswith(SUFFIX)):
            return None
        return cls(file, name, int(at) / 1e9, user_id)


class RelayStore:
    """The files; blocking, so every call runs in a worker thread."""

    def __init__(self, root: Path, key: bytes, shared: SharedStore | None = None) -> None:
        self.root = root
        self.failed = root / FAILED_DIR
        self.delivered = root / DELIVERED_DIR
        self._aead = ChaCha20Poly1305(key)
        self.shared = shared  # the object store's copy (sharedq.py), written first
        self._unshared: list[str] = []  # finished copies whose objects go in the next batch
        self._unshared_lock = threading.Lock()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def put(self, copy: Copy) -> str:
        name = f"{time.time_ns():020d}-{secrets.token_hex(8)}{SUFFIX}"
        head = json.dumps({"user": copy.user_id, "address": copy.address, "junk": copy.junk})
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, head.encode() + b"\n" + copy.raw, name.encode())
        if self.shared is not None:  # before the local file: the local copy is the cache
            self.shared.put(RELAY, name, nonce + sealed)
        write_durably(self.root, name, nonce + sealed)
        fsync_dir(self.root)
        return name

    def adopt(self, name: str, data: bytes) -> None:
        """A copy taken over from another front (or fetched back from the store): queued here
        under its name, unless it is queued here already. (One kept here is queued again: it
        is sent once more and stored once, by its delivery id; listing the kept copies for
        every adopted one would make a takeover quadratic in the queue.)"""
        if not name.endswith(SUFFIX) or "/" in name or (self.root / name).exists():
            return
        write_durably(self.root, name, data)
        fsync_dir(self.root)

    def all_names(self) -> set[str]:
        """Every copy this front still answers for: queued, or kept until covered."""
        kept = {k.name for ks in self.kept().values() for k in ks}
        return set(self.names()) | kept

    def raw(self, name: str) -> bytes | None:
        """A copy's sealed bytes, queued or kept; None if it is gone (delivered meanwhile)."""
        paths = [self.root / name] + [
            self.delivered / node / k.file
            for node, ks in self.kept().items()
            for k in ks
            if k.name == name
        ]
        for path in paths:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                continue
        return None

    def forget(self, names: set[str]) -> None:
        """Copies another front took over: gone from here (queued and kept), not from the
        store (they are under the other front's prefix now)."""
        for name in names:
            (self.root / name).unlink(missing_ok=True)
        for node, ks in self.kept().items():
            for k in ks:
                if k.name in names:
                    (self.delivered / node / k.file).unlink(missing_ok=True)
        fsync_dir(self.root)

    def _unshare(self, names: list[str], *, now: bool = False) -> None:
        if self.shared is None:
            return
        if now:
            self.shared.delete(RELAY, names)
            return
        with self._unshared_lock:
            self._unshared.extend(names)

    @property
    def unshared(self) -> int:
        return len(self._unshared)

    def flush_unshared(self) -> None:
        """Delete the finished copies' objects, in one request."""
        with self._unshared_lock:
            names, self._unshared = self._unshared, []
        if not names or self.shared is None:
            return
        try:
            self.shared.delete(RELAY, names)
        except Exception:
            with self._unshared_lock:
                self._unshared[:0] = names
            raise

    def get(self, name: str) -> Copy:
        data = (self.root / name).read_bytes()
        plain = self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], name.encode())
        head, _, raw = plain.partition(b"\n")
        meta = json.loads(head)
        return Copy(meta["user"], meta["address"], bool(meta["junk"]), raw)

    def names(self) -> list[str]:
        """Queued copies, oldest first (temp files of an interrupted write are not copies)."""
        return sorted(
            n for n in os.listdir(self.root) if n.endswith(SUFFIX) and not n.startswith(TEMP_PREFIX)
        )

    def remove(self, names: list[str], withdrawn: bool = False) -> None:
        for name in names:
            (self.root / name).unlink(missing_ok=True)
        fsync_dir(self.root)
        self._unshare(names, now=withdrawn)  # a withdrawn copy was never acknowledged: now

    def keep(self, node: str, kept: list[tuple[str, float, str]]) -> None:
        """Acknowledged copies (name, at, user id) into delivered/<node>/ until covered."""
        folder = self.delivered / node
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, at, user_id in kept:
            os.replace(self.root / name, folder / f"{round(at * 1e9):020d}.{user_id}.{name}")
        fsync_dir(folder)
        fsync_dir(self.root)

    def kept(self) -> dict[str, list[Kept]]:
        """Every kept copy, by the node that acknowledged it."""
        out: dict[str, list[Kept]] = {}
        if not self.delivered.is_dir():
            return out
        for node in os.listdir(self.delivered):
            entries = [Kept.parse(f) for f in os.listdir(self.delivered / node)]
            found = [k for k in entries if k is not None]
            if found:
                out[node] = found
        return out

    def drop(self, node: str, kept: list[Kept]) -> None:
        """Covered copies: the node's replica has them."""
        folder = self.delivered / node
        for k in kept:
            (folder / k.file).unlink(missing_ok=True)
        fsync_dir(folder)
        self._unshare([k.name for k in kept])

    def requeue(self, node: str, kept: list[Kept]) -> None:
        """Copies whose user lives elsewhere now: back into the queue, same names."""
        folder = self.delivered / node
        for k in kept:
            os.replace(folder / k.file, self.root / k.name)
        fsync_dir(self.root)
        fsync_dir(folder)

    def fail(self, name: str) -> None:
        self.failed.mkdir(mode=0o700, exist_ok=True)
        os.replace(self.root / name, self.failed / name)
        fsync_dir(self.root)
        fsync_dir(self.failed)
        self._unshare([name])  # settled: a 5xx or unreadable; the administrator's now


class Relay:
    """Empties the relay queue into the mailbox nodes."""

    def __init__(
        self,
        store: RelayStore,
        placement: Placement,
        identity: pki.NodeIdentity,
        executor: Executor,
        claims: Coordinator | None = None,
    ) -> None:
        self.store = store
        self.claims = claims  # sharedq.py: a copy is sent only under its claim in Redis
        self.gate: Gate | None = None  # sharedq.py: deposits wait while it reconciles
        self.placement = placement
        self.context = identity.client_context("lmtp")
        self.executor = executor
        self._held: set[str] = set()  # deposited, not yet committed by the pipeline
        self._wake = asyncio.Event()
        self._failures: dict[str, int] = {}  # consecutive failures per node
        self._retry_at: dict[str, float] = {}
        # A copy the node answered 4xx for (its user is moving, a passing failure there)
        # waits on its own, so one user's trouble does not hold back the node's other mail.
        self._deferrals: dict[str, int] = {}
        self._not_before: dict[str, float] = {}
        self._owner: dict[str, str] = {}  # copy → its user's id, once read
        self._task: asyncio.Task[None] | None = None
        self._pool: dict[str, list[LMTPClient]] = {}  # kept connections per node
        self.relayed = 0  # copies a node acknowledged (metrics)
        self.queued = 0  # copies in the queue at the last pass (metrics)
        self.kept = 0  # acknowledged copies waiting for replication (metrics)
        self.resent = 0  # kept copies sent again, to a user's new node (metrics)
        self._coverage_at = 0.0
        self._unshare_at = 0.0

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- what the pipeline calls ------------------------------------------------------

    async def deposit(self, copy: Copy) -> str:
        if self.gate is None:
            name = await self._thread(self.store.put, copy)
        else:
            async with self.gate.enter():
                name = await self._thread(self.store.put, copy)
        self._held.add(name)
        return name

    async def withdraw(self, name: str) -> None:
        self._held.discard(name)
        self._forget(name)
        await self._thread(self.store.remove, [name], True)

    def release(self, name: str) -> None:
        self._held.discard(name)
        self._wake.set()

    def wake(self) -> None:
        """Look at the queue now (copies were taken over from another front)."""
        self._wake.set()

    # -- the task ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()  # whatever a previous run left queued

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for kept in self._pool.values():
            for client in kept:
                await client.close()
        self._pool.clear()
        await self._flush_unshared(force=True)

    async def pending(self) -> int:
        return len(await self._thread(self.store.names))

    async def _run(self) -> None:
        while True:
            delay = RETRY_MAX
            try:
                delay = await self._pass()
            except Exception:
                log.exception("relay pass failed")
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _pass(self) -> float:
        """Send what is due; returns how long until the next retry is due.

        Copies for a node that is backing off are passed over without being read (each
        copy's user is remembered once read), so a long outage of one node, with thousands
        of copies for it queued first, never holds back mail for the others."""
        if self.claims is not None:  # nothing, not even dropping kept copies, before the
            await self.claims.ready.wait()  # shared queue has reconciled (sharedq.py)
        now = time.monotonic()
        queued = await self._thread(self.store.names)
        self.queued = len(queued)
        nodes: dict[str, Node | None] = {}  # per user, for this pass
        by_node: dict[str, tuple[Node, list[tuple[str, Copy]]]] = {}
        taken = 0
        more = False
        for name in queued:
            if name in self._held or self._not_before.get(name, 0.0) > now:
                continue
            if taken >= BATCH:
                more = True
                break
            user_id = self._owner.get(name)
            copy = None
            if user_id is None:
                copy = await self._read(name)
                if copy is None:
                    continue
                user_id = self._owner[name] = copy.user_id
            if user_id not in nodes:
                nodes[user_id] = await self._node_of(name, user_id)
            node = nodes[user_id]
            if node is None or self._retry_at.get(node.name, 0.0) > now:
                continue
            copy = copy or await self._read(name)
            if copy is not None:
                by_node.setdefault(node.name, (node, []))[1].append((name, copy))
                taken += 1
        claimed = await self._claim(by_node)
        try:
            await asyncio.gather(*(self._to_node(node, work) for node, work in by_node.values()))
        finally:
            if claimed and self.claims is not None:
                await self.claims.release(claimed)
        if time.monotonic() >= self._coverage_at:
            await self._coverage()
            self._coverage_at = time.monotonic() + COVERAGE_INTERVAL
        if more:
            return 0.0  # more waiting: go on at once
        await self._flush_unshared()
        coverage = (self._coverage_at,) if self.kept else ()
        unshare = (self._unshare_at,) if self.store.unshared else ()
        now = time.monotonic()
        # A back-off already past is due, not a wait. One still here took no part in this
        # pass (its node's copies went to the users' new node, or are held), and left in it
        # would make every pass return at once: the loop would spin a core until a copy for
        # that node came. Forgetting it changes nothing else (a past time holds nothing back;
        # the failure counts that lengthen the next back-off are kept apart).
        self._retry_at = {key: at for key, at in self._retry_at.items() if at > now}
        self._not_before = {key: at for key, at in self._not_before.items() if at > now}
        retries = (*self._retry_at.values(), *self._not_before.values(), *coverage, *unshare)
        return max(0.0, min((at - now for at in retries), default=RETRY_MAX))

    async def _claim(self, by_node: dict[str, tuple[Node, list[tuple[str, Copy]]]]) -> list[str]:
        """Keep only the copies this front holds the claim of (sharedq.py); one round trip."""
        if self.claims is None:
            return []
        names = [name for _, work in by_node.values() for name, _ in work]
        if not names:
            return []
        mine = await self.claims.claim(names)
        # A copy taken over while this front's lease had lapsed is gone from here by now.
        gone = await self._thread(lambda: {n for n in mine if not (self.store.root / n).exists()})
        if gone:
            await self.claims.release(list(gone))
            mine -= gone
        for key, (node, work) in list(by_node.items()):
            kept = [(n, c) for n, c in work if n in mine]
            if kept:
                by_node[key] = (node, kept)
            else:
                del by_node[key]
        return list(mine)

    async def _flush_unshared(self, force: bool = False) -> None:
        store = self.store
        if not store.unshared:
            return
        if force or time.monotonic() >= self._unshare_at or store.unshared >= BATCH:
            try:
                await self._thread(store.flush_unshared)
            except Exception as e:  # kept for the next batch
                log.warning("shared queue: cannot delete finished copies' objects: %s", e)
            self._unshare_at = time.monotonic() + UNSHARE_INTERVAL

    async def _read(self, name: str) -> Copy | None:
        try:
            copy: Copy = await self._thread(self.store.get, name)
            return copy
        except Exception:
            log.exception("a relayed copy cannot be read; kept in failed/")
            await self._thread(self.store.fail, name)
            self._forget(name)
            return None

    async def _node_of(self, name: str, user_id: str) -> Node | None:
        """The user's node; None (the copy filed or deferred) when there is none now."""
        try:
            node: Node = await self._thread(self.placement.node_for, user_id)
            return node
        except UserGone:
            log.error("a relayed copy's user was deleted; kept in failed/")
            await self._thread(self.store.fail, name)
            self._forget(name)
        except ClusterError as e:
            log.warning("no node for a relayed copy (%s); kept for later", e)
            self._defer(name)
        return None

    async def _to_node(self, node: Node, work: list[tuple[str, Copy]]) -> None:
        lanes = [work[i::CONNECTIONS_PER_NODE] for i in range(CONNECTIONS_PER_NODE)]
        results = await asyncio.gather(*(self._lane(node, lane) for lane in lanes if lane))
        if all(results):
            self._failures.pop(node.name, None)
            self._retry_at.pop(node.name, None)
            return
        self._failed(node)

    def _failed(self, node: Node) -> None:
        """The node did not answer: it is left alone (sending and asking) for a while."""
        failures = self._failures[node.name] = self._failures.get(node.name, 0) + 1
        wait = _backoff(failures)
        self._retry_at[node.name] = time.monotonic() + wait
        log.warning("relay to %s failed %d time(s); next try in %.1f s", node.name, failures, wait)

    async def _lane(self, node: Node, lane: list[tuple[str, Copy]]) -> bool:
        """One connection's share; True if every copy was settled (delivered or failed)."""
        try:
            client, reused = await self._client(node)
        except (OSError, LMTPError, TimeoutError) as e:
            log.warning("cannot reach mailbox node %s: %s", node.name, type(e).__name__)
            return False
        done: list[str] = []
        kept: list[tuple[str, float, str]] = []
        healthy = True
        try:
            for name, copy in lane:
                if self.claims is not None and not await self.claims.holds(name):
                    continue  # frozen past the lease: another front has it now (sharedq.py)
                try:
                    reply = await self._send(client, name, copy)
                except (OSError, LMTPError) as e:
                    if not reused:
                        raise
                    # A kept connection the node closed while idle: one try on a new one.
                    log.info("kept connection to %s was closed (%s)", node.name, type(e).__name__)
                    client.abort()
                    client, reused = await self._connect(node), False
                    reply = await self._send(client, name, copy)
                reused = False
                await self._settle(node, name, copy, reply, done, kept)
        except (OSError, LMTPError, TimeoutError) as e:
            log.warning("relay to %s broke off: %s", node.name, type(e).__name__)
            healthy = False
        finally:
            if done:
                await self._thread(self.store.remove, done)
            if kept:
                await self._thread(self.store.keep, node.name, kept)
                self.kept += len(kept)
            self.relayed += len(done) + len(kept)
            for name in (*done, *(k[0] for k in kept)):
                self._forget(name)
            if healthy:
                self._keep(node, client)
            else:
                client.abort()
        return healthy

    async def _settle(
        self,
        node: Node,
        name: str,
        copy: Copy,
        reply: Reply,
        done: list[str],
        kept: list[tuple[str, float, str]],
    ) -> None:
        if reply.is_positive:
            at = stored_at(reply)
            if at is None or not copy.user_id.isalnum():
                done.append(name)  # a node that does not say when: nothing to wait for
            else:
                kept.append((name, at, copy.user_id))
        elif reply.is_permanent:
            log.error("mailbox node %s refused a copy (%d); kept in failed/", node.name, reply.code)
            await self._thread(self.store.fail, name)
            self._forget(name)
        else:
            self._defer(name)

    async def _send(self, client: LMTPClient, name: str, copy: Copy) -> Reply:
        async with asyncio.timeout(SEND_TIMEOUT):
            return await client.send("", copy.address, copy.junk, copy.raw, name)

    # -- copies kept until the node's replication covers them ---------------------------

    async def _coverage(self) -> None:
        """Drop the kept copies a node's replica now holds; send those whose user the
        directory places elsewhere now (a failover or a move) to the user's node."""
        by_node = await self._thread(self.store.kept)
        total = 0
        for node_name, kept in by_node.items():
            try:
                here = await self._thread(self._users_on, node_name)
            except Exception:
                log.exception("directory lookup for kept copies failed")
                total += len(kept)
                continue
            away = [k for k in kept if k.user_id not in here]
            if away:
                await self._thread(self.store.requeue, node_name, away)
                self.resent += len(away)
                self._wake.set()
                log.info("%d kept copies go to their users' new node", len(away))
            kept = [k for k in kept if k.user_id in here]
            node = self.placement.nodes.get(node_name)
            covered: list[Kept] = []
            if kept and node is not None and self._retry_at.get(node_name, 0.0) <= time.monotonic():
                mark = await self._mark(node)
                if mark == "off":
                    covered = kept
                elif isinstance(mark, float):
                    covered = [k for k in kept if k.at < mark]
            if covered:
                await self._thread(self.store.drop, node_name, covered)
            total += len(kept) - len(covered)
        self.kept = total

    def _users_on(self, node_name: str) -> set[str]:
        return {u.id for u in self.placement.directory.users_on_node(node_name)}

    async def _mark(self, node: Node) -> float | str | None:
        """The node's replication mark; "off" if it does not replicate; None if unknown."""
        for attempt in range(2):  # a kept connection the node closed while idle: a new one
            client: LMTPClient | None = None
            try:
                client, reused = await self._client(node)
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    mark = await client.replicated()
            except (OSError, LMTPError, TimeoutError) as e:
                if client is not None:
                    client.abort()
                    if reused and attempt == 0:
                        continue
                # A dead node's address may not even refuse: back off, as for sending, so
                # that the connect timeout is not waited out on every check.
                log.info("no replication mark from %s: %s", node.name, type(e).__name__)
                self._failed(node)
                return None
            self._keep(node, client)
            return "off" if mark is None else mark
        return None

    async def _connect(self, node: Node) -> LMTPClient:
        host, port = node.hostport
        return await LMTPClient.connect(host, port, self.context, node.name, CONNECT_TIMEOUT)

    async def _client(self, node: Node) -> tuple[LMTPClient, bool]:
        """A kept connection to ``node`` (True) or a new one (False)."""
        kept = self._pool.get(node.name, [])
        while kept:
            client = kept.pop()
            if client.usable():
                return client, True
            client.abort()
        return await self._connect(node), False

    def _keep(self, node: Node, client: LMTPClient) -> None:
        """Keep the connection for the next pass: a TLS handshake per pass would cost the
        front more than the copies themselves."""
        kept = self._pool.setdefault(node.name, [])
        if len(kept) < CONNECTIONS_PER_NODE and client.usable():
            kept.append(client)
        else:
            client.abort()

    def _defer(self, name: str) -> None:
        deferrals = self._deferrals[name] = self._deferrals.get(name, 0) + 1
        self._not_before[name] = time.monotonic() + _backoff(deferrals)

    def _forget(self, name: str) -> None:
        self._deferrals.pop(name, None)
        self._not_before.pop(name, None)
        self._owner.pop(name, None)


def _backoff(failures: int) -> float:
    return float(min(RETRY_BASE * 2 ** (failures - 1), RETRY_MAX))


class RelayReceipt:
    """The pipeline's handle on one relayed copy (the interface of store.service.Receipt)."""

    where = "relay"

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self._closed = False

    async def withdraw(self) -> None:
        self._closed = True
        await self.relay.withdraw(self.name)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.relay.release(self.name)


class RelayRegistry:
    """The mailbox registry as the front's pipeline sees it: copies go to the relay queue.

    Everything else (the executor, usage estimates from the directory) is the real registry's.
    """

    def __init__(self, registry: MailboxRegistry, relay: Relay) -> None:
        self._registry = registry
        self.relay = relay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)

    async def deliver_undoable(self, user: User, item: SpoolItem) -> RelayReceipt:
        junk = item.special_use == "\\Junk"
        name = await self.relay.deposit(Copy(user.id, user.address, junk, item.raw))
        return RelayReceipt(self.relay, name)

    async def deliver(self, user: User, item: SpoolItem) -> str:
        receipt = await self.deliver_undoable(user, item)
        await receipt.close()
        return receipt.where
