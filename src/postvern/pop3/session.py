"""One POP3 connection on asyncio: the core of :mod:`.protocol` wired to login and the store.

The maildrop is INBOX, fixed at login as a snapshot of its UIDs and sizes. DELE only marks;
at QUIT the session expunges exactly those UIDs in one transaction, so a message an IMAP
client flagged \\Deleted stays for that client to expunge, and a dropped connection deletes
nothing. As in Dovecot's default (``pop3_no_flag_updates = no``), a message sent in full by
RETR becomes \\Seen when the session ends, with or without QUIT; TOP marks nothing.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from postvern.config import Limits
from postvern.login import LoginRefused, LoginService
from postvern.net import Channel, converse_and_close
from postvern.pop3.protocol import (
    Answered,
    Authenticate,
    Closed,
    MaildropEntry,
    NeedData,
    POP3Connection,
    ResponseCode,
    Retrieve,
    StartTLS,
    Update,
)
from postvern.store.mailbox import INBOX, Mailbox, StoreError
from postvern.store.service import MailboxHandle

log = logging.getLogger(__name__)

SEEN = "\\Seen"


def unique_id(uidvalidity: int, uid: int) -> str:
    """The UIDL of a message: Dovecot's default ``%08Xu%08Xv``.

    It is the message's IMAP identity (UID and UIDVALIDITY), so it is stable across sessions
    and a client moving between POP3 and IMAP sees one message, not two.
    """
    return f"{uid:08X}{uidvalidity:08X}"


class POP3Session:
    """Runs one connection from greeting to close; :meth:`run` never raises."""

    def __init__(
        self,
        channel: Channel,
        *,
        login: LoginService,
        limits: Limits,
        ssl_context: ssl.SSLContext,
        tls_active: bool,
    ) -> None:
        self.channel = channel
        self.login = login
        self.limits = limits
        self.ssl_context = ssl_context
        self.peer_ip = channel.peer_ip
        self.conn = POP3Connection(tls_active=tls_active, tls_available=not tls_active)
        self.handle: MailboxHandle | None = None
        self._folder_id = 0
        self._seen_committed = False

    async def run(self) -> None:
        await converse_and_close("pop3", self._converse, self._finish)

    async def _converse(self) -> str:
        while True:
            event = self.conn.next_event()
            if isinstance(event, NeedData):
                if not await self._flush():
                    return "client stopped reading"
                await self._read()
                continue
            if isinstance(event, Closed):
                await self._flush()
                return event.reason
            await self._handle(event)
            if not await self._flush():
                return "client stopped reading"

    async def _read(self) -> None:
        try:
            async with asyncio.timeout(self.limits.pop3_idle_timeout):
                data = await self.channel.read()
        except TimeoutError:
            self.conn.idle_timeout()
            return
        if data is None:  # the listener is shutting down
            self.conn.shutdown()
            return
        self.conn.receive_data(data)

    async def _flush(self) -> bool:
        """Send what the core has queued; False if the client is gone or stopped reading."""
        data = self.conn.data_to_send()
        if data:
            self.channel.write(data)
        try:
            async with asyncio.timeout(self.limits.pop3_idle_timeout):
                await self.channel.drain()
        except TimeoutError:
            return False
        return not self.channel.lost

    async def _handle(self, event: Answered | Authenticate | StartTLS | Retrieve | Update) -> None:
        if isinstance(event, Authenticate):
            await self._authenticate(event)
        elif isinstance(event, StartTLS):
            await self._start_tls()
        elif isinstance(event, Retrieve):
            await self._retrieve(event)
        elif isinstance(event, Update):
            await self._update(event)

    async def _authenticate(self, event: Authenticate) -> None:
        try:
            logged_in = await self.login.login(event.username, event.password, self.peer_ip, "pop3")
        except LoginRefused as e:
            code = ResponseCode.LOGIN_DELAY if e.reason == "banned" else ResponseCode.AUTH
            self.conn.refuse_login(code, str(e) if e.reason == "app-password" else None)
            return
        except Exception:
            log.exception("pop3 login failed unexpectedly")
            self.conn.refuse_login(ResponseCode.SYS_TEMP)
            return
        self.handle = logged_in.mailbox
        try:
            self._folder_id, maildrop = await self.handle.run(_snapshot, self.handle.box)
        except Exception:
            log.exception("pop3 could not read the maildrop")
            handle, self.handle = self.handle, None
            await handle.release()
            self.conn.refuse_login(ResponseCode.SYS_TEMP)
            return
        self.conn.accept_login(maildrop)

    async def _start_tls(self) -> None:
        # Stop reading before the +OK goes out: the ClientHello that answers it belongs to TLS,
        # and nothing pipelined behind STLS in plaintext may survive (CVE-2011-0411).
        self.channel.discard_input()
        if not await self._flush():
            raise ConnectionError("client went away before the TLS handshake")
        await self.channel.start_tls(self.ssl_context)
        self.conn.tls_started()

    async def _retrieve(self, event: Retrieve) -> None:
        assert self.handle is not None
        try:
            # Reading and framing (line endings, byte-stuffing) both run in the worker
            # thread: a 50 MB message must not hold up the event loop. The core is not
            # touched by anyone else meanwhile, since this task is waiting on it.
            await self.handle.run(self._load_message, self.handle.box, event)
        except Exception:
            log.exception("pop3 could not read a message")
            self.conn.message_missing(ResponseCode.SYS_TEMP)

    def _load_message(self, box: Mailbox, event: Retrieve) -> None:
        try:
            raw = box.raw(self._folder_id, event.uid)
        except StoreError:
            self.conn.message_missing()  # expunged by another session since login
            return
        self.conn.send_message(raw)

    async def _update(self, event: Update) -> None:
        assert self.handle is not None
        try:
            await self.handle.run(self._commit, self.handle.box, event.deleted, event.seen)
            ok = True
        except Exception:
            log.exception("pop3 could not commit deletions")
            ok = False
        self._seen_committed = True
        self.conn.update_finished(ok)

    def _commit(self, box: Mailbox, deleted: tuple[int, ...], seen: tuple[int, ...]) -> None:
        if seen:
            box.store_flags(self._folder_id, seen, "add", [SEEN], origin=self)
        if deleted:
            # Exactly these UIDs, in one transaction, whatever their flags (Dovecot's
            # pop3_delete_type = expunge): other \Deleted messages belong to whoever flagged
            # them, and no IMAP client can see a half-done deletion.
            box.remove(self._folder_id, deleted, origin=self)

    async def _finish(self) -> None:
        handle, self.handle = self.handle, None
        try:
            if handle is not None and not self._seen_committed and self.conn.retrieved_uids:
                await handle.run(self._commit, handle.box, (), self.conn.retrieved_uids)
        except Exception:
            log.exception("pop3 could not mark retrieved messages seen")
        finally:
            self.channel.close()
            if handle is not None:
                await handle.release()


def _snapshot(box: Mailbox) -> tuple[int, list[MaildropEntry]]:
    """INBOX's UIDs and sizes at login: the maildrop for the whole session (RFC 1939 §4)."""
    inbox = box.folder(INBOX)
    return inbox.id, [
        MaildropEntry(m.uid, m.crlf_size, unique_id(inbox.uidvalidity, m.uid))
        for m in box.messages(inbox.id)
    ]
