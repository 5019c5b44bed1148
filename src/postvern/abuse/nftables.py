"""Bans enforced in the kernel: an nftables set that Postvern keeps in step with its bans.

With ``[abuse] nftables_set = "inet postvern banned"`` the server mirrors every ban in force
into that set (IPv4 addresses) and into the set of the same name with ``6`` appended (IPv6
networks), each element with a timeout equal to what is left of its ban, so the kernel
drops a banned client's packets before they cost a connection, and lets them in again by
itself when the ban ends even if the server is stopped. The sets and the rule using them
belong to the administrator (the Ansible role in deploy/ creates them)::

    table inet postvern {
        set banned  { type ipv4_addr; flags interval, timeout; }
        set banned6 { type ipv6_addr; flags interval, timeout; }
        chain input { type filter hook input priority -10; policy accept;
                      ip saddr @banned drop; ip6 saddr @banned6 drop; }
    }

The server needs CAP_NET_ADMIN for this (the systemd unit's drop-in in the role adds it). It
starts by flushing both sets, then every ``SYNC_SECONDS`` adds the bans it has not mirrored
yet and deletes those lifted early (``postvern ban remove``); each change is one atomic
``nft -f`` transaction. A failing ``nft`` is logged once per kind of error and retried:
the application-level ban still refuses the client meanwhile.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from collections.abc import Callable

from postvern.abuse.bans import Ban

log = logging.getLogger(__name__)

NFT = "nft"
SYNC_SECONDS = 1.0
# One nft run should take milliseconds; a hung one must not stall the sync for long.
NFT_TIMEOUT = 10.0


class NftablesError(Exception):
    pass


def parse_spec(spec: str) -> tuple[str, str, str]:
    """``"inet postvern banned"`` → (family, table, set)."""
    parts = spec.split()
    if len(parts) != 3 or parts[0] not in ("inet", "ip", "ip6", "bridge", "netdev", "arp"):
        raise NftablesError(f"{spec!r}: expected FAMILY TABLE SET, e.g. 'inet postvern banned'")
    for part in parts[1:]:
        if not part.replace("_", "").replace("-", "").isalnum():
            raise NftablesError(f"{spec!r}: {part!r} is not a plain nftables name")
    return parts[0], parts[1], parts[2]


class NftablesSet:
    def __init__(
        self, spec: str, bans: Callable[[], list[Ban]], clock: Callable[[], float]
    ) -> None:
        family, table, name = parse_spec(spec)
        self._v4 = f"{family} {table} {name}"
        self._v6 = f"{family} {table} {name}6"
        self._bans = bans
        self._clock = clock
        self._mirrored: dict[str, float] = {}  # network → until, as in the kernel
        self._task: asyncio.Task[None] | None = None
        self._last_error = ""

    async def start(self) -> None:
        await self._nft(f"flush set {self._v4}\nflush set {self._v6}\n")
        self._mirrored.clear()
        await self.sync()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            try:
                await self.sync()
            except NftablesError as e:
                if str(e) != self._last_error:
                    log.warning("nftables ban set not updated: %s", e)
                    self._last_error = str(e)

    def script(self) -> tuple[str, dict[str, float]]:
        """The nft commands that bring the kernel's sets to the bans in force now."""
        now = self._clock()
        wanted = {b.network: b.until for b in self._bans() if b.until > now}
        lines = []
        for network, until in self._mirrored.items():
            if wanted.get(network) != until:
                lines.append(f"delete element {self._set_of(network)} {{ {network} }}")
        for network, until in wanted.items():
            if self._mirrored.get(network) != until:
                seconds = max(1, math.ceil(until - now))
                lines.append(
                    f"add element {self._set_of(network)} {{ {network} timeout {seconds}s }}"
                )
        return "\n".join(lines) + "\n" if lines else "", wanted

    async def sync(self) -> None:
        script, wanted = self.script()
        if script:
            # Elements that expired in the kernel on their own are gone already; deleting
            # them fails the whole transaction, so deletions go one by one first.
            deletions = [line for line in script.splitlines() if line.startswith("delete")]
            for line in deletions:
                try:
                    await self._nft(line + "\n")
                except NftablesError:
                    pass
            additions = "".join(
                line + "\n" for line in script.splitlines() if line.startswith("add")
            )
            if additions:
                await self._nft(additions)
        self._mirrored = wanted
        self._last_error = ""

    def _set_of(self, network: str) -> str:
        version = ipaddress.ip_network(network, strict=False).version
        return self._v4 if version == 4 else self._v6

    async def _nft(self, script: str) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                NFT,
                "-f",
                "-",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise NftablesError(f"cannot run {NFT}: {e.strerror}") from None
        try:
            async with asyncio.timeout(NFT_TIMEOUT):
                _, err = await process.communicate(script.encode())
        except TimeoutError:
            process.kill()
            await process.wait()
            raise NftablesError(f"{NFT} did not finish in {NFT_TIMEOUT:g} s") from None
        if process.returncode != 0:
            first = err.decode(errors="replace").strip().splitlines()[:1]
            raise NftablesError(first[0] if first else f"{NFT} exited {process.returncode}")
