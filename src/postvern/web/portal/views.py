"""The portal's pages for the account's owner: log in (password then second factor, or a
passkey alone), the dashboard, password, two-factor settings, passkeys, recovery codes, app
passwords, API tokens, aliases, spam settings, the recovery key, sessions and the export
(the Encryption page is ``keys.py``, the administrators' pages ``admin.py``).

Every page is rendered on the server with escaping on (Jinja2 autoescape) and works without
JavaScript; only the passkey ceremonies need the one script file. Each handler runs through
:meth:`Portal._enter`, which finds the session, refuses cross-site requests and checks the
CSRF token of every POST before the handler sees the form.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url

from postvern.accounts import policy
from postvern.accounts.passkeys import PRF_OUTPUT_BYTES, PRF_SALT, PasskeyError
from postvern.accounts.service import AccountError, AccountService
from postvern.accounts.sessions import ANONYMOUS, FULL, PENDING, Session
from postvern.accounts.settings import SettingsError
from postvern.accounts.tokens import SCOPES, TokenError
from postvern.web.portal import security
from postvern.web.portal.export import LocalMailbox, MailboxAccess

PREFIX = "/account"
HERE = Path(__file__).parent
# Where a request's session is kept for writing it back after the response (routes.py).
SESSION_KEY = "postvern.portal.session"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Actions that need the user to have proved who they are recently (login, or the confirm
# page: password or a current code), and where the confirm page sends them back.
CONFIRMED_ACTIONS = {"export": f"{PREFIX}/export.mbox", "junk": f"{PREFIX}/spam"}
MAX_FORM_FIELD = 4096  # no field of ours is longer; a longer one is refused, not cut
# What templates may show when a handler has it (an error, a secret shown once, …).
OPTIONAL: dict[str, Any] = dict.fromkeys(
    ("error", "created", "codes", "enrolment", "flash_now", "invitation")
)


@dataclass
class Ctx:
    request: web.Request
    session: Session
    form: dict[str, str]
    new_token: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # uploads, on pages that take them

    @property
    def ip(self) -> str:
        return self.request.remote or ""

    def field(self, name: str) -> str:
        return self.form.get(name, "")


class Portal:
    def __init__(
        self,
        service: AccountService,
        *,
        rp_ids: frozenset[str],
        mailbox: MailboxAccess | None = None,
    ) -> None:
        self.service = service
        self.sessions = service.sessions
        # The pages that read the mailbox: here, or (a cluster front) on its mailbox node.
        self.mailbox: MailboxAccess = mailbox or LocalMailbox(service.login.registry)
        # Host names passkeys may be bound to (WebAuthn's RP ID): the server's own name and
        # "localhost" for a portal reached through a tunnel; others get no passkey button.
        self.rp_ids = rp_ids
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["when"] = _when
        self.env.filters["size"] = _size
        self.static = {p.name: p.read_bytes() for p in (HERE / "static").iterdir()}

    # -- plumbing ----------------------------------------------------------------------

    async def _enter(self, request: web.Request, need: str = FULL, *, upload: bool = False) -> Ctx:
        """The request's session (a new anonymous one if it has none) and checked form.

        ``upload``: the form may carry files (into ``ctx.files``) and text fields longer than
        ``MAX_FORM_FIELD`` (a pasted key); the server's request size limit still bounds them.
        """
        token = request.cookies.get(security.COOKIE)
        await self.sessions.load(token)  # from Redis, when sessions are shared
        session = self.sessions.get(token)
        new_token = None
        if session is None:
            new_token, session = self.sessions.new(
                request.remote or "", request.headers.get("User-Agent", "")
            )
        request[SESSION_KEY] = session
        ctx = Ctx(request, session, {}, new_token)
        if request.method == "POST":
            if not security.same_origin(request):
                raise web.HTTPForbidden(text="cross-site request refused")
            if request.content_type == "application/json":
                given = request.headers.get(security.CSRF_HEADER)
            else:
                post = await request.post()
                for name, value in post.items():
                    if upload and isinstance(value, web.FileField):
                        ctx.files[name] = value.file.read()
                        continue
                    if not isinstance(value, str) or (len(value) > MAX_FORM_FIELD and not upload):
                        raise web.HTTPBadRequest(text="field too long")
                    ctx.form[name] = value
                given = ctx.form.get(security.CSRF_FIELD)
            if new_token is not None or not security.csrf_ok(session.csrf, given):
                raise web.HTTPForbidden(text="the form expired; reload the page and try again")
        if need == FULL and session.stage != FULL:
            raise self._redirect(ctx, f"{PREFIX}/login")
        if need == PENDING and session.stage != PENDING:
            raise self._redirect(ctx, f"{PREFIX}/login")
        return ctx

    def _redirect(self, ctx: Ctx, location: str) -> web.HTTPSeeOther:
        response = web.HTTPSeeOther(location)
        security.harden(response)
        if ctx.new_token is not None:
            security.set_session_cookie(response, ctx.new_token)
        return response

    async def render(
        self, ctx: Ctx, template: str, status: int = 200, **values: Any
    ) -> web.Response:
        session = ctx.session
        admin = session.stage == FULL and await self.service.is_admin(session)
        text = self.env.get_template(template).render(
            csrf=session.csrf,
            address=session.address if session.stage == FULL else None,
            admin=admin,
            flash=session.scratch.pop("flash", None),
            path=ctx.request.path,
            passkeys_here=self._rp_id(ctx.request) is not None,
            **{**OPTIONAL, **values},
        )
        response = web.Response(text=text, status=status, content_type="text/html")
        security.harden(response)
        if ctx.new_token is not None:
            security.set_session_cookie(response, ctx.new_token)
        return response

    def _done(self, ctx: Ctx, location: str, flash: str) -> web.HTTPSeeOther:
        ctx.session.scratch["flash"] = flash
        return self._redirect(ctx, location)

    def _rp_id(self, request: web.Request) -> str | None:
        host = (request.host or "").rsplit(":", 1)[0].lower()
        return host if host in self.rp_ids else None

    def _origin(self, request: web.Request) -> str:
        return f"https://{request.host}"

    async def static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.static:
            raise web.HTTPNotFound()
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        response = web.Response(body=self.static[name], content_type=kind)
        security.harden(response)
        response.headers["Cache-Control"] = "public, max-age=3600"
        return response

    # -- logging in and out ------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{PREFIX}/")

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request, ANONYMOUS)
        if ctx.session.stage == FULL:
            raise self._redirect(ctx, f"{PREFIX}/")
        return await self.render(ctx, "login.html", error=None, entered="")

    async def login(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request, ANONYMOUS)
        address, password = ctx.field("address").strip(), ctx.field("password")
        session = ctx.session
        try:
            stage = await self.service.password_login(session, address, password, ctx.ip)
        except AccountError as e:
            return await self.render(ctx, "login.html", 401, error=str(e), entered=address)
        # A new token at each step up: one fixed before login is worthless after it.
        ctx.new_token = self.sessions.rotate(session)
        target = "/" if stage == FULL else "/login/second-factor"
        raise self._redirect(ctx, PREFIX + target)

    async def second_factor_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request, PENDING)
        return await self.render(ctx, "second_factor.html", error=None)

    async def second_factor(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request, PENDING)
        try:
            await self.service.second_factor(ctx.session, ctx.field("code"), ctx.ip)
        except AccountError as e:
            if ctx.session.stage != PENDING:  # too many tries: the session is gone
                raise self._done(ctx, f"{PREFIX}/login", str(e)) from None
            return await self.render(ctx, "second_factor.html", 401, error=str(e))
        ctx.new_token = self.sessions.rotate(ctx.session)
        raise self._redirect(ctx, f"{PREFIX}/")

    async def logout(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request, ANONYMOUS)
        if self.service.remote is not None:
            await self.service.remote.revoke(ctx.session)  # the mailbox node's grant
        self.sessions.drop(ctx.session)
        response = web.HTTPSeeOther(f"{PREFIX}/login")
        security.harden(response)
        security.clear_session_cookie(response)
        raise response

    # -- the dashboard and the account -------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        board = await self.service.dashboard(ctx.session)
        return await self.render(ctx, "dashboard.html", board=board)

    async def password_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        return await self.render(ctx, "password.html", error=None)

    async def password(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        if ctx.field("new") != ctx.field("repeat"):
            return await self.render(ctx, "password.html", 400, error="The new passwords differ.")
        try:
            await self.service.change_password(
                ctx.session, ctx.field("current"), ctx.field("new"), ctx.ip
            )
        except AccountError as e:
            return await self.render(ctx, "password.html", 400, error=str(e))
        raise self._done(ctx, f"{PREFIX}/", "Your password is changed.")

    # -- two-factor authentication -----------------------------------------------------

    async def security_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        return await self._security(ctx)

    async def _security(self, ctx: Ctx, status: int = 200, **values: Any) -> web.Response:
        s = self.service
        user = await s.user(ctx.session)
        return await self.render(
            ctx,
            "security.html",
            status,
            totp_on=await s.run(s.totp.enabled, user.id),
            passkeys=await s.run(s.passkeys.list, user.id),
            codes_left=await s.run(s.recovery_codes.remaining, user.id),
            two_factor=await s.run(policy.two_factor_on, s.directory, user.id),
            recent=self._recent(ctx),
            **values,
        )

    async def totp_start(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        user = await self.service.user(ctx.session)
        try:
            enrolment = await self.service.run(self.service.totp.begin, user.id, user.address)
        except ValueError as e:
            return await self._security(ctx, 400, error=str(e))
        return await self._security(ctx, enrolment=enrolment)

    async def totp_confirm(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        user = await s.user(ctx.session)
        if not await s.run(s.totp.confirm, user.id, ctx.field("code"), time.time()):
            await s.second_factor_failed_quiet(ctx.ip, user.address)
            return await self._security(
                ctx,
                400,
                error="That code is not right. Start again and check the time on your phone.",
            )
        await s.two_factor_changed(user)
        codes = None
        if await s.run(s.recovery_codes.remaining, user.id) == 0:
            codes = await s.run(s.recovery_codes.generate, user.id)
        return await self._security(ctx, codes=codes, flash_now="Two-factor authentication is on.")

    async def _confirmed(self, ctx: Ctx) -> str | None:
        """Check the form's ``confirm`` field (the password or a current code); the error
        to show if it is not right, None if it is."""
        try:
            await self.service.reauthenticate(ctx.session, ctx.field("confirm"), ctx.ip)
        except AccountError as e:
            return str(e)
        return None

    async def totp_disable(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        user = await s.user(ctx.session)
        error = await self._confirmed(ctx)
        if error is not None:
            return await self._security(ctx, 403, error=error)
        await s.run(s.totp.disable, user.id)
        await s.two_factor_changed(user)
        raise self._done(ctx, f"{PREFIX}/security", "Authenticator codes are off.")

    async def recovery_codes(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        user = await s.user(ctx.session)
        error = await self._confirmed(ctx)
        if error is not None:
            return await self._security(ctx, 403, error=error)
        codes = await s.run(s.recovery_codes.generate, user.id)
        return await self._security(ctx, codes=codes)

    # -- passkeys (JSON for the script) ------------------------------------------------

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="expected JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        return data

    def _need_rp(self, request: web.Request) -> str:
        rp_id = self._rp_id(request)
        if rp_id is None:
            raise web.HTTPNotFound(text="passkeys are not offered on this host name")
        return rp_id

    async def passkey_register_options(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        rp_id = self._need_rp(request)
        s = self.service
        user = await s.user(ctx.session)
        options, challenge = await s.run(
            s.passkeys.registration_options, user.id, user.address, rp_id
        )
        ctx.session.scratch["register"] = challenge
        return _json_response({"options": json.loads(options), "prfSalt": _b64(PRF_SALT)})

    async def passkey_register(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        rp_id = self._need_rp(request)
        s = self.service
        data = await self._json(request)
        challenge = ctx.session.scratch.pop("register", None)
        if challenge is None:
            raise web.HTTPBadRequest(text="no registration in progress")
        user = await s.user(ctx.session)
        try:
            passkey = await s.run(
                s.passkeys.register,
                user.id,
                str(data.get("name", "")),
                data.get("credential") or {},
                challenge,
                rp_id,
                self._origin(request),
            )
            prf = _prf_output(data)
            slot = False
            if prf is not None and s.remote is not None:  # the mailbox node holds the key
                slot = await s.remote.passkey_slot(ctx.session, passkey.id, prf)
            elif prf is not None and ctx.session.mailbox_key is not None:
                await s.run(s.passkeys.add_slot, passkey, ctx.session.mailbox_key, prf)
                slot = True
        except PasskeyError as e:
            return _json_response({"ok": False, "error": str(e)}, 400)
        await s.two_factor_changed(user)
        ctx.session.scratch["flash"] = (
            f"Passkey “{passkey.name}” added; it unlocks your mailbox on its own."
            if slot
            else f"Passkey “{passkey.name}” added as a second factor."
        )
        return _json_response({"ok": True, "keySlot": slot})

    async def passkey_remove(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        user = await s.user(ctx.session)
        try:
            passkey_id = int(ctx.field("id"))
        except ValueError:
            raise web.HTTPBadRequest() from None
        # Removing a second factor weakens the account: a stolen session must not do it.
        error = await self._fresh_or_confirmed(ctx, "passkey")
        if error is not None:
            return await self._security(ctx, 403, error=error)
        await s.run(s.passkeys.remove, user.id, passkey_id)
        await s.two_factor_changed(user)
        raise self._done(ctx, f"{PREFIX}/security", "The passkey is removed.")

    async def passkey_rename(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        user = await s.user(ctx.session)
        try:
            await s.run(s.passkeys.rename, user.id, int(ctx.field("id")), ctx.field("name"))
        except (ValueError, PasskeyError) as e:
            return await self._security(ctx, 400, error=str(e))
        raise self._done(ctx, f"{PREFIX}/security", "The passkey is renamed.")

    async def passkey_login_options(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request, ANONYMOUS)
        rp_id = self._need_rp(request)
        s = self.service
        user_id = ctx.session.user_id if ctx.session.stage == PENDING else None
        options, challenge = await s.run(s.passkeys.authentication_options, rp_id, user_id)
        ctx.session.scratch["assert"] = challenge
        return _json_response({"options": json.loads(options), "prfSalt": _b64(PRF_SALT)})

    async def passkey_login(self, request: web.Request) -> web.StreamResponse:
        """A passkey assertion: the second factor of a PENDING session, or — for a passkey
        that is a key slot — a whole login."""
        ctx = await self._enter(request, ANONYMOUS)
        rp_id = self._need_rp(request)
        s = self.service
        session = ctx.session
        data = await self._json(request)
        challenge = session.scratch.pop("assert", None)
        if challenge is None:
            raise web.HTTPBadRequest(text="no login in progress")
        allowed = await s.login.gate.login_allowed(ctx.ip, session.address or "")
        if allowed is not None:
            return _json_response({"ok": False, "error": "Too many failed attempts."}, 429)
        pending = session.stage == PENDING
        try:
            passkey = await s.run(
                s.passkeys.verify,
                data.get("credential") or {},
                challenge,
                rp_id,
                self._origin(request),
                session.user_id if pending else None,
            )
            if pending:
                await s.complete_second_factor(session, ctx.ip, "password + passkey")
            else:
                prf = _prf_output(data)
                if prf is None:
                    raise PasskeyError(
                        "This passkey is a second factor only: log in with your password first."
                    )
                await s.passkey_login(session, passkey, prf, ctx.ip)
        except (PasskeyError, AccountError) as e:
            await s.login.gate.login_failed(ctx.ip, session.address or "", "web-passkey")
            return _json_response({"ok": False, "error": str(e)}, 401)
        token = self.sessions.rotate(session)
        response = _json_response({"ok": True, "next": f"{PREFIX}/"})
        security.set_session_cookie(response, token)
        return response

    # -- app passwords and API tokens --------------------------------------------------

    async def app_passwords_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        return await self._app_passwords(ctx)

    async def _app_passwords(self, ctx: Ctx, status: int = 200, **values: Any) -> web.Response:
        s = self.service
        user = await s.user(ctx.session)
        return await self.render(
            ctx,
            "app_passwords.html",
            status,
            slots=await s.run(s.directory.slots, user.id, "app"),
            two_factor=await s.run(policy.two_factor_on, s.directory, user.id),
            recent=self._recent(ctx),
            **values,
        )

    async def app_password_add(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        label = ctx.field("label").strip()
        try:
            secret = await self.service.add_app_password(ctx.session, label)
        except AccountError as e:
            return await self._app_passwords(ctx, 400, error=str(e))
        return await self._app_passwords(ctx, created=(label, secret))

    async def app_password_revoke(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        user = await self.service.user(ctx.session)
        try:
            await self.service.revoke_app_password(user, ctx.field("label"))
        except AccountError as e:
            return await self._app_passwords(ctx, 400, error=str(e))
        raise self._done(ctx, f"{PREFIX}/app-passwords", "The app password is revoked.")

    async def tokens_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        return await self._tokens(ctx)

    async def _tokens(self, ctx: Ctx, status: int = 200, **values: Any) -> web.Response:
        s = self.service
        user = await s.user(ctx.session)
        return await self.render(
            ctx,
            "tokens.html",
            status,
            tokens=await s.run(s.tokens.list, user.id),
            scopes=SCOPES,
            **values,
        )

    async def token_add(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        user = await s.user(ctx.session)
        post = await request.post()
        scopes = {str(v) for v in post.getall("scope", [])}
        try:
            token = await s.run(
                lambda: s.tokens.create(
                    user.id, ctx.field("name"), scopes, admin=s._is_admin(user.id)
                )
            )
        except TokenError as e:
            return await self._tokens(ctx, 400, error=str(e))
        return await self._tokens(ctx, created=(ctx.field("name").strip(), token))

    async def token_revoke(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        user = await s.user(ctx.session)
        try:
            await s.run(s.tokens.revoke, user.id, int(ctx.field("id")))
        except ValueError:
            raise web.HTTPBadRequest() from None
        raise self._done(ctx, f"{PREFIX}/tokens", "The token is revoked.")

    # -- aliases, spam settings --------------------------------------------------------

    async def aliases_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        return await self._aliases(ctx)

    async def _aliases(self, ctx: Ctx, status: int = 200, error: str | None = None) -> web.Response:
        user = await self.service.user(ctx.session)
        aliases = await self.service.own_aliases(user)
        return await self.render(
            ctx, "aliases.html", status, aliases=aliases, domain=user.domain, error=error
        )

    async def alias_add(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        user = await self.service.user(ctx.session)
        try:
            added = await self.service.add_alias(user, ctx.field("localpart"))
        except AccountError as e:
            return await self._aliases(ctx, 400, str(e))
        raise self._done(ctx, f"{PREFIX}/aliases", f"{added} now reaches you.")

    async def alias_remove(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        user = await self.service.user(ctx.session)
        try:
            await self.service.remove_alias(user, ctx.field("alias"))
        except AccountError as e:
            return await self._aliases(ctx, 400, str(e))
        raise self._done(ctx, f"{PREFIX}/aliases", "The alias is removed.")

    async def forwarding_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        return await self._forwarding(ctx)

    async def _forwarding(
        self, ctx: Ctx, status: int = 200, error: str | None = None, entered: str | None = None
    ) -> web.Response:
        user = await self.service.user(ctx.session)
        forwarding = await self.service.forwarding(user)
        return await self.render(
            ctx,
            "forwarding.html",
            status,
            forwarding=forwarding,
            entered="\n".join(forwarding.targets) if entered is None else entered,
            policy=self.service.forwarding_policy,
            error=error,
            recent=self._recent(ctx),
        )

    async def forwarding_update(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        user = await self.service.user(ctx.session)
        text = ctx.field("targets") if ctx.field("action") != "stop" else ""
        targets = [t for t in text.replace(",", "\n").splitlines() if t.strip()]
        keep_copy = ctx.field("keep_copy") == "on"
        # A new target sends the user's mail somewhere else from now on — the first thing a
        # stolen session would do — so it needs a recent login or the password again.
        # Stopping or shortening forwarding does not.
        before = await self.service.forwarding(user)
        known = {t.lower() for t in before.targets}
        if any(t.strip().lower() not in known for t in targets):
            error = await self._fresh_or_confirmed(ctx, "forwarding")
            if error is not None:
                return await self._forwarding(ctx, 403, error, entered=text)
        try:
            done = await self.service.set_forwarding(user, targets, keep_copy)
        except AccountError as e:
            return await self._forwarding(ctx, 400, str(e), entered=text)
        flash = (
            f"Your mail is forwarded to {', '.join(done.targets)}"
            + (", and a copy is kept here." if done.keep_copy else "; no copy is kept here.")
            if done.targets
            else "Your mail is no longer forwarded."
        )
        raise self._done(ctx, f"{PREFIX}/forwarding", flash)

    async def spam_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        return await self._spam(ctx)

    async def _spam(self, ctx: Ctx, status: int = 200, error: str | None = None) -> web.Response:
        s = self.service
        user = await s.user(ctx.session)
        # None: the mailbox cannot be opened without the password (a cluster front whose
        # mailbox node forgot this session's grant); the page offers the confirm page.
        junk = await self.mailbox.junk(ctx.session, user)
        return await self.render(
            ctx,
            "spam.html",
            status,
            settings=await s.run(s.settings.get, user.id),
            default_threshold=s.app.settings.filters.spam_junk_score,
            allow=await s.run(s.settings.sender_list, user.id, "allow"),
            block=await s.run(s.settings.sender_list, user.id, "block"),
            junk=junk or [],
            junk_locked=junk is None,
            error=error,
        )

    async def spam_update(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        s = self.service
        user = await s.user(ctx.session)
        action = ctx.field("action")
        try:
            if action == "threshold":
                text = ctx.field("threshold").strip()
                value = float(text) if text else None
                await s.run(s.settings.set_junk_threshold, user.id, value)
            elif action in ("allow", "block"):
                await s.run(s.settings.add_sender, user.id, action, ctx.field("entry"))
            elif action in ("unallow", "unblock"):
                await s.run(s.settings.remove_sender, user.id, action[2:], ctx.field("entry"))
            else:
                raise web.HTTPBadRequest()
        except (SettingsError, ValueError) as e:
            return await self._spam(ctx, 400, str(e))
        raise self._done(ctx, f"{PREFIX}/spam", "Spam settings saved.")

    # -- recovery key, sessions, export ------------------------------------------------

    async def recovery_key(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        try:
            key = await self.service.regenerate_recovery_key(ctx.session)
        except AccountError as e:
            return await self._security(ctx, 400, error=str(e))
        return await self.render(ctx, "recovery_key.html", recovery_key=key)

    async def sessions_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        assert ctx.session.user_id is not None
        mine = await self.sessions.list_user(ctx.session.user_id)
        return await self.render(ctx, "sessions.html", sessions=mine, current=ctx.session)

    async def sessions_revoke(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        assert ctx.session.user_id is not None
        ended = await self.sessions.end_user(ctx.session.user_id, keep=ctx.session)
        raise self._done(ctx, f"{PREFIX}/sessions", f"{ended} other session(s) ended.")

    async def confirm_page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        action = request.query.get("action", "")
        if action not in CONFIRMED_ACTIONS:
            raise web.HTTPNotFound()
        return await self.render(ctx, "confirm.html", action=action)

    async def confirm(self, request: web.Request) -> web.StreamResponse:
        """The password or a current code again; then on to the action that asked for it."""
        ctx = await self._enter(request)
        action = ctx.field("action")
        if action not in CONFIRMED_ACTIONS:
            raise web.HTTPBadRequest()
        error = await self._confirmed(ctx)
        if error is not None:
            return await self.render(ctx, "confirm.html", 403, action=action, error=error)
        # Good for that action once even if the window is shorter than one request.
        ctx.session.scratch["confirmed"] = action
        raise self._redirect(ctx, CONFIRMED_ACTIONS[action])

    def _recent(self, ctx: Ctx) -> bool:
        """Logged in (or confirmed) within the re-authentication window."""
        window = self.service.app.settings.accounts.reauth_minutes * 60
        return self.sessions.recently_authenticated(ctx.session, window)

    async def _fresh_or_confirmed(self, ctx: Ctx, action: str) -> str | None:
        """None when the session is fresh enough for ``action`` or the form carries the
        password or a current code (``confirm``); otherwise the error to show."""
        if self._fresh(ctx, action):
            return None
        if not ctx.field("confirm"):
            return "Confirm this with your password or a current code."
        return await self._confirmed(ctx)

    def _fresh(self, ctx: Ctx, action: str) -> bool:
        """Logged in or confirmed recently enough for ``action``, or confirmed just for it."""
        window = self.service.app.settings.accounts.reauth_minutes * 60
        if ctx.session.scratch.pop("confirmed", None) == action:
            return True
        return self.sessions.recently_authenticated(ctx.session, window)

    async def export(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._enter(request)
        just_confirmed = ctx.session.scratch.get("confirmed") == "export"
        if not self._fresh(ctx, "export"):
            raise self._redirect(ctx, f"{PREFIX}/confirm?action=export")
        user = await self.service.user(ctx.session)
        response = None
        if self.mailbox.can_read(ctx.session):
            response = await self.mailbox.mbox(ctx.session, user, request)
        if response is not None:
            return response
        # The mailbox cannot be opened without the password (a passkey login on a cluster
        # front, or the mailbox node forgot its grant): the confirm page asks for it.
        if just_confirmed:
            error = "Your password is needed to open your mailbox (a code does not open it)."
            return await self.render(ctx, "confirm.html", 403, action="export", error=error)
        raise self._redirect(ctx, f"{PREFIX}/confirm?action=export")

    # -- routes ------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        p = PREFIX
        get, post = web.get, web.post
        return [
            get("/", self.root),
            get(f"{p}/static/{{name}}", self.static_file),
            get(f"{p}/login", self.login_page),
            post(f"{p}/login", self.login),
            get(f"{p}/login/second-factor", self.second_factor_page),
            post(f"{p}/login/second-factor", self.second_factor),
            post(f"{p}/logout", self.logout),
            get(f"{p}/", self.dashboard),
            get(f"{p}/password", self.password_page),
            post(f"{p}/password", self.password),
            get(f"{p}/security", self.security_page),
            post(f"{p}/security/totp/start", self.totp_start),
            post(f"{p}/security/totp/confirm", self.totp_confirm),
            post(f"{p}/security/totp/disable", self.totp_disable),
            post(f"{p}/security/recovery-codes", self.recovery_codes),
            post(f"{p}/security/recovery-key", self.recovery_key),
            post(f"{p}/passkeys/register/options", self.passkey_register_options),
            post(f"{p}/passkeys/register", self.passkey_register),
            post(f"{p}/passkeys/remove", self.passkey_remove),
            post(f"{p}/passkeys/rename", self.passkey_rename),
            post(f"{p}/passkeys/login/options", self.passkey_login_options),
            post(f"{p}/passkeys/login", self.passkey_login),
            get(f"{p}/app-passwords", self.app_passwords_page),
            post(f"{p}/app-passwords", self.app_password_add),
            post(f"{p}/app-passwords/revoke", self.app_password_revoke),
            get(f"{p}/tokens", self.tokens_page),
            post(f"{p}/tokens", self.token_add),
            post(f"{p}/tokens/revoke", self.token_revoke),
            get(f"{p}/aliases", self.aliases_page),
            post(f"{p}/aliases", self.alias_add),
            post(f"{p}/aliases/remove", self.alias_remove),
            get(f"{p}/forwarding", self.forwarding_page),
            post(f"{p}/forwarding", self.forwarding_update),
            get(f"{p}/spam", self.spam_page),
            post(f"{p}/spam", self.spam_update),
            get(f"{p}/sessions", self.sessions_page),
            post(f"{p}/sessions/revoke", self.sessions_revoke),
            get(f"{p}/confirm", self.confirm_page),
            post(f"{p}/confirm", self.confirm),
            get(f"{p}/export.mbox", self.export),
        ]


def _json_response(data: dict[str, Any], status: int = 200) -> web.Response:
    response = web.json_response(data, status=status)
    security.harden(response)
    return response


def _b64(data: bytes) -> str:
    return bytes_to_base64url(data)


def _prf_output(data: dict[str, Any]) -> bytes | None:
    text = data.get("prf")
    if not isinstance(text, str) or not text:
        return None
    try:
        out = base64url_to_bytes(text)
    except ValueError:
        return None
    return out if len(out) == PRF_OUTPUT_BYTES else None


def _when(epoch: float | None) -> str:
    if not epoch:
        return "never"
    return time.strftime("%d %b %Y, %H:%M UTC", time.gmtime(epoch))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"
