"""Reading the user's own mailbox for the portal: the whole of it as mbox, and what the
filter sent to Junk this week.

On one machine both open the mailbox with the key the user's session holds, in the
registry's worker thread, and release it after (:class:`LocalMailbox`). On a cluster front
the mailbox node does it, with the key only it holds (cluster/portal.py, the same
:class:`MailboxAccess` face). Nothing decrypted is written anywhere but the response.
The mbox is streamed message by message (``mboxrd``: every ``>*From `` line of a body
gains one ``>``, so the file reads back exactly), never held whole in memory.
"""

from __future__ import annotations

import datetime
import email.utils
import re
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Protocol

from aiohttp import web

from postvern.accounts.sessions import Session
from postvern.directory.db import User
from postvern.store.mailbox import Mailbox
from postvern.store.service import MailboxRegistry
from postvern.web.portal import security

JUNK_DAYS = 7
MAX_JUNK_LISTED = 200  # a page, not an archive
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class JunkItem:
    date: str
    sender: str
    subject: str


class MailboxAccess(Protocol):
    """How the portal reads the session's mailbox: here, or on the user's mailbox node."""

    def can_read(self, session: Session) -> bool:
        """Whether the session can open its mailbox without the password again."""

    async def junk(self, session: Session, user: User) -> list[JunkItem] | None:
        """This week's junk; None when the mailbox cannot be opened without the password."""

    async def mbox(
        self, session: Session, user: User, request: web.Request
    ) -> web.StreamResponse | None:
        """The mailbox as an mbox download; None as for :meth:`junk`."""


def junk_since() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=JUNK_DAYS)


def junk(box: Mailbox, since: datetime.datetime) -> list[JunkItem]:
    folder = box.folder_by_use("\\Junk")
    if folder is None:
        return []
    found: list[JunkItem] = []
    for info in reversed(box.messages(folder.id)):
        if info.internaldate < since or len(found) >= MAX_JUNK_LISTED:
            break
        head = box.raw(folder.id, info.uid).split(b"\r\n\r\n", 1)[0][:16384]
        headers = BytesHeaderParser(policy=default_policy).parsebytes(head)
        found.append(
            JunkItem(
                info.internaldate.strftime("%d %b %H:%M"),
                str(headers.get("From", ""))[:200],
                str(headers.get("Subject", ""))[:200],
            )
        )
    return found


def message_list(box: Mailbox) -> list[tuple[int, str, int, datetime.datetime]]:
    return [
        (f.id, f.name, info.uid, info.internaldate)
        for f in box.folders()
        for info in box.messages(f.id)
    ]


def mbox_entry(raw: bytes, folder: str, when: datetime.datetime) -> bytes:
    """One mboxrd entry: the From_ line, an X-Folder header, the message with >From quoting."""
    stamp = email.utils.formatdate(when.timestamp(), usegmt=False)
    body = raw.replace(b"\r\n", b"\n")
    body = _FROM_LINE.sub(rb">\1", body)
    if not body.endswith(b"\n"):
        body += b"\n"
    folder_header = f"X-Folder: {folder}\n".encode("utf-8", "replace")
    return b"From MAILER-DAEMON " + stamp.encode() + b"\n" + folder_header + body + b"\n"


def mbox_response(user: User) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/mbox",
            "Content-Disposition": f'attachment; filename="{user.localpart}.mbox"',
        }
    )
    security.harden(response)
    return response


class LocalMailbox:
    """One machine: the session holds the mailbox key; open the mailbox here."""

    def __init__(self, registry: MailboxRegistry) -> None:
        self.registry = registry

    def can_read(self, session: Session) -> bool:
        return session.mailbox_key is not None

    async def junk(self, session: Session, user: User) -> list[JunkItem] | None:
        if session.mailbox_key is None:
            return None
        handle = await self.registry.unlock(user, session.mailbox_key)
        try:
            return await handle.run(junk, handle.box, junk_since())
        finally:
            await handle.release()

    async def mbox(
        self, session: Session, user: User, request: web.Request
    ) -> web.StreamResponse | None:
        if session.mailbox_key is None:
            return None
        response = mbox_response(user)
        handle = await self.registry.unlock(user, session.mailbox_key)
        try:
            listing = await handle.run(message_list, handle.box)
            await response.prepare(request)
            for folder_id, name, uid, when in listing:
                raw = await handle.run(handle.box.raw, folder_id, uid)
                await response.write(mbox_entry(raw, name, when))
            await response.write_eof()
        finally:
            await handle.release()
        return response
