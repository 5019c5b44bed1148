"""Rate-limit counters: in process memory, in the abuse database shared by the workers of
one server, or in Redis shared by all nodes (the ``limits`` library's Redis storage).

Each counter is a fixed window that opens at its first hit (the ``limits`` fixed-window
strategy: one INCR per hit in Redis, so counting costs one round trip), keyed by a pseudonym
of the client, sender or account rather than the name itself. If Redis stops answering,
counting carries on in process memory until it is back: limits per node are weaker than
shared ones, but far better than none, and mail keeps flowing.

In process memory a counter is a plain dict entry (:class:`MemoryCounters`): the ``limits``
library's memory storage starts an expiry task and takes an ``asyncio.Lock`` on every hit,
which cost a busy MX more CPU than the rest of the accounting together.

Between the workers of one server (no Redis) the database holds the counts, but a worker
does not go to it for every hit: it reserves part of the allowance at once (a *lease* of
:func:`lease_size` hits, about 1% of the limit) and spends it in memory, going back to the
database when it is used up. The database count is the sum of what every worker reserved,
and a reservation past the limit is granted only up to it, so the workers together never
allow more than the limit. What they may do is refuse a little early: the unused part of
other workers' leases (at most ``lease_size - 1`` each) counts as used until the window ends
or the worker gives it back at shutdown. Small limits (auth failures, unknown recipients,
connections per minute) have leases of one: every hit is counted in the database at once.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import apsw
import redis.asyncio
import redis.exceptions
from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError

from postvern.config import Abuse as AbuseSettings

log = logging.getLogger(__name__)

# Prefix of every key this layer writes to Redis, so a shared Redis stays tidy.
REDIS_PREFIX = "postvern:abuse"
# Failures of guessing count within an hour. fail2ban looks back ten minutes by default,
# which a patient guesser (one try every two minutes) slips under; an hour still forgets a
# user's typos from the morning.
AUTH_FAILURE_WINDOW = RateLimitItemPerHour
# Unknown recipients (directory harvesting, RFC 5321 §7.8) are counted over the same hour.
UNKNOWN_RCPT_WINDOW = RateLimitItemPerHour
# How long a successful login keeps its client network known for that account.
KNOWN_CLIENT_DAYS = 30
# While Redis is unreachable, say so at most this often rather than on every counter hit.
REDIS_DOWN_LOG_INTERVAL = 60.0
# A worker reserves this share of a limit at a time in the shared database (see the module
# docstring): one database transaction per 1% of the allowance instead of one per hit, and
# no more than 1% of it held unused by any one worker.
LEASE_FRACTION = 100
# ... and never more than this many hits at once, so that even a huge limit is shared out
# in small pieces (a worker that stops taking mail holds little).
LEASE_MAX = 100
# Expired windows in process memory are swept out when the table has grown by this many
# entries since the last sweep (amortised; nothing runs per hit or on a timer).
MEMORY_SWEEP_GROWTH = 1024


class Counter(enum.StrEnum):
    """Every counter, and the client, sender or account it counts for."""

    CONNECTIONS = "connections"  # per client network, per minute
    MESSAGES = "messages"  # inbound messages per client network, per hour
    RECIPIENTS = "recipients"  # inbound recipients per client network, per hour
    SENDER_MESSAGES = "sender-messages"  # inbound messages per envelope sender, per day
    SUBMISSIONS = "submissions"  # submitted messages per user, per day
    AUTH_FAILURES_IP = "auth-failures-ip"  # failed logins per client network, per hour
    AUTH_FAILURES_ACCOUNT = "auth-failures-account"  # failed logins per account, per hour
    UNKNOWN_RCPT = "unknown-rcpt"  # RCPT to unknown users per client network, per hour
    # Not a limit: set once an account logs in successfully from a client network, so an
    # account locked by failures elsewhere still opens from where its owner usually is.
    KNOWN_CLIENT = "known-client"


@dataclass(frozen=True, slots=True)
class Limit:
    counter: Counter
    item: RateLimitItem | None  # None: the operator set the limit to 0, which disables it

    @property
    def amount(self) -> int:
        return 0 if self.item is None else self.item.amount


def limits_from_settings(settings: AbuseSettings) -> dict[Counter, Limit]:
    """One limit per counter from ``[abuse]``; a setting of 0 turns that limit off."""
    table: list[tuple[Counter, int, type[RateLimitItem]]] = [
        (Counter.CONNECTIONS, settings.connections_per_ip_per_minute, RateLimitItemPerMinute),
        (Counter.MESSAGES, settings.messages_per_ip_per_hour, RateLimitItemPerHour),
        (Counter.RECIPIENTS, settings.recipients_per_ip_per_hour, RateLimitItemPerHour),
        (Counter.SENDER_MESSAGES, settings.messages_per_sender_per_day, RateLimitItemPerDay),
        (Counter.SUBMISSIONS, settings.submissions_per_user_per_day, RateLimitItemPerDay),
        (Counter.AUTH_FAILURES_IP, settings.auth_failures_per_ip, AUTH_FAILURE_WINDOW),
        (Counter.AUTH_FAILURES_ACCOUNT, settings.auth_failures_per_account, AUTH_FAILURE_WINDOW),
        (Counter.UNKNOWN_RCPT, settings.unknown_rcpt_per_ip, UNKNOWN_RCPT_WINDOW),
    ]
    out: dict[Counter, Limit] = {}
    for counter, amount, window in table:
        if amount < 0:
            raise ValueError(f"abuse limit for {counter} must not be negative")
        item = window(amount, namespace=counter.value) if amount else None
        out[counter] = Limit(counter, item)
    known = RateLimitItemPerDay(1, KNOWN_CLIENT_DAYS, namespace=Counter.KNOWN_CLIENT.value)
    out[Counter.KNOWN_CLIENT] = Limit(Counter.KNOWN_CLIENT, known)
    return out


def lease_size(item: RateLimitItem) -> int:
    """How many hits a worker reserves at once from the shared database (>= 1)."""
    return max(1, min(LEASE_MAX, item.amount // LEASE_FRACTION))


class DatabaseCounters(Protocol):
    """Fixed-window counters in the abuse database (``AbuseStore``), shared by the worker
    processes of one server when there is no Redis (workers.py)."""

    async def counter_incr(
        self, hits: list[tuple[str, float, int]], now: float
    ) -> list[tuple[int, float]]: ...

    async def counter_get(self, key: str, now: float) -> int: ...

    async def counter_clear(self, key: str) -> None: ...

    async def counter_release(self, returns: list[tuple[str, float, int]]) -> None: ...


class MemoryCounters:
    """Fixed windows in process memory: ``key -> [count, end of window]``. Only the event
    loop touches it and nothing in it awaits, so it needs no lock."""

    __slots__ = ("_swept_at", "_windows")

    def __init__(self) -> None:
        self._windows: dict[str, list[float]] = {}
        self._swept_at = 0

    def incr(self, key: str, seconds: float, amount: int, now: float) -> int:
        """Add ``amount`` to the window of ``key`` (a new one if it has ended); the count."""
        window = self._windows.get(key)
        if window is None or window[1] <= now:
            if len(self._windows) > self._swept_at + MEMORY_SWEEP_GROWTH:
                self._sweep(now)
            self._windows[key] = [amount, now + seconds]
            return amount
        window[0] += amount
        return int(window[0])

    def get(self, key: str, now: float) -> int:
        window = self._windows.get(key)
        return 0 if window is None or window[1] <= now else int(window[0])

    def clear(self, key: str) -> None:
        self._windows.pop(key, None)

    def reset(self) -> None:
        self._windows.clear()
        self._swept_at = 0

    def _sweep(self, now: float) -> None:
        self._windows = {k: w for k, w in self._windows.items() if w[1] > now}
        self._swept_at = len(self._windows)


@dataclass(slots=True)
class _Lease:
    """Hits reserved in the shared database and not spent yet, for the window ending at
    ``expires`` (the database's own end of that window)."""

    left: int
    expires: float


class RateLimits:
    """The counters, with Redis (``redis_pool`` given) or process memory behind them.

    ``hit`` counts one event and says whether it was within the limit; ``reached`` says,
    without counting, whether the limit has been used up. Both take the pseudonym of whom
    they count for.
    """

    def __init__(
        self,
        limits: dict[Counter, Limit],
        redis_url: str | None = None,
        redis_pool: redis.asyncio.ConnectionPool | None = None,
    ) -> None:
        self.limits = limits
        self._memory = MemoryCounters()
        self._shared: FixedWindowRateLimiter | None = None
        if redis_url is not None:
            storage = RedisStorage(
                "async+" + redis_url,
                wrap_exceptions=True,
                implementation="redispy",
                key_prefix=f"{REDIS_PREFIX}:limits",
                connection_pool=redis_pool,  # type: ignore[arg-type]
            )
            self._shared = FixedWindowRateLimiter(storage)
        self._down_logged_at = float("-inf")
        self._database: DatabaseCounters | None = None
        self._leases: dict[str, _Lease] = {}
        self._leases_swept_at = 0

    @property
    def shared(self) -> bool:
        return self._shared is not None

    def use_database(self, counters: DatabaseCounters) -> None:
        """Several workers and no Redis: count in the abuse database, so a client's hits on
        every worker add up to one allowance. Redis, when configured, stays first."""
        self._database = counters

    async def _database_hits(self, hits: list[tuple[RateLimitItem, str, int]]) -> list[bool] | None:
        """The database's answers, or None when there is no database or it failed.

        Hits are taken from this worker's leases where they cover them; only the others go
        to the database, together, each reserving a new lease (see the module docstring).
        """
        if self._database is None:
            return None
        now = time.time()
        answers: list[bool] = []
        asks: list[tuple[int, str, int, int, int, RateLimitItem]] = []
        for item, who, cost in hits:
            key = item.key_for(who)
            left = self._take(key, cost, now)
            if left < 0:
                answers.append(True)  # spent from the lease, no database
                continue
            # ``left`` (too little) was taken out of the lease, so a hit that comes in
            # while this one waits for the database cannot spend it too.
            need = cost - left
            asks.append((len(answers), key, need, left, max(need, lease_size(item)), item))
            answers.append(False)
        if not asks:
            return answers
        try:
            windows = await self._database.counter_incr(
                [(key, item.get_expiry(), asked) for _, key, _, _, asked, item in asks], now
            )
        except apsw.Error as e:
            self._failed(e)
            return None
        for (at, key, need, left, asked, item), (count, expires) in zip(asks, windows, strict=True):
            # Only what fits under the limit is granted: the count holds every worker's
            # reservations, so together they never pass it.
            granted = max(0, min(asked, item.amount - (count - asked)))
            answers[at] = within = granted >= need
            self._credit(key, left + granted - (need + left if within else 0), expires)
        return answers

    def _take(self, key: str, cost: int, now: float) -> int:
        """Spend ``cost`` from the lease of ``key``: -1 if it covered it, else what little
        it held (now taken out of it, 0 if there was no lease)."""
        lease = self._leases.get(key)
        if lease is None or lease.expires <= now:
            return 0
        if lease.left >= cost:
            lease.left -= cost
            return -1
        left, lease.left = lease.left, 0
        return left

    def _credit(self, key: str, spare: int, expires: float) -> None:
        """Keep ``spare`` reserved hits of the window ending at ``expires`` for later."""
        lease = self._leases.get(key)
        if lease is not None and lease.expires == expires:
            lease.left += spare
            return
        if spare <= 0:
            self._leases.pop(key, None)
            return
        if len(self._leases) > self._leases_swept_at + MEMORY_SWEEP_GROWTH:
            now = time.time()
            self._leases = {k: v for k, v in self._leases.items() if v.expires > now}
            self._leases_swept_at = len(self._leases)
        self._leases[key] = _Lease(spare, expires)

    async def _database_reached(self, item: RateLimitItem, who: str) -> bool | None:
        if self._database is None:
            return None
        key = item.key_for(who)
        now = time.time()
        lease = self._leases.get(key)
        if lease is not None and lease.expires > now and lease.left > 0:
            return False
        try:
            return await self._database.counter_get(key, now) >= item.amount
        except apsw.Error as e:
            self._failed(e)
            return None

    async def _release_leases(self) -> None:
        """Give the unspent part of every lease back to the database (at shutdown), so a
        restarted worker does not leave its reservations counted until the window ends."""
        now = time.time()
        returns = [
            (k, lease.expires, lease.left)
            for k, lease in self._leases.items()
            if lease.left > 0 and lease.expires > now
        ]
        self._leases.clear()
        if returns and self._database is not None:
            with contextlib.suppress(apsw.Error):
                await self._database.counter_release(returns)

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._down_logged_at >= REDIS_DOWN_LOG_INTERVAL:
            self._down_logged_at = now
            # The error's class only (BusyError, ConnectionError...): says what went wrong
            # without any of the error's text, which may name a key or an address.
            log.warning(
                "shared counters unreachable (%s), counting in process memory meanwhile",
                type(error).__name__,
                extra={"error": type(error).__name__},
            )

    async def hit(self, counter: Counter, who: str, cost: int = 1) -> bool:
        """Count ``cost`` events; False when that takes the counter past its limit."""
        item = self.limits[counter].item
        if item is None:
            return True
        if self._shared is not None:
            try:
                return await self._shared.hit(item, who, cost=cost)
            except (StorageError, redis.exceptions.RedisError, OSError) as e:
                self._failed(e)
        elif (within := await self._database_hits([(item, who, cost)])) is not None:
            return within[0]
        return (
            self._memory.incr(item.key_for(who), item.get_expiry(), cost, time.time())
            <= item.amount
        )

    async def hit_all(self, hits: list[tuple[Counter, str, int]]) -> list[bool]:
        """:meth:`hit` for several counters at once (one database transaction for them)."""
        if self._database is not None and self._shared is None:
            items = [(self.limits[c].item, who, cost) for c, who, cost in hits]
            counted = [(item, who, cost) for item, who, cost in items if item is not None]
            answers = await self._database_hits(counted)
            if answers is not None:
                found = iter(answers)
                return [True if item is None else next(found) for item, _, _ in items]
        return [await self.hit(counter, who, cost) for counter, who, cost in hits]

    async def reached(self, counter: Counter, who: str) -> bool:
        """Whether the counter already holds its whole allowance (the next hit would fail)."""
        item = self.limits[counter].item
        if item is None:
            return False
        if self._shared is not None:
            try:
                return not await self._shared.test(item, who)
            except (StorageError, redis.exceptions.RedisError, OSError) as e:
                self._failed(e)
        elif (reached := await self._database_reached(item, who)) is not None:
            return reached
        return self._memory.get(item.key_for(who), time.time()) >= item.amount

    async def clear(self, counter: Counter, who: str) -> None:
        item = self.limits[counter].item
        if item is None:
            return
        if self._shared is not None:
            try:
                await self._shared.clear(item, who)
            except (StorageError, redis.exceptions.RedisError, OSError) as e:
                self._failed(e)
        elif self._database is not None:
            self._leases.pop(item.key_for(who), None)
            with contextlib.suppress(apsw.Error):
                await self._database.counter_clear(item.key_for(who))
        self._memory.clear(item.key_for(who))

    async def close(self) -> None:
        """Give back unspent leases (call while the database is still open)."""
        await self._release_leases()
        self._memory.reset()
