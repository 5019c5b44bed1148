"""The abuse layer's one entry point: every listener and the login path ask :class:`Abuse`.

It puts the parts together in the order that spends least on a bad client: the allowlist,
then the in-memory ban list, then counters, then DNS blocklists, then greylisting. Each
``on_*`` call returns None to go on, or a :class:`Refusal` to answer with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from postvern.abuse import refusal
from postvern.abuse.bans import (
    MAX_REASON,
    Ban,
    BanError,
    BanIndex,
    BanPolicy,
    operator_network,
    utc_text,
)
from postvern.abuse.dnsbl import DNSBL
from postvern.abuse.greylist import Decision, Entry, GreylistPolicy, decide
from postvern.abuse.network import (
    AddressError,
    Allowlist,
    IPAddress,
    client_key,
    greylist_key,
    network_key,
    parse_ip,
)
from postvern.abuse.personal import (
    Pseudonyms,
    derive_key,
    normalise_account,
    normalise_address,
    subject,
)
from postvern.abuse.ratelimit import Counter, RateLimits, limits_from_settings
from postvern.abuse.refusal import Refusal, clean_text
from postvern.abuse.shared import SharedError, SharedState, connection_pool
from postvern.abuse.store import FILE_NAME, AbuseStore
from postvern.config import Settings
from postvern.dns import Resolver

log = logging.getLogger(__name__)

# Listeners whose clients are other mail servers: only these are checked against DNS
# blocklists (a user's submission or IMAP client sits on a dynamic address lists block).
MX_SERVICES = frozenset({"smtp"})
# How often a node looks whether another process (``postvern ban``) changed the ban table.
LOCAL_SYNC_INTERVAL = 2.0
# With several workers (workers.py) a ban one worker makes reaches the others through the
# database this fast: it is how long a banned client may still be served by another worker.
WORKER_SYNC_INTERVAL = 0.25
# How often forgotten ban records and stale greylisting entries are dropped.
PURGE_INTERVAL = 3600.0
# Background jobs end within a Redis or SQLite round trip of being told to; past this, close()
# stops waiting for them (and says so) rather than hang a shutdown.
CLOSE_TIMEOUT = 10.0
# Peers whose parsed address, client key, allowlisting and counter pseudonym are kept, so
# that the MAIL, RCPT and end-of-DATA checks of a message do not each parse the address and
# compute an HMAC again. Past this many the table starts afresh (a few hundred bytes each).
PEER_CACHE = 4096
# The reasons recorded for automatic bans (operators give their own).
AUTH_FAILURES = "authentication failures"
ENUMERATION = "unknown recipients"


class Abuse:
    """Rate limits, bans, DNSBL and greylisting behind one object; implements ``AbuseGate``.

    ``key`` is 32 bytes reserved for this layer (``server_key.derive("abuse")``): it opens
    the ban database and keys every pseudonym, so nodes sharing Redis must share it.
    ``resolver`` is needed only when DNS blocklists are configured. ``clock`` gives seconds
    since the epoch; tests move it instead of sleeping. Call :meth:`start` before use and
    :meth:`close` at shutdown.
    """

    def __init__(
        self,
        settings: Settings,
        data_dir: Path,
        key: bytes,
        resolver: Resolver | None = None,
        *,
        clock: Callable[[], float] = time.time,
        greylist_policy: GreylistPolicy | None = None,
    ) -> None:
        config = settings.abuse
        self.allowlist = Allowlist(config.allowlist)
        self.policy = BanPolicy(config.ban_seconds, config.ban_max_seconds)
        self.greylisting = config.greylisting
        self.greylist_policy = greylist_policy or GreylistPolicy.from_settings(config)
        self._clock = clock
        self._names = Pseudonyms(derive_key(key, "pseudonyms"))
        self._seal_key = derive_key(key, "redis records")
        self._store = AbuseStore(data_dir / FILE_NAME, derive_key(key, "database"))
        self._index = BanIndex(clock)
        self._pool = connection_pool(config.redis_url) if config.redis_url else None
        self._limits = RateLimits(limits_from_settings(config), config.redis_url, self._pool)
        self._shared: SharedState | None = None
        if self._pool is not None and config.redis_url is not None:
            self._shared = SharedState(config.redis_url, self._pool, self._seal_key, self._names)
        self._dnsbl: DNSBL | None = None
        if config.dnsbl and resolver is not None:
            self._dnsbl = DNSBL(resolver, config.dnsbl, timeout=config.dnsbl_timeout)
        elif config.dnsbl:
            log.warning("DNSBL zones configured but no resolver given; DNSBL checks are off")
        self._ban_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._data_version = -1
        self._ban_epoch: int | None = None
        self._sync_interval = LOCAL_SYNC_INTERVAL
        self._peers: dict[str, _Peer | None] = {}

    def share_between_workers(self) -> None:
        """Several worker processes serve this data directory (call before :meth:`start`):
        bans reach every worker through the database within WORKER_SYNC_INTERVAL, and
        without Redis the rate-limit counters live in the database too, so that every
        worker counts toward one allowance."""
        self._sync_interval = WORKER_SYNC_INTERVAL
        if self._shared is None:
            self._limits.use_database(self._store)

    def apply_settings(self, settings: Settings) -> None:
        """A reloaded ``[abuse]`` (SIGHUP, ops/reload.py): the allowlist, ban lengths,
        greylisting and rate limits change at once; counts and bans so far are kept. Redis,
        DNSBL zones and the scan detection are set up at start only."""
        config = settings.abuse
        self.allowlist = Allowlist(config.allowlist)
        self._peers.clear()  # they say whether each is allowlisted
        self.policy = BanPolicy(config.ban_seconds, config.ban_max_seconds)
        self.greylisting = config.greylisting
        self.greylist_policy = GreylistPolicy.from_settings(config)
        self._limits.limits = limits_from_settings(config)

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, load bans (local, then shared), start background upkeep."""
        await self._store.open()
        async with self._ban_lock:
            self._data_version = await self._store.data_version()
            self._index.replace_all(await self._store.load_bans())
        if self._shared is not None:
            with contextlib.suppress(*SharedError):
                # Best effort: the follower task keeps retrying if Redis is down now.
                _, bans = await self._shared.snapshot()
                await self._merge_shared(bans)
            self._spawn(self._shared.follow(self._merge_shared, self._apply_shared, self._forget))
        self._spawn(self._every(self._sync_interval, self.sync, at_once=False))
        self._spawn(self._every(PURGE_INTERVAL, self.purge, at_once=True))

    async def close(self) -> None:
        """Stop background jobs (by flag, not cancellation: see ``SharedState.follow``)."""
        self._stopping.set()
        if self._shared is not None:
            await self._shared.stop_following()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)
            for task in late:
                log.warning("abuse background job did not stop in time; cancelled")
                task.cancel()
        self._tasks.clear()
        await self._limits.close()
        if self._shared is not None:
            await self._shared.close()
        if self._pool is not None:
            await self._pool.disconnect()
        await self._store.close()

    def _spawn(self, coroutine: object) -> None:
        self._tasks.append(asyncio.create_task(coroutine))  # type: ignore[arg-type]

    # -- bans ----------------------------------------------------------------------------

    def is_banned(self, ip: str) -> Ban | None:
        """The ban covering ``ip`` now, from memory: call it at accept time, before any work."""
        if ip in self.allowlist:
            return None
        return self._index.lookup(ip)

    def ban_refusal(self, ban: Ban) -> Refusal:
        """The 421 for a banned client; IMAP/POP3 use ``text`` after their own prefix."""
        left = ban.until - self._clock()
        return refusal.banned(utc_text(ban.until), ban.reason, left)

    def bans(self, *, include_expired: bool = False) -> list[Ban]:
        """Bans in force (and, if asked, records kept only to count repeat offences)."""
        now = self._clock()
        found = [b for b in self._index if include_expired or b.active(now)]
        return sorted(found, key=lambda b: (b.until, b.network))

    async def ban(self, network: str, seconds: float, reason: str) -> Ban:
        """An operator's ban of an address or CIDR network (``postvern ban add``)."""
        target = operator_network(network)
        if self.allowlist.covers(target):
            raise BanError(f"{network} is allowlisted; remove it from [abuse] allowlist first")
        if seconds <= 0:
            raise BanError("a ban must last at least one second")
        client = network_key(target)
        now = self._clock()
        async with self._ban_lock:
            previous = self._index.get(client)
            offences = previous.offences + 1 if previous is not None else 1
            text = clean_text(reason, MAX_REASON) or "blocked by the administrator"
            ban = Ban(client, now + seconds, text, offences, now, now)
            await self._record(ban)
        log.info("ban added by operator", extra={**subject(ip=client), "seconds": int(seconds)})
        return ban

    async def unban(self, network: str) -> Ban | None:
        """Lift a ban and forget its offences (``postvern ban remove``); None if none."""
        client = network_key(operator_network(network))
        async with self._ban_lock:
            removed = self._index.get(client)
            if removed is None:
                return None
            await self._store.delete_bans([client])
            self._index.remove(client)
            await self._share_delete([client])
        log.info("ban removed by operator", extra=subject(ip=client))
        return removed

    async def on_scan(self, ip: str, reason: str) -> Ban | None:
        """Scanning or garbage seen at the edge (abuse/portscan.py): ban like any offence."""
        client = self._client_or_none(ip)
        if client is None or ip in self.allowlist:
            return None
        return await self._offend(client, reason)

    async def _offend(self, client: str, reason: str) -> Ban:
        """A client offended: ban it for the next, longer, period."""
        async with self._ban_lock:
            ban = self.policy.offend(self._index.get(client), client, reason, self._clock())
            await self._record(ban)
        log.warning(
            "client banned",
            extra={
                **subject(ip=client),
                "reason": reason,
                "offences": ban.offences,
                "seconds": int(ban.until - ban.created),
            },
        )
        return ban

    async def _record(self, ban: Ban) -> None:
        """Store first, then serve: what is in memory is always in the database too."""
        await self._store.save_ban(ban)
        self._index.put(ban)
        if self._shared is not None:
            try:
                await self._shared.save(ban)
            except SharedError as e:
                log.warning("ban not shared: Redis unreachable", extra={"error": type(e).__name__})

    async def _share_delete(self, keys: list[str]) -> None:
        if self._shared is not None:
            try:
                await self._shared.delete(keys)
            except SharedError as e:
                log.warning(
                    "unban not shared: Redis unreachable", extra={"error": type(e).__name__}
                )

    async def _apply_shared(self, ban: Ban) -> None:
        """A ban from another node (or our own, echoed): keep it if it is newer."""
        async with self._ban_lock:
            current = self._index.get(ban.network)
            if current is not None and current.updated >= ban.updated:
                return
            await self._store.save_ban(ban)
            self._index.put(ban)

    async def _merge_shared(self, bans: list[Ban]) -> None:
        for ban in bans:
            await self._apply_shared(ban)

    async def _forget(self, client: str) -> None:
        async with self._ban_lock:
            if self._index.get(client) is not None:
                await self._store.delete_bans([client])
                self._index.remove(client)

    async def sync(self) -> bool:
        """Reload bans if another process changed them in the database; True if it did."""
        async with self._ban_lock:
            version = await self._store.data_version()
            if version == self._data_version:
                return False
            self._data_version = version
            # Other workers' counter hits change the file too; the ban table seldom does.
            epoch = await self._store.ban_epoch()
            if epoch == self._ban_epoch:
                return False
            self._ban_epoch = epoch
            self._index.replace_all(await self._store.load_bans())
        return True

    async def purge(self) -> tuple[int, int]:
        """Drop ban records past their offence memory and stale greylisting entries.

        Returns how many of each were dropped (greylisting entries kept in Redis expire
        there by themselves and are not counted).
        """
        now = self._clock()
        async with self._ban_lock:
            forgotten = self._index.forgotten(self.policy, now)
            await self._store.delete_bans(forgotten)
            for client in forgotten:
                self._index.remove(client)
        await self._share_delete(forgotten)
        return len(forgotten), await self._store.purge_greylist(now)

    async def _every(
        self, interval: float, job: Callable[[], Awaitable[object]], *, at_once: bool
    ) -> None:
        """Run ``job`` every ``interval`` seconds until close(); failures are logged."""
        if not at_once and await self._stopped_within(interval):
            return
        while True:
            try:
                await job()
            except Exception:
                log.exception("abuse upkeep failed; trying again next round")
            if await self._stopped_within(interval):
                return

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # -- the login path (AbuseGate, postvern.login) --------------------------------------

    async def login_allowed(self, ip: str, account: str) -> str | None:
        """Before any password hashing: None, or why this login is refused."""
        if ip in self.allowlist:
            return None
        ban = self.is_banned(ip)
        if ban is not None:
            return self.ban_refusal(ban).text
        acct = normalise_account(account)
        if acct and await self._limits.reached(Counter.AUTH_FAILURES_ACCOUNT, self._account(acct)):
            # Locked by failures, but not for the owner's usual networks: otherwise anyone
            # could lock a user out by guessing badly on purpose.
            known = self._names.text("known", acct, self._client(ip))
            if not await self._limits.reached(Counter.KNOWN_CLIENT, known):
                return "Too many failed logins for this account; try again later"
        return None

    async def login_failed(self, ip: str, account: str, protocol: str) -> None:
        """Count a failed login; ban the client when it reaches its allowance."""
        client = self._client_or_none(ip)
        if client is None or ip in self.allowlist:
            return
        acct = normalise_account(account)
        who = self._names.text("ip", client)
        await self._limits.hit(Counter.AUTH_FAILURES_IP, who)
        if await self._limits.reached(Counter.AUTH_FAILURES_IP, who):
            # The count starts afresh after the ban: the doubling ban, not the counter,
            # is what punishes a repeat offender.
            await self._limits.clear(Counter.AUTH_FAILURES_IP, who)
            await self._offend(client, AUTH_FAILURES)
        if acct:
            await self._limits.hit(Counter.AUTH_FAILURES_ACCOUNT, self._account(acct))
        log.info("login failed", extra={**subject(ip=client, account=acct), "protocol": protocol})

    async def login_succeeded(self, ip: str, account: str, protocol: str) -> None:
        """Remember the client network as the account's own (see ``login_allowed``).

        Failure counters are not reset: one valid account must not let a guesser wipe
        the count of its failures against others.
        """
        client = self._client_or_none(ip)
        acct = normalise_account(account)
        if client is None or not acct:
            return
        await self._limits.hit(Counter.KNOWN_CLIENT, self._names.text("known", acct, client))

    # -- SMTP, IMAP, POP3 listeners ------------------------------------------------------

    async def on_connect(self, ip: str, service: str) -> Refusal | None:
        """At accept: ban (421), connection rate (421), DNSBL for the MX (554)."""
        client = self._client_or_none(ip)
        if client is None or ip in self.allowlist:
            return None
        ban = self._index.lookup(ip)
        if ban is not None:
            return self.ban_refusal(ban)
        if not await self._limits.hit(Counter.CONNECTIONS, self._names.text("ip", client)):
            log.info("connection rate exceeded", extra={**subject(ip=client), "service": service})
            return refusal.too_many_connections("minute")
        if service in MX_SERVICES and self._dnsbl is not None:
            listing = await self._dnsbl.check(ip)
            if listing is not None:
                return refusal.listed(listing.zone, listing.detail)
        return None

    async def on_mail(self, ip: str, sender: str) -> Refusal | None:
        """MAIL FROM on the MX: refuse (451) a client or sender already over its limit."""
        peer = self._peer(ip)
        if peer is None:
            return None
        ban = self._index.lookup_parsed(peer.address, peer.client)
        if ban is not None:
            return self.ban_refusal(ban)
        if await self._limits.reached(Counter.MESSAGES, peer.who):
            return refusal.over_limit_mail("messages from your address this hour")
        address = normalise_address(sender)
        # The null sender (bounces, RFC 5321 §4.5.5) is shared by every MTA on the Internet:
        # counting it per sender would block all bounces at once.
        if address and await self._limits.reached(
            Counter.SENDER_MESSAGES, self._names.text("sender", address)
        ):
            return refusal.over_limit_mail("messages from this sender today")
        return None

    async def on_rcpt(
        self, ip: str, sender: str, rcpt: str, known: bool, *, authenticated: bool = False
    ) -> Refusal | None:
        """RCPT TO on the MX.

        ``known`` says whether the recipient exists. An unknown one is counted (directory
        harvest, RFC 5321 §7.8) and None returned: the listener answers 550 5.1.1 itself,
        until the count bans the client (421, close). A known one is checked against the
        recipient rate (450) and greylisting (451).
        """
        peer = self._peer(ip)
        if peer is None:
            return None
        client, who = peer.client, peer.who
        ban = self._index.lookup_parsed(peer.address, client)
        if ban is not None:
            return self.ban_refusal(ban)
        if not known:
            await self._limits.hit(Counter.UNKNOWN_RCPT, who)
            if await self._limits.reached(Counter.UNKNOWN_RCPT, who):
                await self._limits.clear(Counter.UNKNOWN_RCPT, who)
                ban = await self._offend(client, ENUMERATION)
                return refusal.enumeration_banned(ban.until - self._clock())
            return None
        if await self._limits.reached(Counter.RECIPIENTS, who):
            return refusal.over_limit_rcpt("recipients from your address this hour")
        if self.greylisting and not authenticated:
            return await self._greylist(ip, sender, rcpt)
        return None

    async def on_message(self, ip: str, sender: str, rcpt_count: int) -> Refusal | None:
        """End of DATA on the MX: count the message; 451 if that took a counter over."""
        peer = self._peer(ip)
        if peer is None:
            return None
        client, who = peer.client, peer.who
        hits = [(Counter.MESSAGES, who, 1), (Counter.RECIPIENTS, who, max(1, rcpt_count))]
        address = normalise_address(sender)
        if address:
            hits.append((Counter.SENDER_MESSAGES, self._names.text("sender", address), 1))
        within = await self._limits.hit_all(hits)
        if all(within):
            return None
        log.info("inbound message rate exceeded", extra=subject(ip=client))
        what = (
            "messages from your address this hour",
            "recipients from your address this hour",
            "messages from this sender today",
        )
        return refusal.over_limit_mail(what[within.index(False)])

    async def on_submission(self, user: str) -> Refusal | None:
        """One submitted message by an authenticated user; 451 past the daily allowance."""
        acct = normalise_account(user)
        if await self._limits.hit(Counter.SUBMISSIONS, self._account(acct)):
            return None
        log.warning("daily submission limit reached", extra=subject(account=acct))
        return refusal.over_limit_mail("messages sent today")

    # -- greylisting ---------------------------------------------------------------------

    async def _greylist(self, ip: str, sender: str, rcpt: str) -> Refusal | None:
        triplet = self._names.digest(
            "grey", greylist_key(ip), normalise_address(sender), normalise_address(rcpt)
        )
        now = self._clock()
        try:
            entry = await self._grey_get(triplet)
            outcome = decide(entry, now, self.greylist_policy)
            await self._grey_put(triplet, outcome.entry, outcome.keep_until - now)
        except SharedError as e:
            # Fail open: without the shared store this node cannot tell a retry apart.
            log.warning("greylisting skipped: Redis unreachable", extra={"error": type(e).__name__})
            return None
        if outcome.decision is Decision.ACCEPT:
            return None
        return refusal.greylisted(outcome.wait)

    async def _grey_get(self, triplet: bytes) -> Entry | None:
        if self._shared is not None:
            return await self._shared.grey_get(triplet)
        return await self._store.grey_get(triplet)

    async def _grey_put(self, triplet: bytes, entry: Entry, keep_seconds: float) -> None:
        if self._shared is not None:
            await self._shared.grey_put(triplet, entry, keep_seconds)
        else:
            await self._store.grey_put(triplet, entry, self._clock() + keep_seconds)

    # -- helpers -------------------------------------------------------------------------

    def _peer(self, ip: str) -> _Peer | None:
        """The counted identity of ``ip``; None for a peer that is not counted (no IP
        address, or allowlisted). Kept per address (PEER_CACHE): the allowlist is the only
        thing it depends on that can change, and apply_settings() empties it then."""
        try:
            return self._peers[ip]
        except KeyError:
            pass
        peer = None
        try:
            address = parse_ip(ip)
        except AddressError:
            address = None
        if address is not None and address not in self.allowlist:
            client = client_key(address)
            peer = _Peer(address, client, self._names.text("ip", client))
        if len(self._peers) >= PEER_CACHE:
            self._peers.clear()
        self._peers[ip] = peer
        return peer

    def _client_or_none(self, ip: str) -> str | None:
        """The client client, or None for a peer that has no IP address (a Unix socket)."""
        try:
            return client_key(parse_ip(ip))
        except AddressError:
            return None

    def _client(self, ip: str) -> str:
        return self._client_or_none(ip) or ""

    def _account(self, account: str) -> str:
        return self._names.text("account", account)


@dataclass(frozen=True, slots=True)
class _Peer:
    """A counted client address: parsed, its client key (an IPv4 address or an IPv6 /64),
    and the pseudonym its per-client counters are kept under."""

    address: IPAddress
    client: str
    who: str
