"""The portal's pages for administrators: domains (with their DNS records checked live
against what is published, and DKIM rotation), users (invitations, disabling, quotas), bans,
and the outbound queue.

An administrator is a user with the admin role (``account_settings``), or — until anyone
has it — the postmaster address, so a fresh server has one without a shell command. Being
an administrator never opens anyone's mailbox: users are created through an invitation
link and set their own password, so the administrator never knows it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from postvern.abuse import Abuse
from postvern.accounts.invitations import VALID_SECONDS
from postvern.accounts.settings import SettingsError
from postvern.accounts.store import now
from postvern.directory.addresses import AddressError
from postvern.directory.db import DirectoryError
from postvern.dns import Resolver
from postvern.dns.resolver import DNSError
from postvern.emailauth import dkim, signing
from postvern.mta import QUEUE_FILE, QueueStore
from postvern.mta import admin as mta_admin
from postvern.ops import dnsrecords
from postvern.web import mtasts
from postvern.web.clientservers import client_servers
from postvern.web.portal.views import PREFIX, Ctx, Portal

ADMIN = f"{PREFIX}/admin"
DNS_CHECK_SECONDS = 5.0  # the live check gives up on a record after this


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    kind: str
    expected: str
    found: list[str]

    @property
    def ok(self) -> bool:
        norm = self.expected.replace('" "', "").strip('"').lower()
        return any(norm == f.lower() or norm in f.lower() for f in self.found)


class AdminPages:
    def __init__(self, portal: Portal, abuse: Abuse | None, resolver: Resolver | None) -> None:
        self.portal = portal
        self.service = portal.service
        self.abuse = abuse
        self.resolver = resolver

    async def _enter(self, request: web.Request) -> Ctx:
        ctx = await self.portal._enter(request)
        if not await self.service.is_admin(ctx.session):
            raise web.HTTPNotFound()  # the page does not exist for a user who is not one
        return ctx

    async def _page(self, ctx: Ctx, status: int = 200, **values: Any) -> web.Response:
        s = self.service
        users = await s.run(s.directory.users)
        states = {u.id: await s.run(s.settings.get, u.id) for u in users}
        admins = {u.id for u in users if await s.run(s._is_admin, u.id)}
        queue: list[mta_admin.EntrySummary] = []
        try:
            queue = await s.run(self._queue)
        except Exception:
            queue = []
        return await self.portal.render(
            ctx,
            "admin.html",
            status,
            domains=await s.run(s.directory.domains),
            users=users,
            states=states,
            admins=admins,
            invitations=await s.run(s.invitations.pending),
            bans=self.abuse.bans() if self.abuse is not None else [],
            queue=queue,
            **values,
        )

    def _queue(self) -> list[mta_admin.EntrySummary]:
        app = self.service.app
        path = app.settings.path(QUEUE_FILE)
        if not path.exists():
            return []
        with QueueStore.open(path, app.server_key.derive("queue"), create=False) as store:
            return mta_admin.list_entries(store)

    async def home(self, request: web.Request) -> web.StreamResponse:
        return await self._page(await self._enter(request))

    async def add_domain(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service

        def add() -> str:
            domain = s.directory.add_domain(ctx.field("domain"))
            signing.new_key_pair(s.directory, domain)
            return domain

        try:
            domain = await s.run(add)
        except (DirectoryError, AddressError, ValueError) as e:
            return await self._page(ctx, 400, error=str(e))
        raise self.portal._done(ctx, f"{ADMIN}/domains/{domain}", f"Added {domain}.")

    async def domain(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        domain = request.match_info["domain"].lower()
        if not await s.run(s.directory.has_domain, domain):
            raise web.HTTPNotFound()
        settings = s.app.settings
        keys = await s.run(s.directory.dkim_keys, domain)
        policy = mtasts.policy_text([settings.hostname], settings.mta.sts_mode)
        zone = dnsrecords.records(
            domain, settings.hostname, keys, mtasts.policy_id(policy), client_servers(settings)
        )
        checks = [
            Check(domain, "MX", settings.hostname.lower(), []),
            Check(domain, "TXT", "v=spf1 mx -all", []),
            Check(f"_dmarc.{domain}", "TXT", "v=DMARC1", []),
            *(
                Check(
                    f"{k.selector}._domainkey.{domain}", "TXT", dkim.key_record(k.private_key), []
                )
                for k in keys
                if k.active
            ),
        ]
        checks = await self._live(checks)
        return await self.portal.render(
            ctx, "admin_domain.html", domain=domain, keys=keys, zone=zone, checks=checks
        )

    async def _live(self, checks: list[Check]) -> list[Check]:
        """What the resolver finds published for each record, now."""
        if self.resolver is None:
            return checks

        async def one(check: Check) -> Check:
            assert self.resolver is not None
            try:
                async with asyncio.timeout(DNS_CHECK_SECONDS):
                    if check.kind == "MX":
                        found = [host for _, host in await self.resolver.mx(check.name)]
                    else:
                        found = [
                            t.decode(errors="replace") for t in await self.resolver.txt(check.name)
                        ]
            except (DNSError, TimeoutError):
                found = []
            return Check(check.name, check.kind, check.expected, found)

        return list(await asyncio.gather(*(one(c) for c in checks)))

    async def rotate_dkim(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        domain = request.match_info["domain"].lower()
        if not await s.run(s.directory.has_domain, domain):
            raise web.HTTPNotFound()
        keys = await s.run(signing.new_key_pair, s.directory, domain)
        names = ", ".join(k.selector for k in keys)
        raise self.portal._done(
            ctx, f"{ADMIN}/domains/{domain}", f"New selectors {names} sign now; publish them."
        )

    async def invite(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        try:
            address = await s.run(s.accounts.check_new_address, ctx.field("address"))
            quota_mb = int(ctx.field("quota") or 0)
            if quota_mb < 0:
                raise ValueError("the quota cannot be negative")
        except (DirectoryError, AddressError, ValueError) as e:
            return await self._page(ctx, 400, error=str(e))
        token = await s.run(s.invitations.create, address, quota_mb * 1024 * 1024)
        link = f"https://{request.host}{PREFIX}/invite/{token}"
        return await self._page(ctx, invitation=(address, link))

    async def user_update(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        user = await s.run(s.directory.user, ctx.field("address"))
        if user is None:
            raise web.HTTPNotFound()
        action = ctx.field("action")
        try:
            if action in ("disable", "enable"):
                if user.id == ctx.session.user_id:
                    raise SettingsError("you cannot disable your own account")
                await s.run(s.settings.set_disabled, user.id, action == "disable")
                if action == "disable":
                    await s.sessions.end_user(user.id)
                    s.login.cache.forget(user.address)
            elif action == "quota":
                quota = int(ctx.field("quota") or 0)
                if quota < 0:
                    raise SettingsError("the quota cannot be negative")
                await s.run(s.directory.set_quota, user.id, quota * 1024 * 1024)
            elif action in ("make-admin", "make-user"):
                await s.run(s.settings.set_role, user.id, action.removeprefix("make-"))
            else:
                raise web.HTTPBadRequest()
        except (SettingsError, ValueError) as e:
            return await self._page(ctx, 400, error=str(e))
        raise self.portal._done(ctx, f"{ADMIN}/", f"{user.address}: saved.")

    async def unban(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        if self.abuse is not None:
            await self.abuse.unban(ctx.field("network"))
        raise self.portal._done(ctx, f"{ADMIN}/", "The ban is lifted.")

    # -- the invited user's side -------------------------------------------------------

    async def invitation_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self.portal._enter(request, "anonymous")
        s = self.service
        invitation = await s.run(s.invitations.find, request.match_info["token"])
        if invitation is None:
            raise web.HTTPNotFound(text="this invitation is used or has expired")
        return await self.portal.render(
            ctx,
            "invite.html",
            invited=invitation.address,
            error=None,
            token=request.match_info["token"],
        )

    async def accept(self, request: web.Request) -> web.StreamResponse:
        ctx = await self.portal._enter(request, "anonymous")
        s = self.service
        token = request.match_info["token"]
        invitation = await s.run(s.invitations.find, token)
        if invitation is None:
            raise web.HTTPNotFound(text="this invitation is used or has expired")
        password = ctx.field("password")
        if password != ctx.field("repeat"):
            return await self.portal.render(
                ctx,
                "invite.html",
                400,
                invited=invitation.address,
                token=token,
                error="The passwords differ.",
            )
        if not await s.run(s.invitations.consume, token):
            raise web.HTTPNotFound(text="this invitation is used or has expired")
        try:
            if s.remote is not None:  # a cluster front: made on a mailbox node
                created = await s.remote.create_user(invitation.address, password, invitation.quota)
            else:
                created = await s.run(
                    s.accounts.create_user, invitation.address, password, invitation.quota
                )
        except (DirectoryError, AddressError) as e:
            # The link is spent only by success: put it back for another try.
            await s.run(self._restore, invitation.address, invitation.quota, token)
            return await self.portal.render(
                ctx, "invite.html", 400, invited=invitation.address, token=token, error=str(e)
            )
        return await self.portal.render(
            ctx,
            "message.html",
            title="Welcome",
            text=f"{created.user.address} is ready. Keep this recovery key somewhere safe: it "
            "is the only way back into your mailbox if you forget your password, and it is "
            "shown only now.",
            secret=created.recovery_key,
            link=f"{PREFIX}/login",
        )

    def _restore(self, address: str, quota: int, token: str) -> None:
        inv = self.service.invitations
        with inv.store.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO invitations(digest, address, quota, expires)"
                " VALUES(?, ?, ?, ?)",
                (inv._digest(token), address, quota, now() + VALID_SECONDS),
            )

    def routes(self) -> list[web.RouteDef]:
        get, post = web.get, web.post
        return [
            get(f"{ADMIN}/", self.home),
            post(f"{ADMIN}/domains", self.add_domain),
            get(f"{ADMIN}/domains/{{domain}}", self.domain),
            post(f"{ADMIN}/domains/{{domain}}/dkim-rotate", self.rotate_dkim),
            post(f"{ADMIN}/users/invite", self.invite),
            post(f"{ADMIN}/users", self.user_update),
            post(f"{ADMIN}/bans/remove", self.unban),
            get(f"{PREFIX}/invite/{{token}}", self.invitation_page),
            post(f"{PREFIX}/invite/{{token}}", self.accept),
        ]
