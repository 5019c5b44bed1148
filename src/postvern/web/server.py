"""The HTTPS listener: MTA-STS policies for our domains, client autoconfiguration, health.

Which domain a request is about comes from the Host header (``mta-sts.<domain>``,
``autoconfig.<domain>``); a domain we do not serve gets 404, so the listener reveals nothing
about other names. Every response carries the usual hardening headers.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from postvern.config import Settings
from postvern.web import autoconfig, mtasts

SECURITY_HEADERS = {
    "Strict-Transport-Security": "max-age=31536000",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'",
    "Cache-Control": "no-store",
}
# Requests we serve are tiny GETs; anything large is refused before it is read.
MAX_REQUEST_BYTES = 16 * 1024

DomainCheck = Callable[[str], Awaitable[bool]]
Metrics = Callable[[], dict[str, float]]


def _domain_from_host(request: web.Request, prefix: str) -> str | None:
    host = (request.host or "").rsplit(":", 1)[0].lower().rstrip(".")
    return host[len(prefix) :] if host.startswith(prefix) else None


class WebApp:
    def __init__(
        self, settings: Settings, is_our_domain: DomainCheck, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.is_our_domain = is_our_domain
        self.metrics = metrics

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

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", content_type="text/plain")

    async def prometheus(self, request: web.Request) -> web.Response:
        """Counters in the Prometheus text format, for a scraper on this machine only."""
        if self.metrics is None or not _is_loopback(request.remote):
            raise web.HTTPNotFound()
        lines = [f"{name} {value:g}" for name, value in sorted(self.metrics().items())]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_harden])
        app.router.add_get(mtasts.POLICY_PATH, self.mta_sts)
        app.router.add_get("/mail/config-v1.1.xml", self.autoconfig)
        app.router.add_get("/.well-known/autoconfig/mail/config-v1.1.xml", self.autoconfig)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/metrics", self.prometheus)
        return app


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
    response.headers.update(SECURITY_HEADERS)
    return response


class WebListener:
    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner

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
) -> WebListener:
    app = WebApp(settings, directory_check, metrics).application()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, shutdown_timeout=5.0)
    await site.start()
    return WebListener(runner)
