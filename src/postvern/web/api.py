"""The JSON REST API: the portal's settings operations for scripts, under ``/api/v1``.

Requests carry a scoped token (``accounts/tokens.py``) as an OAuth 2.0 bearer token (RFC
6750 §2.1). A missing or unknown token gets 401, a token without the operation's scope 403
with ``error="insufficient_scope"`` naming the scope (RFC 6750 §3.1). Every token is
rate-limited on its own, and an unknown token counts as a failed login toward the client's
ban (abuse/), so the API is no side door for guessing. Nothing here opens a mailbox: no
scope reads mail, and app passwords can be listed and revoked but not created (that needs
the mailbox key, which only a login holds). The OpenAPI 3.1 document is served at
``/api/v1/openapi.json``.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from postvern.accounts.service import AccountError, AccountService
from postvern.accounts.settings import LIST_KINDS, SettingsError
from postvern.accounts.tokens import SCOPES, Token
from postvern.directory.addresses import AddressError
from postvern.directory.db import DirectoryError, User
from postvern.emailauth import signing
from postvern.web.portal import security

BASE = "/api/v1"
# Per token: enough for any script that manages settings, too few to scrape or hammer.
REQUESTS_PER_MINUTE = 120
WINDOW_SECONDS = 60.0
MAX_BODY = 8192
Handler = Callable[[web.Request, Token, User], Awaitable[web.Response]]


class API:
    def __init__(
        self, service: AccountService, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.service = service
        self._clock = clock
        self._recent: defaultdict[int, deque[float]] = defaultdict(deque)

    def _limited(self, token: Token) -> bool:
        now = self._clock()
        recent = self._recent[token.id]
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        if len(recent) >= REQUESTS_PER_MINUTE:
            return True
        recent.append(now)
        return False

    def scoped(
        self, scope: str, handler: Handler
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def run(request: web.Request) -> web.Response:
            s = self.service
            ip = request.remote or ""
            if s.login.gate.is_banned(ip) is not None:
                return _error(429, "banned", "too many failures from your address")
            header = request.headers.get("Authorization", "")
            kind, _, value = header.partition(" ")
            token = await s.run(s.tokens.authenticate, value.strip()) if kind == "Bearer" else None
            if token is None:
                await s.login.gate.login_failed(ip, "", "api")
                response = _error(401, "invalid_token", "a valid bearer token is required")
                response.headers["WWW-Authenticate"] = (
                    'Bearer realm="postvern", error="invalid_token"'
                )
                return response
            if self._limited(token):
                response = _error(429, "rate_limited", "too many requests for this token")
                response.headers["Retry-After"] = str(int(WINDOW_SECONDS))
                return response
            user = await s.run(s.directory.user_by_id, token.user_id)
            state = await s.run(s.settings.get, token.user_id)
            admin_ok = scope.startswith("admin:") and not await s.run(s._is_admin, token.user_id)
            if user is None or state.disabled or not token.allows(scope) or admin_ok:
                response = _error(403, "insufficient_scope", f"this needs the scope {scope}")
                response.headers["WWW-Authenticate"] = (
                    f'Bearer realm="postvern", error="insufficient_scope", scope="{scope}"'
                )
                return response
            try:
                return await handler(request, token, user)
            except (AccountError, SettingsError, DirectoryError, AddressError, ValueError) as e:
                return _error(400, "invalid_request", str(e))

        return run

    # -- the account -------------------------------------------------------------------

    async def account(self, request: web.Request, token: Token, user: User) -> web.Response:
        s = self.service
        state = await s.run(s.settings.get, user.id)
        return _ok(
            {
                "address": user.address,
                "quota": user.quota,
                "usage": await s.run(s.directory.usage_hint, user.id),
                "role": state.role,
                "scopes": sorted(token.scopes),
            }
        )

    async def aliases(self, request: web.Request, token: Token, user: User) -> web.Response:
        return _ok({"aliases": await self.service.own_aliases(user)})

    async def alias_add(self, request: web.Request, token: Token, user: User) -> web.Response:
        body = await _body(request)
        added = await self.service.add_alias(user, str(body.get("localpart", "")))
        return _ok({"alias": added}, 201)

    async def alias_remove(self, request: web.Request, token: Token, user: User) -> web.Response:
        await self.service.remove_alias(user, request.match_info["address"])
        return web.Response(status=204)

    async def forwarding(self, request: web.Request, token: Token, user: User) -> web.Response:
        forwarding = await self.service.forwarding(user)
        policy = self.service.forwarding_policy
        return _ok(
            {
                "targets": list(forwarding.targets),
                "keep_copy": forwarding.keep_copy,
                "allowed": policy.allowed,
                "max_targets": policy.max_targets,
            }
        )

    async def forwarding_set(self, request: web.Request, token: Token, user: User) -> web.Response:
        body = await _body(request)
        targets, keep_copy = body.get("targets", []), body.get("keep_copy", True)
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError("targets must be a list of addresses")
        if not isinstance(keep_copy, bool):
            raise ValueError("keep_copy must be true or false")
        await self.service.set_forwarding(user, targets, keep_copy)
        return await self.forwarding(request, token, user)

    async def app_passwords(self, request: web.Request, token: Token, user: User) -> web.Response:
        slots = await self.service.run(self.service.directory.slots, user.id, "app")
        return _ok(
            {
                "app_passwords": [
                    {"name": s.label, "created": s.created, "last_used": s.last_used} for s in slots
                ]
            }
        )

    async def app_password_revoke(
        self, request: web.Request, token: Token, user: User
    ) -> web.Response:
        await self.service.revoke_app_password(user, request.match_info["name"])
        return web.Response(status=204)

    async def spam(self, request: web.Request, token: Token, user: User) -> web.Response:
        s = self.service
        state = await s.run(s.settings.get, user.id)
        return _ok(
            {
                "junk_threshold": state.junk_threshold,
                "default_junk_threshold": s.app.settings.filters.spam_junk_score,
                **{k: await s.run(s.settings.sender_list, user.id, k) for k in LIST_KINDS},
            }
        )

    async def spam_threshold(self, request: web.Request, token: Token, user: User) -> web.Response:
        body = await _body(request)
        value = body.get("junk_threshold")
        if value is not None and not isinstance(value, (int, float)):
            raise ValueError("junk_threshold must be a number or null")
        await self.service.run(self.service.settings.set_junk_threshold, user.id, value)
        return await self.spam(request, token, user)

    async def spam_add(self, request: web.Request, token: Token, user: User) -> web.Response:
        kind = _list_kind(request)
        body = await _body(request)
        entry = await self.service.run(
            self.service.settings.add_sender, user.id, kind, str(body.get("entry", ""))
        )
        return _ok({"list": kind, "entry": entry}, 201)

    async def spam_remove(self, request: web.Request, token: Token, user: User) -> web.Response:
        kind = _list_kind(request)
        s = self.service
        if not await s.run(s.settings.remove_sender, user.id, kind, request.match_info["entry"]):
            return _error(404, "not_found", "no such entry")
        return web.Response(status=204)

    # -- administration ----------------------------------------------------------------

    async def domains(self, request: web.Request, token: Token, user: User) -> web.Response:
        return _ok({"domains": await self.service.run(self.service.directory.domains)})

    async def domain_add(self, request: web.Request, token: Token, user: User) -> web.Response:
        body = await _body(request)
        directory = self.service.directory

        def add() -> str:
            domain = directory.add_domain(str(body.get("domain", "")))
            signing.new_key_pair(directory, domain)
            return domain

        return _ok({"domain": await self.service.run(add)}, 201)

    async def users(self, request: web.Request, token: Token, user: User) -> web.Response:
        s = self.service
        users = await s.run(s.directory.users)
        listing = []
        for u in users:
            state = await s.run(s.settings.get, u.id)
            listing.append(
                {
                    "address": u.address,
                    "quota": u.quota,
                    "role": state.role,
                    "disabled": state.disabled,
                }
            )
        return _ok({"users": listing})

    async def user_invite(self, request: web.Request, token: Token, user: User) -> web.Response:
        s = self.service
        body = await _body(request)
        address = await s.run(s.accounts.check_new_address, str(body.get("address", "")))
        quota = body.get("quota", 0)
        if not isinstance(quota, int) or quota < 0:
            raise ValueError("quota must be a whole number of bytes")
        link_token = await s.run(s.invitations.create, address, quota)
        link = f"https://{request.host}/account/invite/{link_token}"
        return _ok({"address": address, "invitation": link}, 201)

    async def openapi(self, request: web.Request) -> web.Response:
        return _ok(openapi_document())

    def routes(self) -> list[web.RouteDef]:
        b = BASE
        s = self.scoped
        return [
            web.get(f"{b}/openapi.json", self.openapi),
            web.get(f"{b}/account", s("account:read", self.account)),
            web.get(f"{b}/aliases", s("aliases:read", self.aliases)),
            web.post(f"{b}/aliases", s("aliases:write", self.alias_add)),
            web.delete(f"{b}/aliases/{{address}}", s("aliases:write", self.alias_remove)),
            web.get(f"{b}/forwarding", s("forwarding:read", self.forwarding)),
            web.put(f"{b}/forwarding", s("forwarding:write", self.forwarding_set)),
            web.get(f"{b}/app-passwords", s("app-passwords:read", self.app_passwords)),
            web.delete(
                f"{b}/app-passwords/{{name}}", s("app-passwords:write", self.app_password_revoke)
            ),
            web.get(f"{b}/spam", s("spam:read", self.spam)),
            web.put(f"{b}/spam/threshold", s("spam:write", self.spam_threshold)),
            web.post(f"{b}/spam/{{kind}}", s("spam:write", self.spam_add)),
            web.delete(f"{b}/spam/{{kind}}/{{entry}}", s("spam:write", self.spam_remove)),
            web.get(f"{b}/admin/domains", s("admin:read", self.domains)),
            web.post(f"{b}/admin/domains", s("admin:write", self.domain_add)),
            web.get(f"{b}/admin/users", s("admin:read", self.users)),
            web.post(f"{b}/admin/users", s("admin:write", self.user_invite)),
        ]


def _list_kind(request: web.Request) -> str:
    kind = request.match_info["kind"]
    if kind not in LIST_KINDS:
        raise web.HTTPNotFound()
    return kind


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ValueError("request body too large")
    try:
        data = await request.json()
    except ValueError:
        raise ValueError("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def _ok(data: dict[str, Any], status: int = 200) -> web.Response:
    response = web.json_response(data, status=status)
    response.headers.update(security.HEADERS)
    return response


def _error(status: int, code: str, message: str) -> web.Response:
    return _ok({"error": code, "message": message}, status)


def _op(summary: str, scope: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"token": [scope]}],
        "x-required-scope": scope,
        "responses": {
            "200": {"description": "OK"},
            "401": {"description": "no valid token"},
            "403": {"description": f"the token lacks {scope}"},
            "429": {"description": "rate limited"},
        },
    }
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "properties": body}}},
        }
    return op


def openapi_document() -> dict[str, Any]:
    string, number = {"type": "string"}, {"type": ["number", "null"]}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Postvern account API",
            "version": "1",
            "description": "Settings of your account. Tokens are created in the portal; "
            "no token can read mail.",
        },
        "servers": [{"url": BASE}],
        "components": {
            "securitySchemes": {
                "token": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "scopes: " + ", ".join(f"{k} ({v})" for k, v in SCOPES.items()),
                }
            }
        },
        "paths": {
            "/account": {"get": _op("Your address, quota, usage and role", "account:read")},
            "/aliases": {
                "get": _op("Your aliases", "aliases:read"),
                "post": _op("Add an alias in your domain", "aliases:write", {"localpart": string}),
            },
            "/aliases/{address}": {"delete": _op("Remove one of your aliases", "aliases:write")},
            "/forwarding": {
                "get": _op("Where your mail is forwarded", "forwarding:read"),
                "put": _op(
                    "Forward your mail to outside addresses (an empty list stops)",
                    "forwarding:write",
                    {
                        "targets": {"type": "array", "items": string},
                        "keep_copy": {"type": "boolean"},
                    },
                ),
            },
            "/app-passwords": {"get": _op("Your app passwords", "app-passwords:read")},
            "/app-passwords/{name}": {
                "delete": _op("Revoke an app password", "app-passwords:write")
            },
            "/spam": {"get": _op("Junk threshold and sender lists", "spam:read")},
            "/spam/threshold": {
                "put": _op("Set the Junk threshold", "spam:write", {"junk_threshold": number})
            },
            "/spam/{kind}": {
                "post": _op("Add to the allow or block list", "spam:write", {"entry": string})
            },
            "/spam/{kind}/{entry}": {"delete": _op("Remove from a list", "spam:write")},
            "/admin/domains": {
                "get": _op("Domains", "admin:read"),
                "post": _op("Add a domain (with DKIM keys)", "admin:write", {"domain": string}),
            },
            "/admin/users": {
                "get": _op("Users", "admin:read"),
                "post": _op(
                    "Invite a user (returns a one-time link)",
                    "admin:write",
                    {"address": string, "quota": {"type": "integer"}},
                ),
            },
        },
    }
