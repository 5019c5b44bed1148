"""Web Key Directory (draft-koch-openpgp-webkey-service-18): users' published OpenPGP keys.

A client looking up ``alice@example.org`` hashes the local part and fetches, over HTTPS::

    advanced (§3.1): https://openpgpkey.example.org/.well-known/openpgpkey/example.org/hu/<h>
    direct   (§3.1): https://example.org/.well-known/openpgpkey/hu/<h>

where ``<h>`` is the z-base-32 encoding (RFC 6189 §5.1.6) of the SHA-1 of the local part in
lower case. Each method has its ``policy`` file beside ``hu/`` (§4.5), empty here: no Web Key
Service submission is offered. Only keys their owners published are served (``postvern
user key import --publish``), each with only the user ID of the address asked for (§3.1);
any other name, an unpublished user or a domain we do not serve answer 404 alike.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from postvern.directory.db import Directory
from postvern.e2e.autocrypt import minimal_key
from postvern.e2e.keys import KeyStore

# RFC 6189 §5.1.6: z-base-32's alphabet, chosen for human readability.
ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"
# SHA-1 is 160 bits: 32 z-base-32 characters of 5 bits each.
HASH_LENGTH = 32
SUBDOMAIN = "openpgpkey."
PREFIX = "/.well-known/openpgpkey"
# §3.1: "The HTTP GET method MUST return the binary representation of the OpenPGP key".
KEY_CONTENT_TYPE = "application/octet-stream"
# §3.1 asks servers to allow cross-origin reads, so web mail clients can look keys up.
CORS = {"Access-Control-Allow-Origin": "*"}

DomainCheck = Callable[[str], Awaitable[bool]]


def zbase32(data: bytes) -> str:
    bits = int.from_bytes(data, "big")
    count = (len(data) * 8 + 4) // 5
    bits <<= count * 5 - len(data) * 8
    return "".join(ZBASE32[(bits >> (5 * (count - 1 - i))) & 31] for i in range(count))


def local_hash(localpart: str) -> str:
    """§3.1: the hash of the local part, mapped to lower case (ASCII letters only)."""
    lowered = "".join(c.lower() if c.isascii() else c for c in localpart)
    return zbase32(hashlib.sha1(lowered.encode(), usedforsecurity=False).digest())


def dns_records(domain: str, hostname: str) -> list[str]:
    """The records the advanced method needs (``domain`` and ``hostname`` fully qualified)."""
    return [
        f"{SUBDOMAIN}{domain}\tIN CNAME {hostname}"
        "   ; WKD: the TLS certificate must name this host too",
    ]


class WKD:
    """Looks up published keys for the HTTPS listener's WKD routes."""

    def __init__(self, directory: Directory) -> None:
        self.keys = KeyStore(directory)

    def lookup(self, domain: str, hashed: str) -> bytes | None:
        for user, data in self.keys.published(domain):
            if local_hash(user.localpart) == hashed:
                return minimal_key(data, user.address)
        return None

    def routes(self, is_our_domain: DomainCheck) -> list[web.RouteDef]:
        async def serve(domain: str, hashed: str | None) -> web.Response:
            domain = domain.lower().rstrip(".")
            if not domain or not await is_our_domain(domain):
                raise web.HTTPNotFound()
            if hashed is None:
                return web.Response(body=b"", content_type="text/plain", headers=CORS)
            if len(hashed) != HASH_LENGTH or not set(hashed) <= set(ZBASE32):
                raise web.HTTPNotFound()
            key = await asyncio.to_thread(self.lookup, domain, hashed)
            if key is None:
                raise web.HTTPNotFound()
            return web.Response(body=key, content_type=KEY_CONTENT_TYPE, headers=CORS)

        def host(request: web.Request) -> str:
            return (request.host or "").rsplit(":", 1)[0].lower().rstrip(".")

        async def advanced(request: web.Request) -> web.Response:
            domain = request.match_info["domain"].lower()
            if host(request) != SUBDOMAIN + domain:
                raise web.HTTPNotFound()
            return await serve(domain, request.match_info.get("hash"))

        async def direct(request: web.Request) -> web.Response:
            return await serve(host(request), request.match_info.get("hash"))

        return [
            web.get(f"{PREFIX}/hu/{{hash}}", direct),
            web.get(f"{PREFIX}/policy", direct),
            web.get(f"{PREFIX}/{{domain}}/hu/{{hash}}", advanced),
            web.get(f"{PREFIX}/{{domain}}/policy", advanced),
        ]
