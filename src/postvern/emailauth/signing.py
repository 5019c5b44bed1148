"""Signing what leaves us: DKIM with both of a domain's keys, and ARC seals when forwarding.

Every domain has an Ed25519 and an RSA-2048 key (RFC 8463 dual signing: receivers that know
Ed25519 get the modern signature, the rest verify RSA). Keys live in the encrypted directory;
``postvern dkim rotate`` adds a new pair and keeps the old selectors published until removed.
Signing is CPU work (RSA), so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import time

from postvern.directory.db import Directory, DKIMKey
from postvern.emailauth import arc, dkim
from postvern.emailauth.headers import ParsedMessage

ALGORITHMS = ("ed25519-sha256", "rsa-sha256")
_SUFFIX = {"ed25519-sha256": "e", "rsa-sha256": "r"}


def new_key_pair(directory: Directory, domain: str) -> list[DKIMKey]:
    """Generate and store a fresh Ed25519 + RSA pair; older keys stop signing."""
    stamp = time.strftime("%Y%m%d", time.gmtime())
    existing = {k.selector for k in directory.dkim_keys(domain)}
    serial = 1
    while any(f"pv{stamp}{serial}{s}" in existing for s in _SUFFIX.values()):
        serial += 1
    keys = []
    for algorithm in ALGORITHMS:
        key = DKIMKey(
            domain=domain,
            selector=f"pv{stamp}{serial}{_SUFFIX[algorithm]}",
            algorithm=algorithm,
            private_key=dkim.generate_private_key(algorithm),
            created=int(time.time()),
        )
        directory.add_dkim_key(key, retire_others=True)
        keys.append(key)
    return keys


class Signer:
    """Signs outgoing messages with the active keys of the sending domain."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    def _keys(self, domain: str) -> list[DKIMKey]:
        return self.directory.dkim_keys(domain, active_only=True)

    def sign(self, message: bytes, domain: str) -> bytes:
        """Prepend one DKIM-Signature per active key (none if the domain has no keys)."""
        headers = b""
        parsed = ParsedMessage(message)  # one header parse and one canonical body for all keys
        for key in self._keys(domain):
            headers += dkim.sign(parsed, domain, key.selector, key.private_key, key.algorithm)
        return headers + message

    def arc_seal(self, message: bytes, domain: str, authserv_id: str) -> bytes:
        """Add an ARC set (RFC 8617) with the domain's RSA key, the algorithm ARC requires.

        ``message`` must already carry our Authentication-Results field.
        """
        rsa = [k for k in self._keys(domain) if k.algorithm == "rsa-sha256"]
        if not rsa:
            return message
        key = rsa[-1]
        fields = arc.seal(message, domain, key.selector, key.private_key, authserv_id)
        return b"".join(fields) + message

    async def sign_async(self, message: bytes, domain: str) -> bytes:
        return await asyncio.to_thread(self.sign, message, domain)

    async def arc_seal_async(self, message: bytes, domain: str, authserv_id: str) -> bytes:
        return await asyncio.to_thread(self.arc_seal, message, domain, authserv_id)
