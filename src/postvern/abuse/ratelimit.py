"""Rate-limit counters, on the ``limits`` library: in process, or in Redis shared by all nodes.

Each counter is a fixed window that opens at its first hit (the ``limits`` fixed-window
strategy: one INCR per hit in Redis, so counting costs one round trip), keyed by a pseudonym
of the client, sender or account rather than the name itself. If Redis stops answering,
counting carries on in process memory until it is back: limits per node are weaker than
shared ones, but far better than none, and mail keeps flowing.
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
from limits.aio.storage import MemoryStorage, RedisStorage
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


class DatabaseCounters(Protocol):
    """Fixed-window counters in the abuse database (``AbuseStore``), shared by the worker
    processes of one server when there is no Redis (workers.py)."""

    async def counter_incr(self, hits: list[tuple[str, float, int]], now: float) -> list[int]: ...

    async def counter_get(self, key: str, now: float) -> int: ...

    async def counter_clear(self, key: str) -> None: ...


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
        self._memory = FixedWindowRateLimiter(MemoryStorage())
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

    @property
    def shared(self) -> bool:
        return self._shared is not None

    def use_database(self, counters: DatabaseCounters) -> None:
        """Several workers and no Redis: count in the abuse database, so a client's hits on
        every worker add up to one allowance. Redis, when configured, stays first."""
        self._database = counters

    async def _database_hits(self, hits: list[tuple[RateLimitItem, str, int]]) -> list[bool] | None:
        """The database's answers, or None when there is no database or it failed."""
        if self._database is None:
            return None
        try:
            counts = await self._database.counter_incr(
                [(item.key_for(who), item.get_expiry(), cost) for item, who, cost in hits],
                time.time(),
            )
        except apsw.Error as e:
            self._failed(e)
            return None
        return [count <= item.amount for count, (item, _, _) in zip(counts, hits, strict=True)]

    async def _database_reached(self, item: RateLimitItem, who: str) -> bool | None:
        if self._database is None:
            return None
        try:
            return await self._database.counter_get(item.key_for(who), time.time()) >= item.amount
        except apsw.Error as e:
            self._failed(e)
            return None

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._down_logged_at >= REDIS_DOWN_LOG_INTERVAL:
            self._down_logged_at = now
            log.warning(
                "shared counters unreachable, counting in process memory meanwhile",
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
        return await self._memory.hit(item, who, cost=cost)

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
        return not await self._memory.test(item, who)

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
            with contextlib.suppress(apsw.Error):
                await self._database.counter_clear(item.key_for(who))
        await self._memory.clear(item, who)

    async def close(self) -> None:
        storage = self._memory.storage
        await storage.reset()
        # The in-memory storage sweeps expired keys in a task of its own; end it with us.
        timer = getattr(storage, "timer", None)
        if timer is not None:
            timer.cancel()
