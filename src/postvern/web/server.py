"""The HTTPS listener: MTA-STS policies for our domains, client configuration, health.

Which domain a request is about comes from the Host header (``mta-sts.<domain>``,
``autoconfig.<domain>``) or from the address the client names (autoconfig's query,
Autodiscover's request body, the Apple profile's query); a domain we do not serve gets 404
(an Error document for Autodiscover), so the listener reveals nothing about other names.
Every response carries the usual hardening headers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web

from postvern import handoff
from postvern.config import Settings
from postvern.directory.addresses import AddressError, normalise_address
from postvern.ops import metrics, securitytxt
from postvern.web import autoconfig, autodiscover, mobileconfig, mtasts
from postvern.web.clientservers import client_servers
from postvern.web.portal.security import HSTS

SECURITY_HEADERS = {
    "Strict-Transport-Security": HSTS,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'",
    "Cache-Control": "no-store",
}
# Requests we serve are tiny GETs and Autodiscover's small POST; anything large is refused
# before it is read.
MAX_REQUEST_BYTES = 16 * 1024

DomainCheck = Callable[[str], Awaitable[bool]]
# Old style: a dict of values; or (ops/metrics.py) a coroutine rendering the exposition.
Metrics = Callable[[], dict[str, float]] | Callable[[], Awaitable[bytes]]


def _domain_from_host(request: web.Request, prefix: str) -> str | None:
    host = (request.host or "").rsplit(":", 1)[0].lower().rstrip(".")
    return host[len(prefix) :] if host.startswith(prefix) else None


class WebApp:
    def __init__(
        self,
        settings: Settings,
        is_our_domain: DomainCheck,
        metrics: Metrics | None = None,
        routes: Sequence[web.RouteDef] = (),
    ) -> None:
        self.settings = settings
        self.is_our_domain = is_our_domain
        self.metrics = metrics
        self.routes = routes  # served by other packages (e2e: WKD)

    async def mta_sts(self, request: web.Request) -> web.Response:
        domain = _domain_from_host(request, "mta-sts.")
        if domain is None or not await self.is_our_domain(domain):
            raise web.HTTPNotFound()
        text = mtasts.policy_text([self.settings.hostname], self.settings.mta.sts_mode)
        return web.Response(text=text, content_type="text/plain")

    async def autoconfig(self, request: web.Request) -> web.Response:
        domain = _domain_from_host(request, "autoconfig.")
        if domain is None:
            address = request.query.get("emailaddress", "")
            domain = address.rpartition("@")[2].lower() or None
        if domain is None or not await self.is_our_domain(domain):
            raise web.HTTPNotFound()
        xml = autoconfig.config_xml(self.settings, domain)
        return web.Response(text=xml, content_type="application/xml")

    async def autodiscover(self, request: web.Request) -> web.Response:
        body = await _read_body(request, autodiscover.MAX_REQUEST_BYTES)
        try:
            address = autodiscover.parse_request(body)
        except autodiscover.RequestError as e:
            # A request we cannot read is the client's fault (400); a schema we do not offer
            # is an answer, as Exchange gives it (200).
            invalid = e.code is autodiscover.ErrorCode.INVALID_REQUEST
            return _autodiscover_response(autodiscover.error_xml(e.code), 400 if invalid else 200)
        if not await self.is_our_domain(address.rpartition("@")[2]):
            error = autodiscover.error_xml(autodiscover.ErrorCode.ADDRESS_NOT_FOUND)
            return _autodiscover_response(error, 200)
        xml = autodiscover.settings_xml(client_servers(self.settings), address)
        return _autodiscover_response(xml, 200)

    async def apple_profile(self, request: web.Request) -> web.Response:
        try:
            address = normalise_address(request.query.get(mobileconfig.QUERY_PARAMETER, ""))
        except AddressError:
            raise web.HTTPBadRequest(text="expected ?email=user@domain") from None
        if not await self.is_our_domain(address.rpartition("@")[2]):
            raise web.HTTPNotFound()
        s = self.settings
        profile = mobileconfig.profile_plist(client_servers(s), address, s.hostname)
        if profile is None:  # no incoming or no outgoing listener configured
            raise web.HTTPNotFound()
        # Read the certificate each time, so a renewed one signs without a restart; reading
        # and signing are file and CPU work, kept off the event loop.
        body = await asyncio.to_thread(
            _sign_profile, profile, s.path(s.tls.cert), s.path(s.tls.key)
        )
        filename = address.rpartition("@")[2] + ".mobileconfig"
        return web.Response(
            body=body,
            content_type=mobileconfig.CONTENT_TYPE,
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", content_type="text/plain")

    async def prometheus(self, request: web.Request) -> web.Response:
        """Counters in the Prometheus text format, for a scraper on this machine only."""
        if self.metrics is None or not _is_loopback(request.remote):
            raise web.HTTPNotFound()
        found = self.metrics()
        if not isinstance(found, dict):
            body = await found
            return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})
        lines = [f"{name} {value:g}" for name, value in sorted(found.items())]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def security_txt(self, request: web.Request) -> web.Response:
        """RFC 9116: the administrator's contact for vulnerability reports."""
        text = securitytxt.text(self.settings)
        return web.Response(text=text, content_type=securitytxt.CONTENT_TYPE, charset="utf-8")

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_harden])
        app.router.add_get(mtasts.POLICY_PATH, self.mta_sts)
        app.router.add_get("/mail/config-v1.1.xml", self.autoconfig)
        app.router.add_get("/.well-known/autoconfig/mail/config-v1.1.xml", self.autoconfig)
        for path in autodiscover.PATHS:
            app.router.add_post(path, self.autodiscover)
        app.router.add_get(mobileconfig.PATH, self.apple_profile)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get(securitytxt.PATH, self.security_txt)
        app.add_routes(self.routes)
        return app


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 (RFC 9110 §15.5.14) once it would pass ``limit``:
    at once when Content-Length says so, else as soon as a chunked body has."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared)
    body = bytearray()
    while chunk := await request.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    return bytes(body)


def _autodiscover_response(xml: bytes, status: int) -> web.Response:
    return web.Response(
        body=xml, status=status, content_type=autodiscover.CONTENT_TYPE, charset="utf-8"
    )


def _sign_profile(profile: bytes, cert: Path, key: Path) -> bytes:
    return mobileconfig.sign(profile, cert.read_bytes(), key.read_bytes())


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


@web.middleware
async def _harden(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as e:
        response = e
    for name, value in SECURITY_HEADERS.items():
        # A page that needs a policy of its own (the account portal's CSP) sets it itself.
        response.headers.setdefault(name, value)
    return response


class WebListener:
    def __init__(self, runner: web.AppRunner, sock: socket.socket) -> None:
        self.runner = runner
        self.sockets = (sock,)  # what a restart hands to the successor (handoff.py)

    async def shutdown(self, grace: float = 5.0) -> None:
        await self.runner.cleanup()


async def start_web_server(
    host: str,
    port: int,
    *,
    settings: Settings,
    directory_check: DomainCheck,
    ssl_context: ssl.SSLContext,
    metrics: Metrics | None = None,
    routes: Sequence[web.RouteDef] = (),
) -> WebListener:
    app = WebApp(settings, directory_check, metrics, routes).application()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # The socket is ours (inherited, or bound here), so a restart can hand it over.
    sock = handoff.take(host, port) or handoff.bind(host, port)
    site = web.SockSite(runner, sock, ssl_context=ssl_context, shutdown_timeout=5.0)
    await site.start()
    return WebListener(runner, sock)
