"""The portal's Encryption page: the user's own OpenPGP key or S/MIME certificate (issue #17).

What ``postvern user key import|show|remove|encrypt|publish`` lets an administrator do, the
user does here for themselves: upload a public key or certificate (a file or pasted text),
see what is stored, remove it, turn encryption of incoming mail on or off (which key, and
whether the Subject stays readable outside), and publish the OpenPGP key (WKD, Autocrypt).
Every check and refusal is e2e's own (:class:`postvern.e2e.keys.KeyStore`,
:func:`postvern.e2e.openpgp.check_key`, :func:`postvern.e2e.smime.check_certificate`): the
page shows the same reason the CLI prints. Only public parts ever reach the server.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from postvern.directory.db import DirectoryError, User
from postvern.e2e import openpgp, smime
from postvern.e2e.admin import _detect as detect_format
from postvern.e2e.keys import Format, KeyStore, UserKeys
from postvern.e2e.protect import SubjectPolicy
from postvern.web.portal.views import PREFIX, Ctx, Portal

PAGE = f"{PREFIX}/encryption"
REFUSED = (openpgp.KeyRefused, smime.CertificateRefused, DirectoryError)


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored key as the page shows it (``problem`` when it can no longer be used)."""

    fingerprint: str
    names: tuple[str, ...]  # OpenPGP user IDs, or the certificate's subject and addresses
    expires: datetime.datetime | None
    problem: str | None = None


def _openpgp(data: bytes) -> Stored:
    try:
        info = openpgp.check_key(data)
    except openpgp.KeyRefused as e:
        return Stored("", (), None, str(e))
    return Stored(info.fingerprint, info.user_ids, info.expires)


def _smime(data: bytes) -> Stored:
    try:
        cert = smime.check_certificate(data)
    except smime.CertificateRefused as e:
        return Stored("", (), None, str(e))
    return Stored(cert.fingerprint, (cert.subject, *cert.emails), cert.expires)


class KeyPages:
    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.service = portal.service
        self.store = KeyStore(self.service.directory)

    async def _keys(self, user: User) -> UserKeys | None:
        return await self.service.run(self.store.get, user.id)

    async def _page(self, ctx: Ctx, status: int = 200, **values: Any) -> web.Response:
        user = await self.service.user(ctx.session)
        keys = await self._keys(user)
        pgp = keys.openpgp if keys else None
        cert = keys.smime if keys else None
        return await self.portal.render(
            ctx,
            "encryption.html",
            status,
            keys=keys,
            pgp=await self.service.run(_openpgp, pgp) if pgp else None,
            cert=await self.service.run(_smime, cert) if cert else None,
            encrypt=keys.encrypt.value if keys and keys.encrypt else None,
            subject=keys.subject.value if keys else SubjectPolicy.KEPT.value,
            published=bool(keys and keys.publish),
            pasted=values.pop("pasted", ""),
            **values,
        )

    async def page(self, request: web.Request) -> web.StreamResponse:
        ctx = await self.portal._enter(request)
        return await self._page(ctx)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        ctx = await self.portal._enter(request, upload=True)
        user = await self.service.user(ctx.session)
        pasted = ctx.field("key").strip()
        data = ctx.files.get("file") or pasted.encode()
        if not data:
            return await self._page(ctx, 400, error="Choose a key file or paste the key.")
        chosen = ctx.field("format")
        publish = ctx.field("publish") == "on"
        try:
            fmt = Format(chosen) if chosen in {f.value for f in Format} else detect_format(data)
            if fmt is Format.OPENPGP:
                pgp = await self.service.run(self._import_openpgp, user, data, publish)
                flash = f"Your OpenPGP key {pgp.fingerprint} is stored"
                flash += ", and published." if publish else "."
            else:
                if publish:
                    raise DirectoryError("publishing is for OpenPGP keys (WKD, Autocrypt)")
                cert = await self.service.run(self.store.import_smime, user, data)
                flash = f"Your S/MIME certificate {cert.fingerprint} ({cert.subject}) is stored."
        except REFUSED as e:
            return await self._page(ctx, 400, error=f"Key refused: {e}", pasted=pasted)
        raise self.portal._done(ctx, PAGE, flash)

    def _import_openpgp(self, user: User, data: bytes, publish: bool) -> openpgp.KeyInfo:
        return self.store.import_openpgp(user, data, publish=publish)

    async def remove(self, request: web.Request) -> web.StreamResponse:
        ctx = await self.portal._enter(request)
        user = await self.service.user(ctx.session)
        try:
            fmt = Format(ctx.field("format"))
        except ValueError:
            raise web.HTTPBadRequest() from None
        if not await self.service.run(self.store.remove, user, fmt):
            return await self._page(ctx, 400, error="There is no such key to remove.")
        what = "OpenPGP key" if fmt is Format.OPENPGP else "S/MIME certificate"
        raise self.portal._done(ctx, PAGE, f"Your {what} is removed.")

    async def encrypt(self, request: web.Request) -> web.StreamResponse:
        ctx = await self.portal._enter(request)
        user = await self.service.user(ctx.session)
        try:
            if ctx.field("state") == "off":
                await self.service.run(self.store.set_encrypt, user, None)
                raise self.portal._done(ctx, PAGE, "Your incoming mail is stored as it arrives.")
            fmt = await self._format(user, ctx.field("format"))
            subject = SubjectPolicy(ctx.field("subject") or SubjectPolicy.KEPT.value)
            await self.service.run(self.store.set_encrypt, user, fmt, subject)
        except ValueError:
            raise web.HTTPBadRequest() from None
        except DirectoryError as e:
            return await self._page(ctx, 400, error=str(e))
        what = "OpenPGP key" if fmt is Format.OPENPGP else "S/MIME certificate"
        raise self.portal._done(ctx, PAGE, f"Your incoming mail is encrypted to your {what}.")

    async def _format(self, user: User, chosen: str) -> Format:
        """The key chosen, or as the CLI picks: the OpenPGP key if one is stored."""
        if chosen:
            return Format(chosen)
        keys = await self._keys(user)
        return Format.SMIME if keys is not None and keys.openpgp is None else Format.OPENPGP

    async def publish(self, request: web.Request) -> web.StreamResponse:
        ctx = await self.portal._enter(request)
        user = await self.service.user(ctx.session)
        on = ctx.field("state") == "on"
        try:
            await self.service.run(self.store.set_publish, user, on)
        except REFUSED as e:
            return await self._page(ctx, 400, error=f"Not published: {e}")
        flash = "Your OpenPGP key is published (WKD and Autocrypt)." if on else "Not published."
        raise self.portal._done(ctx, PAGE, flash)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(PAGE, self.page),
            web.post(PAGE, self.upload),
            web.post(f"{PAGE}/remove", self.remove),
            web.post(f"{PAGE}/encrypt", self.encrypt),
            web.post(f"{PAGE}/publish", self.publish),
        ]
