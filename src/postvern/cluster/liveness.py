"""Automatic failover of a dead mailbox node: liveness leases, self-fencing, one watcher.

On only with ``[cluster] failover_after`` (seconds, the lease; 0 by default). Redis, which the
cluster has anyway, holds three kinds of keys (``postvern:cluster:nodes:…``):

``lease:<node>``
    The mailbox node's liveness lease: its process's random token, with a time to live of
    ``failover_after``, renewed every RENEW_EVERY by a script that extends it only for that
    token (or takes it if it is free). Anything else there means the node must not serve:
    ``failed-over:<front>:<time>`` once a front has failed it over (kept, without expiry,
    until ``postvern cluster rejoin``), or another process's token.
``member:<node>``
    Set by every renewal, removed (with the lease) when the node stops cleanly: the node
    takes part in liveness and is not stopped on purpose. A node without it (not started
    yet, stopped by its administrator, or ``failover_after`` off there) is never failed
    over automatically.
``watcher``
    The lock of the one front that watches (token, time to live WATCH_LOCK_SECONDS, renewed
    by compare-and-extend, released by compare-and-delete), and ``failed:<node>``: what its
    last automatic failover did, for ``cluster status``.

**Self-fencing.** A node serves — IMAP and POP3 logins, LMTP recipients and deliveries, the
portal's requests — only while its last confirmed renewal is younger than
``failover_after - FENCE_GUARD``; the check is made at each of those requests, on the
node's own monotonic clock, and a timer set at that instant ends every open IMAP/POP3
session and closes the mailboxes. A node whose renewal is refused (the lease is marked
failed over, or another process holds it) fences at once.

**The timing argument.** Let *s* be the moment (node's monotonic clock) the node *sent* its
last renewal that succeeded. The node stops accepting work at *s* + L − G (L =
``failover_after``, G = FENCE_GUARD): it counts from the send, not the answer, so a slow
answer only makes it fence earlier. Redis received that renewal at or after *s* and keeps the
key until L later on Redis's own clock; allowing that clock to run up to CLOCK_SKEW ahead of
the node's over one lease, the key exists until at least *s* + L − CLOCK_SKEW. The watcher
acts only once it has seen the key missing and then still missing MARGIN later, and it acts
by writing the ``failed-over`` mark with SET NX — atomic in Redis against the node's renewal,
so after that the node can never take its lease back. So no failover starts before
*s* + L − CLOCK_SKEW + MARGIN, which is MARGIN − CLOCK_SKEW + G = 2·RENEW_EVERY + G (6 s)
after the node stopped accepting work: time for its sessions to be ended and for writes
already running to settle. The margin (5 s) is larger than the renewal interval and the skew
allowance together (3 s). Redis stores a key's expiry as a wall-clock time, so a forward step
of its host's clock larger than CLOCK_SKEW breaks the argument: let that clock be slewed
(NTP), never stepped, while nodes hold leases.

What the argument does not cover: a node frozen (SIGSTOP, a paused VM) in the middle of a
write completes that write when it resumes, after its lease lapsed; the write lands in the
node's own file, which the map no longer points to — lost like every change made after the
last replication point, which any failover loses (docs/cluster.md). Mail is not lost that
way: fronts keep each copy until a replication covers it and send it to the new node.
When it resumes, the node is fenced before any new request is served: logins, LMTP and the
portal check the lease at each request, an IMAP session at each read, and the expired
timer interrupts every session in its own callback — which asyncio's loop runs before the
wake-ups that reading data schedules, so a POP3 command waiting in the socket is not read
either (under uvloop, whose order differs, such a POP3 command may still be read).

**One watcher.** Every front with ``failover_after`` set tries for the ``watcher`` lock each
RENEW_EVERY; the holder reads every mailbox node's lease and, for one missing past MARGIN,
writes the mark and runs the administrator's failover (admin.ClusterOps: the node must not
answer over mutual TLS, or answer that it serves nobody), with the front's certificate over
ALPN ``postvern-failover`` (move.py allows a front only STATUS and RESTORE, and only from
another node's replica). Users whose restore failed stay on the node and are tried again
every RETRY_USERS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio
import redis.exceptions

from postvern.abuse.shared import connection_pool
from postvern.cluster.admin import ClusterOps
from postvern.cluster.nodes import ClusterError, Node, mailbox_nodes
from postvern.directory.accounts import MAILBOX_DIR
from postvern.directory.db import Directory

log = logging.getLogger(__name__)

KEY_PREFIX = "postvern:cluster:nodes"
# A node renews its lease this often: several renewals fit in one lease, so a slow answer or
# a dropped Redis connection costs nothing, and one round trip every 2 s is nothing to Redis.
RENEW_EVERY = 2.0
# A node stops serving this long before its lease could lapse (one renewal's worth).
FENCE_GUARD = RENEW_EVERY
# How far Redis's clock (it counts the lease's time to live) may run ahead of a node's
# monotonic clock over one lease: a step of the wall clock Redis uses, or a drifting one.
CLOCK_SKEW = 1.0
# A watcher fails a node over only after its lease has been seen missing this long: more
# than a renewal interval and the skew allowance (see the timing argument above).
MARGIN = 2 * RENEW_EVERY + CLOCK_SKEW
# The smallest lease: a few renewals must fit in it, or one slow answer would fence a node.
MIN_FAILOVER_AFTER = 4 * RENEW_EVERY
# The watcher's lock lapses after about three missed renewals; another front then watches.
WATCH_LOCK_SECONDS = 3 * RENEW_EVERY
# Users left on a failed-over node (their restore failed) are tried again this often.
RETRY_USERS = 60.0
# A front stopping lets a failover in progress finish this long: a restore cut off after the
# new node wrote the files but before the map was flipped leaves the user to the admin.
STOP_GRACE = 20.0
FAILED_MARK = "failed-over:"  # the lease's value once a front failed the node over
RedisDown = (redis.exceptions.RedisError, OSError)

# Extend the lease for this token, or take it if it is free; and mark the node a member.
# Returns 1, or what holds the lease instead.
_NODE_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif v == false then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else return v end
redis.call('SET', KEYS[2], '1')
return 1
"""
# Replace the value if it is still ARGV[1] (compare-and-set): ARGV[2] the new value, '' to
# delete; ARGV[3] its time to live in ms, '' for none.
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
elseif ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[2])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


def key(what: str, node: str = "") -> str:
    return f"{KEY_PREFIX}:{what}:{node}" if node else f"{KEY_PREFIX}:{what}"


def check_setting(failover_after: float, redis_url: str | None) -> None:
    if failover_after and failover_after < MIN_FAILOVER_AFTER:
        raise ClusterError(f"failover_after must be 0 (off) or at least {MIN_FAILOVER_AFTER:g}")
    if failover_after and not redis_url:
        raise ClusterError("failover_after needs Redis: set [abuse] redis_url")


def client(redis_url: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis(connection_pool=connection_pool(redis_url))


def lease_client(redis_url: str) -> redis.asyncio.Redis:
    """A node's own connection for its lease: a renewal may take up to RENEW_EVERY (the
    request path's 1 s would fence a merely busy node), and a late answer is safe, since
    the node counts from the send."""
    pool = redis.asyncio.ConnectionPool.from_url(
        redis_url, socket_timeout=RENEW_EVERY, socket_connect_timeout=RENEW_EVERY
    )
    return redis.asyncio.Redis(connection_pool=pool)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class NodeLease:
    """A mailbox node's liveness lease, and whether it may serve now."""

    def __init__(self, client: redis.asyncio.Redis, node: str, lease_seconds: float) -> None:
        self.redis = client
        self.node = node
        self.ttl_ms = round(lease_seconds * 1000)
        self.window = lease_seconds - FENCE_GUARD
        self.token = f"{node}:{secrets.token_hex(16)}"  # this process
        self.on_fence: Callable[[], None] | None = None  # Backend.fence
        self.failed_over = ""  # the mark, if a front failed this node over
        self._confirmed: float | None = None  # when the last good renewal was sent
        self._fenced = True  # serves nothing until the first renewal succeeds
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._redis_down = False
        self._renew = client.register_script(_NODE_RENEW)
        self._swap = client.register_script(_SWAP)

    def serving(self) -> bool:
        """May the node serve now? Safe from any thread (a float read and a clock)."""
        confirmed = self._confirmed
        return confirmed is not None and time.monotonic() - confirmed < self.window

    async def start(self) -> None:
        """The first renewal (so a node that was failed over says so before it listens),
        then one every RENEW_EVERY."""
        await self.renew_once()
        if self.failed_over:
            log.warning(
                "mailbox node %s was failed over (%s): its users now live on other nodes and"
                " it serves nobody; set its old mailbox files aside, then run"
                " `postvern cluster rejoin %s`",
                self.node,
                self.failed_over,
                self.node,
            )
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """A renewal every RENEW_EVERY from the start of the last, however long it took."""
        started = time.monotonic()  # start() has just renewed
        while True:
            await asyncio.sleep(max(0.0, started + RENEW_EVERY - time.monotonic()))
            started = time.monotonic()
            await self.renew_once()

    async def renew_once(self) -> None:
        sent = time.monotonic()  # before sending: a slow answer only makes the node fence earlier
        try:
            got = await self._renew(
                keys=[key("lease", self.node), key("member", self.node)],
                args=[self.token, self.ttl_ms],
            )
        except RedisDown as e:
            if not self._redis_down:
                log.warning("liveness lease: Redis unreachable (%s)", type(e).__name__)
            self._redis_down = True
            self._check()
            return
        self._redis_down = False
        if got == 1:
            self._confirmed = sent
            self.failed_over = ""
            self._arm()
            if self._fenced:
                self._fenced = False
                log.info("mailbox node %s: liveness lease held, serving", self.node)
            return
        holder = _text(got)
        self._confirmed = None
        if holder.startswith(FAILED_MARK):
            self.failed_over = "by {} at {}".format(*_mark_parts(holder))
        self._check(f"the lease is held by {'a failover' if self.failed_over else 'another'}")

    def _arm(self) -> None:
        """The timer that fences the node the moment its last renewal is too old."""
        if self._timer is not None:
            self._timer.cancel()
        if self._confirmed is not None:
            left = self._confirmed + self.window - time.monotonic()
            self._timer = asyncio.get_running_loop().call_later(max(left, 0.0), self._check)

    def _check(self, why: str = "the lease was not renewed in time") -> None:
        """Fence now if the node may no longer serve (the timer, or a failed renewal)."""
        if self.serving():
            self._arm()  # a timer may fire a hair early
            return
        if self._fenced:
            return
        self._fenced = True
        log.error("mailbox node %s fenced: %s; it serves nobody until it holds it", self.node, why)
        if self.on_fence is not None:
            self.on_fence()  # here, in the timer's callback: see the timing argument

    async def stop(self) -> None:
        """A clean stop is on purpose: the lease (if still this process's) and the member
        key go, so no front fails the node over while it is stopped, and its next start
        takes the lease at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(*RedisDown):
            if await self._swap(keys=[key("lease", self.node)], args=[self.token, "", ""]):
                await self.redis.delete(key("member", self.node))
        await self.redis.aclose()


def _mark_parts(mark: str) -> tuple[str, str]:
    """(front, UTC time) of a ``failed-over:<front>:<unix time>`` mark."""
    _, front, when = [*mark.split(":", 2), "", ""][:3]
    try:
        at = datetime.fromtimestamp(int(when), UTC).isoformat(" ", "seconds")
    except ValueError:
        at = "?"
    return front, at


class Watcher:
    """A front's side: hold the watcher lock, and fail over nodes whose lease lapsed."""

    def __init__(self, client: redis.asyncio.Redis, me: str, ops: ClusterOps) -> None:
        self.redis = client
        self.me = me
        self.ops = ops
        self.token = f"{me}:{secrets.token_hex(16)}"
        self.watching = False  # holds the lock (metrics)
        self.nodes_failed_over = 0  # automatic failovers this process started (metrics)
        self.users_failed_over = 0
        self.users_not_failed_over = 0
        self._absent: dict[str, float] = {}  # node -> loop time its lease was first missing
        self._retry_at: dict[str, float] = {}
        self._said: set[tuple[str, str]] = set()  # (node, problem) logged once
        self._running: asyncio.Task[None] | None = None  # one failover at a time
        self._task: asyncio.Task[None] | None = None
        self._swap = client.register_script(_SWAP)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                if await self._hold_lock():
                    await self._scan()
            except RedisDown as e:
                if ("", "redis") not in self._said:
                    log.warning("failover watcher: Redis unreachable (%s)", type(e).__name__)
                    self._said.add(("", "redis"))
                self.watching = False
                self._absent.clear()  # a lapse is only counted while it is watched
            await asyncio.sleep(RENEW_EVERY)

    async def _hold_lock(self) -> bool:
        lock, ms = key("watcher"), round(WATCH_LOCK_SECONDS * 1000)
        if self.watching:
            self.watching = bool(await self._swap(keys=[lock], args=[self.token, self.token, ms]))
        else:
            self.watching = bool(await self.redis.set(lock, self.token, nx=True, px=ms))
            if self.watching:
                self._said.discard(("", "redis"))
                log.info("failover watcher: this front (%s) watches the mailbox nodes", self.me)
        if not self.watching:
            self._absent.clear()
        return self.watching

    async def _scan(self) -> None:
        known = sorted(mailbox_nodes(self.ops.nodes), key=lambda n: n.name)
        names = [n.name for n in known]
        leases = await self.redis.mget([key("lease", n) for n in names])
        members = await self.redis.mget([key("member", n) for n in names])
        now = asyncio.get_running_loop().time()
        live = [n for n, v in zip(names, leases, strict=True) if v and not _failed(v)]
        for node, lease, member in zip(known, leases, members, strict=True):
            if lease is None and member is not None:
                since = self._absent.setdefault(node.name, now)
                if now - since >= MARGIN:
                    self._start(node, live, "")
                continue
            self._absent.pop(node.name, None)  # held, failed over, or stopped on purpose
            if lease is not None and _failed(lease):
                if now >= self._retry_at.get(node.name, 0.0):
                    self._retry_at[node.name] = now + RETRY_USERS
                    self._start(node, live, _text(lease))

    def _start(self, node: Node, live: list[str], mark: str) -> None:
        if self._running is not None and not self._running.done():
            return
        self._running = asyncio.create_task(self._logged(self._fail_over(node, live, mark)))

    async def _logged(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except RedisDown as e:  # the mark stays if it was written: tried again later
            log.warning("automatic failover: Redis unreachable (%s)", type(e).__name__)
        except Exception:  # the directory, say; the same
            log.exception("automatic failover failed")

    async def _fail_over(self, node: Node, live: list[str], mark: str) -> None:
        """Mark the node failed over (unless ``mark``: it already is), then fail it over."""
        if not node.replica or not live:
            self._say_once(node.name, "no replica in nodes.toml, or no live node to take over")
            return
        if not mark:
            mark = f"{FAILED_MARK}{self.me}:{int(time.time())}"
            if not await self.redis.set(key("lease", node.name), mark, nx=True):
                return  # the node renewed after all, or another watcher was first
            since = self._absent.pop(node.name, None)
            lapsed = 0.0 if since is None else asyncio.get_running_loop().time() - since
            log.warning(
                "mailbox node %s: liveness lease missing for %.1f s; failing it over",
                node.name,
                lapsed,
            )
            self.nodes_failed_over += 1
            self._retry_at[node.name] = asyncio.get_running_loop().time() + RETRY_USERS
        elif not await self.ops._db(self.ops.directory.users_on_node, node.name):
            return  # nothing left to retry
        try:
            reports = await self.ops.failover(node.name, among=live, fenced_ok=True)
        except ClusterError as e:
            # It answers and says it serves: take the mark back (if still ours) and leave
            # the node to the administrator.
            self._say_once(node.name, f"not failed over: {e}")
            await self._swap(keys=[key("lease", node.name)], args=[mark, "", ""])
            return
        except Exception:  # the directory, say: the mark stays, and it is tried again
            log.exception("automatic failover of mailbox node %s failed", node.name)
            return
        done = sum(1 for r in reports if not r.error)
        self.users_failed_over += done
        self.users_not_failed_over += len(reports) - done
        log.warning(
            "mailbox node %s failed over automatically: %d users restored on other nodes,"
            " %d not (tried again in %.0f s)",
            node.name,
            done,
            len(reports) - done,
            RETRY_USERS,
        )
        front, at = _mark_parts(mark)
        record = {"by": front, "at": at, "moved": done, "left": len(reports) - done}
        await self.redis.set(key("failed", node.name), json.dumps(record))

    def _say_once(self, node: str, problem: str) -> None:
        if (node, problem) not in self._said:
            self._said.add((node, problem))
            log.error("automatic failover of mailbox node %s: %s", node, problem)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()  # no new failover starts
        running = self._running
        if running is not None and not running.done():
            log.info("failover watcher: letting the failover in progress finish")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(running), STOP_GRACE)
        for task in (self._task, self._running):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, *RedisDown):
                    await task
        if self.watching:
            with contextlib.suppress(*RedisDown):
                await self._swap(keys=[key("watcher")], args=[self.token, "", ""])
        await self.redis.aclose()


def _failed(value: Any) -> bool:
    return _text(value).startswith(FAILED_MARK)


async def describe(redis_url: str, names: list[str]) -> dict[str, str]:
    """For ``cluster status``: each mailbox node's lease, and its automatic failover."""
    r = client(redis_url)
    try:
        leases = await r.mget([key("lease", n) for n in names])
        records = await r.mget([key("failed", n) for n in names])
    except RedisDown as e:
        return dict.fromkeys(names, f"lease=unknown (Redis: {type(e).__name__})")
    finally:
        await r.aclose()
    notes = {}
    for name, lease, record in zip(names, leases, records, strict=True):
        text = "lease=none" if lease is None else _text(lease)
        if text.startswith(FAILED_MARK):
            front, at = _mark_parts(text)
            note = f"FAILED OVER automatically by {front} at {at} UTC"
            if record is not None:
                done = json.loads(record)
                note += f" ({done.get('moved', 0)} users moved, {done.get('left', 0)} left)"
        else:
            note = "lease=none" if lease is None else "lease=held"
        notes[name] = note
    return notes


async def rejoin(redis_url: str, node: str) -> bool:
    """``cluster rejoin``: remove the failed-over mark; False if there was none."""
    r = client(redis_url)
    try:
        value = await r.get(key("lease", node))
        if value is None or not _failed(value):
            return False
        swap = r.register_script(_SWAP)
        done = bool(await swap(keys=[key("lease", node)], args=[value, "", ""]))
        await r.delete(key("failed", node))
        return done
    finally:
        await r.aclose()


def stale_mailboxes(data_dir: Path, directory: Directory, me: str) -> int:
    """Blocking: mailbox files here whose users the map places on another node (moved or
    failed over while this node was away); this node never serves them."""
    folder = data_dir / MAILBOX_DIR
    if not folder.is_dir():
        return 0
    here = {u.id for u in directory.users_on_node(me)}
    ids = [p.name.removesuffix(".sqlite") for p in folder.glob("*.sqlite")]
    return sum(
        1 for user_id in ids if user_id not in here and directory.mailbox_node(user_id) is not None
    )
