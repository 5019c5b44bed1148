"""Reaching a recipient domain: its MTA-STS policy, its MX hosts, the first that takes mail.

For each domain the policy is looked up first (RFC 8461 §5), then the MX hosts in order
(RFC 5321 §5.1), then each host's addresses, until one greets us and meets the TLS the
policy demands. Under an ``enforce`` policy a host outside the policy or without validated
TLS is skipped, and if none is left the mail stays queued (§4.2); under ``testing`` the same
failures are only logged (RFC 8460 reporting would start here).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from postvern.dns import Resolver
from postvern.mta import route
from postvern.mta.client import (
    ClientSession,
    Disposition,
    Endpoint,
    Outcome,
    SessionError,
    TLSContexts,
    TLSLevel,
)
from postvern.mta.mtasts import Mode, Policy, STSResolver

log = logging.getLogger(__name__)


class DestinationError(Exception):
    """No host of the domain took the connection; ``outcome`` applies to every recipient."""

    def __init__(self, outcome: Outcome, remote_mta: str | None = None) -> None:
        super().__init__(outcome.diagnostic)
        self.outcome = outcome
        self.remote_mta = remote_mta


@dataclass(frozen=True, slots=True)
class Connection:
    """An open session and the policy it was chosen under."""

    session: ClientSession
    sts_mode: Mode | None  # None: the domain has no MTA-STS policy


class Connector:
    """Opens a connection to a domain's best reachable MX host."""

    def __init__(
        self,
        resolver: Resolver,
        sts: STSResolver,
        contexts: TLSContexts,
        *,
        port: int,
        local_hostname: str,
        connect_timeout: float,
        rng: random.Random,
        allow_loopback: bool = False,
    ) -> None:
        self._resolver = resolver
        self._sts = sts
        self._contexts = contexts
        self._port = port
        self._local_hostname = local_hostname
        self._local_names = frozenset({local_hostname.lower().rstrip(".")})
        self._connect_timeout = connect_timeout
        self._rng = rng
        self._allow_loopback = allow_loopback

    async def connect(self, domain: str) -> Connection:
        """A session with the domain's first usable MX, or :class:`DestinationError`."""
        if domain.startswith("["):
            # Address literals would let a sender aim the MTA at any IP, internal ones
            # included; submission users have no need for them.
            raise DestinationError(
                Outcome.permanent("5.1.2", "address literals are not routed by this server")
            )
        policy = await self._sts.policy_for(domain)
        try:
            hosts = await route.mx_hosts(self._resolver, domain, self._local_names, self._rng)
        except route.RouteError as e:
            raise DestinationError(_route_outcome(e)) from None
        attempt = _Attempt(domain, policy)
        for host in hosts:
            if not attempt.admits(host):
                continue
            session = await self._try_host(host, attempt)
            if session is not None:
                return Connection(session, policy.mode if policy else None)
        raise attempt.failure()

    async def _try_host(self, host: route.MXHost, attempt: _Attempt) -> ClientSession | None:
        try:
            addresses = await route.host_addresses(
                self._resolver, host.name, allow_loopback=self._allow_loopback
            )
        except route.RouteTempError as e:
            attempt.failed(host, Outcome.temporary(e.status, e.text))
            return None
        if not addresses:
            attempt.no_address(host)
            return None
        for address in addresses:
            endpoint = Endpoint(host.name, address, self._port)
            try:
                session = await ClientSession.open(
                    endpoint,
                    local_hostname=self._local_hostname,
                    contexts=self._contexts,
                    require_verified_tls=attempt.enforce,
                    connect_timeout=self._connect_timeout,
                )
            except SessionError as e:
                attempt.failed(host, e.outcome)
                continue
            attempt.connected(session)
            return session
        return None


class _Attempt:
    """What one connect attempt to a domain learned, host by host."""

    def __init__(self, domain: str, policy: Policy | None) -> None:
        self.domain = domain
        self.policy = policy
        self.enforce = policy is not None and policy.mode is Mode.ENFORCE
        self.testing = policy is not None and policy.mode is Mode.TESTING
        self.outcomes: list[tuple[str, Outcome]] = []
        self.unresolved = 0
        self.implicit = False

    def admits(self, host: route.MXHost) -> bool:
        """RFC 8461 §4.1: only hosts the policy names, when it is enforced."""
        self.implicit = self.implicit or host.implicit
        if self.policy is None or self.policy.matches(host.name):
            return True
        if self.testing:
            log.warning("mta-sts testing: %s MX %s is not in the policy", self.domain, host.name)
            return True
        log.warning("mta-sts enforce: %s MX %s is not in the policy", self.domain, host.name)
        text = f"MX host {host.name} is not listed in the MTA-STS policy of {self.domain}"
        self.outcomes.append((host.name, Outcome.temporary("4.7.5", text)))
        return False

    def failed(self, host: route.MXHost, outcome: Outcome) -> None:
        log.info("delivery to %s: %s failed: %s", self.domain, host.name, outcome.diagnostic)
        self.outcomes.append((host.name, outcome))

    def no_address(self, host: route.MXHost) -> None:
        self.unresolved += 1
        text = f"{host.name} has no usable address"
        self.outcomes.append((host.name, Outcome.permanent("5.4.4", text)))

    def connected(self, session: ClientSession) -> None:
        if session.tls is TLSLevel.UNVERIFIED:
            # RFC 7435 §6: record that the channel was encrypted but not authenticated.
            log.info(
                "delivery to %s: %s uses unverified TLS (%s)",
                self.domain,
                session.endpoint.mx,
                session.tls_error,
            )
        if self.testing and session.tls is not TLSLevel.VERIFIED:
            log.warning(
                "mta-sts testing: %s MX %s has no valid TLS (%s); delivering anyway",
                self.domain,
                session.endpoint.mx,
                session.tls_error or "no STARTTLS",
            )

    def failure(self) -> DestinationError:
        """Permanent only if every host said so; otherwise the mail waits for a retry."""
        if not self.outcomes:
            return DestinationError(Outcome.temporary("4.4.4", "no MX host could be tried"))
        if self.implicit and self.unresolved == len(self.outcomes):
            # §5.1: no MX and no address: the domain cannot receive mail.
            outcome = Outcome.permanent("5.1.2", f"{self.domain} has no MX and no address")
            return DestinationError(outcome)
        permanent = all(o.disposition is Disposition.PERMANENT for _, o in self.outcomes)
        pick = self.outcomes[-1] if permanent else self._last_temporary()
        return DestinationError(pick[1], pick[0])

    def _last_temporary(self) -> tuple[str, Outcome]:
        return next(
            (host, outcome)
            for host, outcome in reversed(self.outcomes)
            if outcome.disposition is Disposition.TEMPORARY
        )


def _route_outcome(error: route.RouteError) -> Outcome:
    if error.permanent:
        return Outcome.permanent(error.status, error.text)
    return Outcome.temporary(error.status, error.text)
