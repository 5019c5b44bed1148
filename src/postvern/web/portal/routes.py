"""What the HTTPS listener mounts for accounts: the portal's pages and the JSON API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from postvern.abuse import Abuse
from postvern.abuse.shared import connection_pool
from postvern.accounts.service import AccountService
from postvern.accounts.sessions import Session, SessionStore
from postvern.app import App
from postvern.dns import Resolver
from postvern.login import LoginService
from postvern.web.api import API
from postvern.web.portal.admin import AdminPages
from postvern.web.portal.keys import KeyPages
from postvern.web.portal.shared_sessions import SharedSessions
from postvern.web.portal.views import SESSION_KEY, Portal

if TYPE_CHECKING:
    from postvern.cluster.portal import PortalClient

# Host names a passkey may be bound to besides the server's own: "localhost" serves a
# portal reached through an SSH tunnel (browsers treat it as a secure context).
EXTRA_RP_IDS = frozenset({"localhost"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def session_store(app: App) -> SessionStore:
    """Sessions in Redis when a Redis backend is configured (every node serving HTTPS sees
    them; a cluster has one), else in this process as on one machine."""
    url = app.settings.abuse.redis_url
    if not url:
        return SessionStore()
    return SharedSessions(connection_pool(url), app.server_key.derive("portal sessions"))


def account_routes(
    app: App,
    login: LoginService,
    abuse: Abuse | None = None,
    resolver: Resolver | None = None,
    remote: PortalClient | None = None,
) -> list[web.RouteDef]:
    """``remote``: a cluster front's calls to the users' mailbox nodes (cluster/portal.py)."""
    service = AccountService(app, login, session_store(app))
    service.remote = remote
    portal = Portal(service, rp_ids=EXTRA_RP_IDS | {app.settings.hostname}, mailbox=remote)
    admin = AdminPages(portal, abuse, resolver)
    keys = KeyPages(portal)
    pages = [*portal.routes(), *keys.routes(), *admin.routes()]
    settled = [
        web.route(r.method, r.path, _settling(r.handler, service.sessions), **r.kwargs)
        for r in pages
    ]
    return [*settled, *API(service).routes()]


def _settling(handler: Handler, sessions: SessionStore) -> Handler:
    """The page, then its session written back (or deleted) wherever sessions are kept —
    after a redirect or an error too, which the pages raise."""

    async def page(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            session = request.get(SESSION_KEY)
            if isinstance(session, Session):
                await sessions.settle(session)

    return page
