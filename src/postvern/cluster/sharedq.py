"""The fronts' shared queue: no accepted message depends on one front's disk.

A front accepts mail into two queues of its own — the relay queue (relay.py: local copies on
their way to a mailbox node) and the outbound queue (mta/queue.py: mail for the Internet). With
``[cluster] queue_store`` set, each queued message is also written, sealed, to object storage
under the front's prefix (``<store>/<front>/relay/<name>``, ``<store>/<front>/mta/<id>``)
*before* the front answers 250, and removed from there only when the message is finished (the
mailbox node's copy covered by its replica, the remote MTA's final 250, or the DSN queued). The
local files stay the working copy: the object store is written once per message and deleted
once, never read on the way.

Redis coordinates who delivers what (Redis' documented single-instance lock pattern: ``SET NX
PX`` with a random token, renewed and released by a script that checks the token):

* **lease** — each front holds ``…:lease:<front>`` and renews it every third of
  ``lease_seconds``. A front whose lease has lapsed is dead as far as the others are concerned.
* **claim** — a message (relay name or queue id) is handed to a mailbox node or a remote MTA
  only by the front holding ``…:claim:<id>``, renewed while it delivers. So two live fronts never
  deliver one message at once, whatever else goes wrong.
* **takeover** — a front that sees another's lease lapsed and objects under its prefix takes
  ``…:takeover:<front>``, checks the lease is still gone, and for each object it can claim,
  writes it into its own queues and under its own prefix, then deletes the dead front's object.
  A relay copy keeps its name, which is its delivery id, so a mailbox node that already has it
  stores it once (store/spool.py).
* **progress** — each outbound recipient a front finishes (and each notice it hands over) is
  written to ``…:progress:<id>`` after the local commit; a front taking the entry over sends
  only to the others. A recipient sent to by a front that died before that write is sent to
  again (at least once per recipient, RFC 5321 §6.1).
* **fencing, as far as SMTP allows** — a claim is granted only under the front's lease, and
  both are asked of Redis again right before DATA and before each LMTP hand-off, so a front
  frozen past its lease sends nothing taken over; one frozen after that answer still can.
* **return** — a front starting (or finding its lease lost) takes its own takeover lock, sets its
  lease, and reconciles: local copies whose object is gone were taken over and are dropped;
  objects it lacks locally (a lost disk) are fetched. Until then it claims nothing.

The queue files are sealed under keys derived from the server key every node shares: relay files
are already sealed (relay.py) and go up byte for byte; an outbound entry is sealed here with
ChaCha20-Poly1305 under its own subkey, its object name as associated data. Nothing is in the
object store in plaintext, and a front that reads another's object needs no key exchange.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
import redis.exceptions
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from postvern.abuse.shared import connection_pool
from postvern.backup.targets import Target, TargetError, open_target

if TYPE_CHECKING:
    from postvern.cluster.relay import RelayStore
    from postvern.config import Settings
    from postvern.mta.queue import Queue, QueueRecipient, RecipientRecord, RecipientUpdate

log = logging.getLogger(__name__)

RELAY = "relay"
OUTBOUND = "mta"
KINDS = (RELAY, OUTBOUND)
KEY_PREFIX = "postvern:cluster:queue"
NONCE_BYTES = 12
# Present in the data directory once the front's queues have been mirrored to the store: a
# front that turns the shared queue on uploads what it already holds instead of taking the
# missing objects for a takeover (which would drop its queue).
MIRRORED_MARK = "cluster-queue.mirrored"
# A takeover claims this many messages in one round trip, and moves this many at a time (each
# is a read from the store, a write to it, and a local write, all waiting on I/O).
TAKEOVER_BATCH = 256
TAKEOVER_PARALLEL = 8
# A claim another front holds is tried again after this: that front is delivering it.
CLAIM_RETRY = 1.0
# An outbound entry's per-recipient progress (``progress:<id>``) goes with the entry when it
# finishes or is deleted; this time to live only bounds a key whose deletion was lost (Redis
# down at that moment). It is far beyond any entry's life: the queue gives a recipient up after
# ``[mta] max_queue_days`` (5 by default), counted again from a takeover.
PROGRESS_TTL_MS = 60 * 86400 * 1000
# The Redis set of fronts that ever shared their queue: a front later removed from nodes.toml
# is still looked at, and taken over, while it has objects.
FRONTS_SET = "fronts"
# Entries finished lately that take no more progress writes (see SharedQueue.progress).
RECENTLY_FINISHED = 4096
# The administrator's command waits this long for Redis.
CLI_REDIS_TIMEOUT = 10.0
RedisDown = (redis.exceptions.RedisError, OSError)

# Compare-and-set scripts: only the token's holder renews or releases (Redis' lock pattern).
# A message is claimed only by a front that holds its lease (KEYS[1]): a front that was frozen
# past its lease claims nothing more until it has reconciled (``SharedQueue._rejoin``).
_CLAIM_LEASED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  local none = {}
  for i = 2, #KEYS do none[i - 1] = 0 end
  return none
end
local out = {}
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v == false or v == ARGV[1] then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2]); out[i - 1] = 1
  else out[i - 1] = 0 end
end
return out
"""
# Every key (the lease, then claims) still holds this process' token: checked right before a
# message goes out, so a front that was frozen while it held them sends nothing taken over.
_HOLDS = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) ~= ARGV[1] then return 0 end
end
return 1
"""
_CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v == false or v == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2]); out[i] = 1
  else out[i] = 0 end
end
return out
"""
_RENEW = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]); n = n + 1 end
end
return n
"""
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


class SharedStore:
    """The objects; blocking (boto3), so every call runs in a worker thread."""

    def __init__(self, target: Target, me: str, key: bytes) -> None:
        self.target = target
        self.me = me
        self._aead = ChaCha20Poly1305(key)
        # The progress fields' names: a key of their own, derived from the entries' key.
        self._names_key = hmac.new(key, b"progress names", hashlib.sha256).digest()

    @classmethod
    def open(cls, url: str, me: str, key: bytes) -> SharedStore:
        return cls(open_target(url), me, key)

    def put(self, kind: str, name: str, data: bytes) -> None:
        self.target.put(f"{self.me}/{kind}/{name}", data)

    def get(self, front: str, kind: str, name: str) -> bytes:
        return self.target.get(f"{front}/{kind}/{name}")

    def names(self, front: str) -> dict[str, set[str]]:
        """The front's objects by kind."""
        out: dict[str, set[str]] = {kind: set() for kind in KINDS}
        for key in self.target.list(f"{front}/"):
            _, kind, name = key.split("/", 2)
            if kind in out:
                out[kind].add(name)
        return out

    def delete(self, kind: str, names: Sequence[str], front: str | None = None) -> None:
        if names:
            self.target.delete([f"{front or self.me}/{kind}/{n}" for n in names])

    # An outbound entry: its envelope and message, sealed, bound to its name.

    def seal(self, entry_id: str, envelope: dict[str, Any], message: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        plain = json.dumps(envelope).encode() + b"\n" + message
        return nonce + self._aead.encrypt(nonce, plain, f"{OUTBOUND}/{entry_id}".encode())

    def unseal(self, entry_id: str, data: bytes) -> tuple[dict[str, Any], bytes]:
        aad = f"{OUTBOUND}/{entry_id}".encode()
        plain = self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
        head, _, message = plain.partition(b"\n")
        return json.loads(head), message

    # A recipient's progress in Redis: named by a keyed hash of entry and address (no address
    # in Redis), its outcome sealed and bound to that name.

    def progress_field(self, entry_id: str, address: str) -> str:
        mac = hmac.new(self._names_key, f"{entry_id}\n{address}".encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    def seal_progress(self, field: str, record: dict[str, Any]) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        plain = json.dumps(record, separators=(",", ":")).encode()
        return nonce + self._aead.encrypt(nonce, plain, f"progress/{field}".encode())

    def unseal_progress(self, field: str, data: bytes) -> dict[str, Any]:
        aad = f"progress/{field}".encode()
        record: dict[str, Any] = json.loads(
            self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
        )
        return record


class Gate:
    """Writers of new messages pass while no reconciliation runs; a reconciliation waits for
    the writers inside to finish, so it never sees a message half written (object without
    local copy, or the reverse)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._inside = 0
        self._empty = asyncio.Event()
        self._empty.set()
        self._owner: asyncio.Task[Any] | None = None  # the reconciliation may write itself

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        if self._owner is not None and asyncio.current_task() is self._owner:
            yield
            return
        await self._open.wait()
        self._inside += 1
        self._empty.clear()
        try:
            yield
        finally:
            self._inside -= 1
            if not self._inside:
                self._empty.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._open.clear()
        try:
            await self._empty.wait()
            self._owner = asyncio.current_task()
            yield
        finally:
            self._owner = None
            self._open.set()


class Coordinator:
    """Leases, claims and takeover locks in Redis for one front process."""

    def __init__(self, client: redis.asyncio.Redis, me: str, ttl: float) -> None:
        self.redis = client
        self.me = me
        self.ttl_ms = max(1, round(ttl * 1000))
        self.token = f"{me}:{secrets.token_hex(16)}"  # this process, not just this node
        self.ready = asyncio.Event()  # set while the lease is held and the queues reconciled
        self.held: dict[str, int] = {}  # claims held, with how many deliveries use each
        self.locks: set[str] = set()  # fronts whose takeover lock this process holds
        self._claim = client.register_script(_CLAIM)
        self._claim_leased = client.register_script(_CLAIM_LEASED)
        self._holds = client.register_script(_HOLDS)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def key(self, what: str, name: str) -> str:
        return f"{KEY_PREFIX}:{what}:{name}"

    def new_token(self) -> None:
        """A fresh token before (re)taking the lease: a claim asked before a lapse and
        answered after the new lease is set must not count, and claims held before it
        are no longer held (a frozen front's claims lapsed with its lease)."""
        self.token = f"{self.me}:{secrets.token_hex(16)}"
        self.held.clear()

    async def claim(self, ids: Sequence[str]) -> set[str]:
        """The ids this front may deliver now; waits until the front is ready."""
        await self.ready.wait()
        mine = {i for i in ids if i in self.held}
        ask = [i for i in ids if i not in self.held]
        if ask:
            keys = [self.key("lease", self.me)] + [self.key("claim", i) for i in ask]
            got = await self._claim_leased(keys=keys, args=[self.token, self.ttl_ms])
            mine |= {i for i, ok in zip(ask, got, strict=True) if ok}
        for i in mine:
            self.held[i] = self.held.get(i, 0) + 1
        return mine

    async def holds(self, message_id: str) -> bool:
        """This process still holds its lease and ``message_id``'s claim, asked of Redis now
        (one round trip): a front frozen past its lease (a stopped VM) had both taken, and
        must not send what another front now delivers. Unknown (Redis down) is no."""
        keys = [self.key("lease", self.me), self.key("claim", message_id)]
        try:
            return bool(await self._holds(keys=keys, args=[self.token]))
        except RedisDown as e:
            log.warning("shared queue: claim not confirmed (Redis: %s)", type(e).__name__)
            return False

    async def release(self, ids: Sequence[str]) -> None:
        done = []
        for i in ids:
            left = self.held.get(i, 0) - 1
            if left > 0:
                self.held[i] = left
            elif self.held.pop(i, None) is not None:
                done.append(self.key("claim", i))
        if done:
            await self._release(keys=done, args=[self.token])

    async def lock(self, front: str) -> bool:
        got = await self._claim(keys=[self.key("takeover", front)], args=[self.token, self.ttl_ms])
        if got[0]:
            self.locks.add(front)
        return bool(got[0])

    async def unlock(self, front: str) -> None:
        self.locks.discard(front)
        await self._release(keys=[self.key("takeover", front)], args=[self.token])

    async def take_lease(self) -> None:
        await self.redis.set(self.key("lease", self.me), self.token, px=self.ttl_ms)

    async def renew(self) -> bool:
        """Renew the lease, the claims and the locks; False if the lease was lost."""
        keys = [self.key("claim", i) for i in self.held]
        keys += [self.key("takeover", f) for f in self.locks]
        if keys:
            await self._renew(keys=keys, args=[self.token, self.ttl_ms])
        kept = await self._renew(keys=[self.key("lease", self.me)], args=[self.token, self.ttl_ms])
        return bool(kept)

    async def lapsed(self, fronts: Sequence[str]) -> list[str]:
        """The fronts among ``fronts`` that hold no lease."""
        if not fronts:
            return []
        values = await self.redis.mget([self.key("lease", f) for f in fronts])
        return [f for f, v in zip(fronts, values, strict=True) if v is None]


class SharedQueue:
    """A front's side of the shared queue: mirroring, its lease, and takeovers."""

    def __init__(
        self,
        store: SharedStore,
        coordinator: Coordinator,
        others: Sequence[str],
        mark: Path,
        ttl: float,
    ) -> None:
        self.store = store
        self.coord = coordinator
        self.others = list(others)
        self.mark = mark
        self.ttl = ttl
        self.gate = Gate()
        self.relay: RelayStore | None = None
        self.queue: Queue | None = None
        self.on_adopted: list[Callable[[], None]] = []  # wake the relay / the MTA
        self._task: asyncio.Task[None] | None = None
        self.taken_over = 0  # messages this front took from others (metrics)
        # Progress writes and the removal of an entry's progress go one at a time, and an
        # entry finished lately takes no more writes, so none lands after the removal.
        self._progress_lock = asyncio.Lock()
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.last_takeover: float | None = None  # when the last takeover finished (time.time)

    @classmethod
    def open(
        cls, url: str, redis_url: str, me: str, others: Sequence[str], key: bytes, data: Path,
        ttl: float,
    ) -> SharedQueue:  # fmt: skip
        client = redis.asyncio.Redis(connection_pool=connection_pool(redis_url))
        return cls(
            SharedStore.open(url, me, key), Coordinator(client, me, ttl), others,
            data / MIRRORED_MARK, ttl,
        )  # fmt: skip

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # -- what the queues call ---------------------------------------------------------------

    async def put_outbound(
        self,
        entry_id: str,
        mail_from: str,
        recipients: Sequence[QueueRecipient],
        message: bytes,
        envid: str | None,
        ret: str | None,
        smtputf8: bool,
    ) -> None:
        envelope = {
            "from": mail_from,
            "rcpts": [
                [r.address, sorted(r.notify) if r.notify is not None else None, r.orcpt]
                for r in recipients
            ],
            "envid": envid,
            "ret": ret,
            "utf8": smtputf8,
        }

        def seal_and_put() -> None:  # sealing a large message is off the loop too
            self.store.put(OUTBOUND, entry_id, self.store.seal(entry_id, envelope, message))

        await self._thread(seal_and_put)

    async def finished(self, entry_id: str) -> None:
        """The entry is done (final reply or DSN queued): its object and progress go."""
        try:
            await self._thread(self.store.delete, OUTBOUND, [entry_id])
        except TargetError as e:  # it comes back at the next reconciliation, to be dropped
            log.warning("shared queue: cannot delete a finished entry's object: %s", e)
        async with self._progress_lock:
            self._finished[entry_id] = None
            while len(self._finished) > RECENTLY_FINISHED:
                self._finished.popitem(last=False)
            try:
                await self.coord.redis.delete(self.coord.key("progress", entry_id))
            except RedisDown as e:  # PROGRESS_TTL_MS bounds it
                log.warning("shared queue: progress not removed (Redis: %s)", type(e).__name__)

    async def progress(self, entry_id: str, records: Sequence[RecipientRecord]) -> None:
        """Recipients of ``entry_id`` finished here (delivered or failed, with or without a
        notice still owed): a front that takes the entry over sends only to the others, and
        sends only the notices still owed. Called after the local commit; if this front
        dies before it, those recipients are tried again (at least once, per recipient)."""
        if not records:
            return
        fields: dict[str | bytes, bytes] = {}
        for r in records:
            name = self.store.progress_field(entry_id, r.address)
            fields[name] = self.store.seal_progress(name, _progress_record(r))
        key = self.coord.key("progress", entry_id)
        async with self._progress_lock:
            if entry_id in self._finished:
                return
            try:
                async with self.coord.redis.pipeline(transaction=True) as pipe:
                    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                    pipe.pexpire(key, PROGRESS_TTL_MS)
                    await pipe.execute()
            except RedisDown as e:
                log.warning("shared queue: progress not recorded (Redis: %s)", type(e).__name__)

    async def _settled(
        self, entry_id: str, recipients: Sequence[QueueRecipient]
    ) -> dict[str, RecipientUpdate]:
        """The recipients some front finished, by address, as recorded by :meth:`progress`."""
        names = [self.store.progress_field(entry_id, r.address) for r in recipients]
        values = await self.coord.redis.hmget(self.coord.key("progress", entry_id), names)
        settled = {}
        for r, name, value in zip(recipients, names, values, strict=True):
            if value is not None:
                sealed = value.encode() if isinstance(value, str) else value
                settled[r.address] = _settled_update(self.store.unseal_progress(name, sealed))
        return settled

    async def holds(self, message_id: str) -> bool:
        """Still this front's to send, asked of Redis right before it goes (runner, relay)."""
        return await self.coord.holds(message_id)

    async def claim(self, entry_id: str) -> bool:
        """Deliver ``entry_id`` only if True; release it after."""
        try:
            got = await self.coord.claim([entry_id])
        except RedisDown as e:
            log.warning("shared queue: no claim (Redis: %s)", type(e).__name__)
            got = set()
        if not got:
            await asyncio.sleep(CLAIM_RETRY)  # another front delivers it; do not spin
        return bool(got)

    async def release(self, entry_id: str) -> None:
        with contextlib.suppress(*RedisDown):  # it expires by itself
            await self.coord.release([entry_id])

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Take the lease and reconcile (claims wait for it), then keep watch; in the
        background, so a front whose Redis is slow to come still accepts mail."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="shared-queue")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.coord.redis.aclose()

    async def _rejoin(self) -> None:
        """Own takeover lock, lease, reconciliation, in that order (module docstring)."""
        self.coord.ready.clear()
        self.coord.new_token()
        while True:
            try:
                if await self.coord.lock(self.coord.me):
                    break
            except RedisDown as e:
                log.warning("shared queue: waiting for Redis (%s)", type(e).__name__)
            await asyncio.sleep(self.ttl / 3)
        try:
            await self.coord.take_lease()
            await self.coord.redis.sadd(f"{KEY_PREFIX}:{FRONTS_SET}", self.coord.me)
            async with self.gate.exclusive():
                await self._reconcile()
        finally:
            await self.coord.unlock(self.coord.me)
        self.coord.ready.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._rejoin()
                break
            except Exception:
                log.exception("shared queue: cannot take the lease and reconcile; again soon")
                await asyncio.sleep(self.ttl / 3)
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if not await self.coord.renew():
                    log.error("shared queue: this front's lease lapsed; reconciling")
                    await self._rejoin()
                    continue
                for front in await self.coord.lapsed(await self._fronts()):
                    await self._take_over(front)
            except RedisDown as e:
                log.warning("shared queue: Redis unreachable (%s)", type(e).__name__)
            except Exception:
                log.exception("shared queue: watch failed")

    async def _fronts(self) -> list[str]:
        """The other fronts: those of nodes.toml, and any that ever shared its queue (one
        removed from nodes.toml may have left mail)."""
        known = await self.coord.redis.smembers(f"{KEY_PREFIX}:{FRONTS_SET}")
        names = {n.decode() if isinstance(n, bytes) else str(n) for n in known}
        return sorted((names | set(self.others)) - {self.coord.me})

    # -- reconciliation -----------------------------------------------------------------------

    async def _reconcile(self) -> None:
        objects: dict[str, set[str]] = await self._thread(self.store.names, self.store.me)
        first = not await self._thread(self.mark.exists)
        if self.relay is not None:
            await self._thread(self._reconcile_relay, objects[RELAY], first)
        if self.queue is not None:
            await self._reconcile_outbound(objects[OUTBOUND], first)
        if first:
            await self._thread(_touch, self.mark)
        for wake in self.on_adopted:
            wake()

    def _reconcile_relay(self, objects: set[str], first: bool) -> None:
        assert self.relay is not None
        self.relay.flush_unshared()  # finished here: not to be fetched back
        local = self.relay.all_names()
        if first:
            for name in local - objects:
                data = self.relay.raw(name)
                if data is not None:
                    self.store.put(RELAY, name, data)
            return
        gone = local - objects
        if gone:
            log.info("shared queue: %d relay copies were taken over by another front", len(gone))
            self.relay.forget(gone)
        for name in sorted(objects - local):
            self.relay.adopt(name, self.store.get(self.store.me, RELAY, name))

    async def _reconcile_outbound(self, objects: set[str], first: bool) -> None:
        assert self.queue is not None
        local = set(await self.queue.call(_entry_ids))
        if first:
            for entry_id in local - objects:
                entry = await self.queue.entry(entry_id)
                if entry is not None:
                    await self._mirror(entry_id, entry)
            return
        gone = local - objects
        if gone:
            log.info("shared queue: %d outbound entries were taken over by another", len(gone))
            for entry_id in gone:
                await self.queue.write(functools.partial(_delete, entry_id=entry_id))
        for entry_id in sorted(objects - local):
            await self._adopt_outbound(self.store.me, entry_id)

    async def _mirror(self, entry_id: str, entry: Any) -> None:
        from postvern.mta.queue import QueueRecipient

        info = entry.info
        # Recipients still owed a notice go too: after a takeover they are tried once more
        # and reported again, rather than their notice lost with this front.
        pending = [
            QueueRecipient(r.address, r.notify, r.orcpt)
            for r in info.recipients
            if r.state == "pending" or r.notice is not None
        ]
        await self.put_outbound(
            entry_id, info.mail_from, pending, entry.message, info.envid, info.ret, info.smtputf8
        )

    # -- takeover ----------------------------------------------------------------------------

    async def _take_over(self, front: str) -> None:
        objects: dict[str, set[str]] = await self._thread(self.store.names, front)
        if not any(objects.values()):
            if front not in self.others:  # gone from nodes.toml, and nothing left of it
                await self.coord.redis.srem(f"{KEY_PREFIX}:{FRONTS_SET}", front)
            return
        if not await self.coord.lock(front):
            return
        moved = 0
        try:
            if not await self.coord.lapsed([front]):
                return  # it came back meanwhile
            for kind, adopt in ((RELAY, self._adopt_relay), (OUTBOUND, self._adopt_outbound)):
                names = sorted(objects[kind])
                if not names or (kind == RELAY and self.relay is None):
                    continue
                if kind == OUTBOUND and self.queue is None:
                    continue
                for start in range(0, len(names), TAKEOVER_BATCH):
                    batch = names[start : start + TAKEOVER_BATCH]
                    moved += await self._take_batch(front, kind, adopt, batch)
        finally:
            await self.coord.unlock(front)
        if moved:
            self.taken_over += moved
            self.last_takeover = time.time()
            log.warning("shared queue: took over %d queued messages of front %s", moved, front)

    async def _take_batch(
        self, front: str, kind: str, adopt: Callable[[str, str], Awaitable[None]], names: list[str]
    ) -> int:
        """Claim a batch (one round trip), adopt it a few at a time, delete what was adopted
        from the dead front's prefix (one request), release the claims."""
        mine = sorted(await self.coord.claim(names))  # the dead front's claims expire first
        lanes = [mine[i::TAKEOVER_PARALLEL] for i in range(TAKEOVER_PARALLEL)]
        adopted: list[str] = []

        async def lane(part: list[str]) -> None:
            for name in part:
                try:
                    await adopt(front, name)
                    adopted.append(name)
                except Exception:
                    log.exception(
                        "shared queue: cannot take over %s/%s; left for later", kind, name
                    )

        try:
            await asyncio.gather(*(lane(part) for part in lanes if part))
            await self._thread(self.store.delete, kind, adopted, front)
        finally:
            await self.coord.release(mine)
        if adopted:
            for wake in self.on_adopted:  # deliver this batch while the next one moves
                wake()
        return len(adopted)

    async def _adopt_relay(self, front: str, name: str) -> None:
        assert self.relay is not None
        data = await self._thread(self.store.get, front, RELAY, name)
        async with self.gate.enter():
            await self._thread(self.store.put, RELAY, name, data)
            await self._thread(self.relay.adopt, name, data)

    async def _adopt_outbound(self, front: str, entry_id: str) -> None:
        from postvern.mta.queue import QueueError, QueueRecipient

        assert self.queue is not None
        data = await self._thread(self.store.get, front, OUTBOUND, entry_id)
        envelope, message = await self._thread(self.store.unseal, entry_id, data)
        recipients = [
            QueueRecipient(a, frozenset(n) if n is not None else None, o)
            for a, n, o in envelope["rcpts"]
        ]
        settled = await self._settled(entry_id, recipients)
        if len(settled) == len(recipients) and not any(u.notice for u in settled.values()):
            await self.finished(entry_id)  # all done before its front died: nothing to send
            return
        try:
            await self.queue.enqueue(
                envelope["from"], recipients, message, envid=envelope["envid"],
                ret=envelope["ret"], smtputf8=envelope["utf8"], queue_id=entry_id,
                settled=settled,
            )  # fmt: skip
        except QueueError:  # already here (a takeover interrupted after the enqueue)
            if front == self.store.me:
                raise
            await self._thread(self.store.put, OUTBOUND, entry_id, data)


def _progress_record(r: RecipientRecord) -> dict[str, Any]:
    return {
        "s": str(r.state), "a": r.attempts, "l": r.last_attempt, "st": r.status,
        "d": r.diagnostic, "m": r.remote_mta, "t": r.tls, "n": r.notice, "w": r.delay_notified,
    }  # fmt: skip


def _settled_update(record: dict[str, Any]) -> RecipientUpdate:
    from postvern.mta.queue import RecipientState, RecipientUpdate

    last = record["l"] if record["l"] is not None else time.time()
    return RecipientUpdate(
        seq=-1, state=RecipientState(record["s"]), attempts=record["a"], next_attempt=last,
        last_attempt=last, status=record["st"], diagnostic=record["d"], remote_mta=record["m"],
        tls=record["t"], notice=record["n"], delay_notified=bool(record["w"]),
    )  # fmt: skip


def delete_everywhere(settings: Settings, key: bytes, entry_id: str) -> bool:
    """``postvern queue delete`` on a front with a shared queue: the entry's object and its
    progress in Redis go too (the local entry is the caller's), so neither this front at its
    next start nor another at a takeover brings it back. True if the object was there."""
    store = SharedStore.open(settings.cluster.queue_store, settings.cluster.node, key)
    name = f"{settings.cluster.node}/{OUTBOUND}/{entry_id}"
    existed = name in store.target.list(name)
    store.delete(OUTBOUND, [entry_id])
    assert settings.abuse.redis_url  # a shared queue needs it (cluster/node.py)
    client = redis.Redis.from_url(settings.abuse.redis_url, socket_timeout=CLI_REDIS_TIMEOUT)
    try:
        client.delete(f"{KEY_PREFIX}:progress:{entry_id}")
    finally:
        client.close()
    return existed


def _entry_ids(store: Any) -> list[str]:
    return [row[0] for row in store.conn.execute("SELECT id FROM entries").fetchall()]


def _delete(store: Any, entry_id: str) -> None:
    store.delete(entry_id)


def _touch(path: Path) -> None:
    path.touch(mode=0o600)


async def gated(shared: SharedQueue | None, fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``fn`` as a writer of a new message (see :class:`Gate`)."""
    if shared is None:
        return await fn()
    async with shared.gate.enter():
        return await fn()
