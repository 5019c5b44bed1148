"""What the HTTPS listener mounts for accounts: the portal's pages and the JSON API."""

from __future__ import annotations

from aiohttp import web

from postvern.abuse import Abuse
from postvern.accounts.service import AccountService
from postvern.app import App
from postvern.dns import Resolver
from postvern.login import LoginService
from postvern.web.api import API
from postvern.web.portal.admin import AdminPages
from postvern.web.portal.keys import KeyPages
from postvern.web.portal.views import Portal

# Host names a passkey may be bound to besides the server's own: "localhost" serves a
# portal reached through an SSH tunnel (browsers treat it as a secure context).
EXTRA_RP_IDS = frozenset({"localhost"})


def account_routes(
    app: App, login: LoginService, abuse: Abuse | None = None, resolver: Resolver | None = None
) -> list[web.RouteDef]:
    service = AccountService(app, login)
    portal = Portal(service, rp_ids=EXTRA_RP_IDS | {app.settings.hostname})
    admin = AdminPages(portal, abuse, resolver)
    keys = KeyPages(portal)
    return [*portal.routes(), *keys.routes(), *admin.routes(), *API(service).routes()]
