"""One IMAP connection on asyncio: the sans-I/O core of :mod:`.protocol` driven over a socket.

The session reads only when the core needs data, so while a command executes nothing more is
read and a client that pipelines is held back by TCP (IDLE is the exception: the session then
waits for DONE and for the change feed at once, and reports a delivery as soon as it is
committed). It logs the user in through :class:`~postvern.login.LoginService`, hands every
later command to the :class:`~postvern.imap.executor.Executor`, and on every way out releases
the mailbox, so the mailbox key leaves memory when the user's last session ends.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time

from postvern import workers
from postvern.config import Limits
from postvern.imap.executor import Executor
from postvern.imap.grammar import commands as c
from postvern.imap.protocol import (
    DEFAULT_CAPABILITIES,
    NEED_DATA,
    PAUSED,
    CommandReceived,
    ConnectionClosed,
    ConnectionState,
    IdleDone,
    ImapConnection,
    LocalProtocolError,
    ProtocolConfig,
    StartTLSRequested,
)
from postvern.imap.serialize import Code, Completion, Condition, ResponseCode, Status
from postvern.login import LoginRefused, LoginService
from postvern.net import Channel, converse_and_close
from postvern.store.service import ChangeFeed, MailboxHandle

log = logging.getLogger(__name__)

# What this server advertises: the core's list less what the store cannot back. There is no
# per-message-count quota, so QUOTA=RES-MESSAGE would promise a limit that does not exist.
CAPABILITIES = tuple(cap for cap in DEFAULT_CAPABILITIES if cap != "QUOTA=RES-MESSAGE")
# Before login a connection holds no mailbox; a minute is plenty to say who you are, and
# idle anonymous connections must not pile up (RFC 9051 §5.4 sets 30 minutes only for
# authenticated ones).
PREAUTH_TIMEOUT = 60.0
# What ID (RFC 2971) answers: the core's name and version.
SERVER_ID = ProtocolConfig().server_id


# The protocol configurations in use: a listener's sessions all share one.
_CONFIGS: dict[tuple[int, bool, bool, object], tuple[Limits, ProtocolConfig]] = {}


def _protocol_config(limits: Limits, tls_available: bool, plaintext_auth: bool) -> ProtocolConfig:
    # With several worker processes, ID (RFC 2971) also says which one answers.
    server_id = SERVER_ID + workers.server_id(workers.current)
    key = (id(limits), tls_available, plaintext_auth, server_id)
    cached = _CONFIGS.get(key)
    if cached is not None and cached[0] is limits:
        return cached[1]
    config = ProtocolConfig(
        capabilities=CAPABILITIES,
        tls_available=tls_available,
        plaintext_auth=plaintext_auth,
        limits=limits,
        server_id=server_id,
    )
    if len(_CONFIGS) > 16:  # limits objects replaced by reloads: keep only recent ones
        _CONFIGS.clear()
    _CONFIGS[key] = (limits, config)
    return config


class SessionCounter:
    """Open sessions per user, shared by every IMAP listener (Limits.imap_sessions_per_user)."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._open: collections.Counter[str] = collections.Counter()

    def admit(self, user_id: str) -> bool:
        if self._open[user_id] >= self.per_user:
            return False
        self._open[user_id] += 1
        return True

    def leave(self, user_id: str) -> None:
        self._open[user_id] -= 1
        if self._open[user_id] <= 0:
            del self._open[user_id]


class ImapSession:
    """Runs one connection from greeting to close; :meth:`run` never raises."""

    def __init__(
        self,
        channel: Channel,
        *,
        login: LoginService,
        limits: Limits,
        ssl_context: ssl.SSLContext | None,
        tls_active: bool,
        hostname: str,
        counter: SessionCounter,
        plaintext_auth: bool = False,
    ) -> None:
        self.channel = channel
        self.login = login
        self.limits = limits
        self.ssl_context = ssl_context
        self.hostname = hostname
        self.counter = counter
        self.peer_ip = channel.peer_ip
        config = _protocol_config(limits, ssl_context is not None, plaintext_auth)
        self.conn = ImapConnection(config, tls_active=tls_active)
        self.handle: MailboxHandle | None = None
        self.executor: Executor | None = None
        self._user_id: str | None = None
        self._idling = False
        self._last_input = time.monotonic()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        await converse_and_close("imap", self._converse, self._finish)

    async def _converse(self) -> str:
        self.conn.greeting(f"{self.hostname} Postvern IMAP ready")
        while True:
            event = self.conn.next_event()
            if isinstance(event, StartTLSRequested):
                await self._start_tls()  # it sends the queued OK itself, once it stops reading
                continue
            # Always flush before waiting: the core answers some commands by itself.
            if not await self._flush():
                return "client stopped reading"
            if event is NEED_DATA:
                if self._idling:
                    await self._idle_wait()
                else:
                    await self._read()
            elif isinstance(event, CommandReceived):
                await self._command(event.command)
            elif isinstance(event, IdleDone):
                self._idling = False
                if self.handle is not None:
                    self.handle.active()
                if not event.aborted:
                    self.conn.send(Completion.ok(event.tag, "IDLE terminated"))
            elif isinstance(event, ConnectionClosed):
                await self._flush()
                return event.reason
            elif event is PAUSED:
                # Every command is answered before the next event is asked for.
                raise LocalProtocolError("the core waits for a completion that was never sent")
            # CompressionStarted needs nothing: the core compresses from now on.

    @property
    def _timeout(self) -> float:
        if self.conn.state is ConnectionState.NOT_AUTHENTICATED:
            return PREAUTH_TIMEOUT
        return self.limits.imap_idle_timeout

    async def _read(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                data = await self.channel.read()  # cancelling it loses nothing
        except TimeoutError:
            self._autologout()
            return
        self._received(data)

    def _received(self, data: bytes | None) -> None:
        if data is None:
            # The listener is shutting down: RFC 9051 §7.1.5 lets a server say BYE any time.
            self.conn.send(Condition(Status.BYE, "server shutting down"))
            return
        self._last_input = time.monotonic()
        self.conn.receive_data(data)

    def _autologout(self) -> None:
        # RFC 9051 §5.4: an inactive client is logged out, IDLE or not.
        self.conn.send(Condition(Status.BYE, "autologout: idle for too long"))

    async def _flush(self) -> bool:
        """Send what the core has queued; False if the client is gone or stopped reading."""
        data = self.conn.data_to_send()
        if data:
            self.channel.write(data)
        if self.channel.write_paused:  # a timer only when there is something to wait for
            try:
                async with asyncio.timeout(self.limits.imap_idle_timeout):
                    await self.channel.drain()
            except TimeoutError:
                return False
        return not self.channel.lost

    async def _write_out(self) -> None:
        if not await self._flush():
            raise ConnectionError("client stopped reading")

    # -- IDLE ---------------------------------------------------------------------------------

    async def _idle_wait(self) -> None:
        """Wait for input (DONE) and report changes the moment they are committed.

        Thousands of sessions sit here at once, so the wait holds no task of its own: one
        future that input, a change or the autologout timer completes (bench/imap_idle.py).
        """
        feed = self.executor.feed if self.executor is not None else None
        while not self.channel.readable:
            if feed is not None and feed.pending:
                await self._report()
                if self.conn.state is ConnectionState.LOGOUT:
                    return  # the report ended the session (the mailbox was deleted)
                continue
            remaining = self._last_input + self.limits.imap_idle_timeout - time.monotonic()
            if remaining <= 0:
                self._autologout()
                return
            await self._input_or_change(feed, remaining)
        self._received(await self.channel.read())  # readable: returns at once

    async def _input_or_change(self, feed: ChangeFeed | None, seconds: float) -> None:
        """Return when input or a change arrives, or after ``seconds``."""
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()

        def poke() -> None:
            if not wake.done():
                wake.set_result(None)

        timer = loop.call_later(seconds, poke)
        self.channel.notify_input(poke)
        if feed is not None:
            feed.on_change = poke
        try:
            await wake
        finally:
            timer.cancel()
            self.channel.notify_input(None)
            if feed is not None:
                feed.on_change = None

    async def _report(self) -> None:
        if self.executor is None:
            return
        await self.executor.report_changes(allow_expunge=True)
        await self._write_out()
        if self.handle is not None:
            self.handle.quiet()  # the report may have woken the mailbox: to sleep again

    # -- commands -----------------------------------------------------------------------------

    async def _command(self, command: c.Command) -> None:
        if isinstance(command, c.Login | c.Authenticate):
            self.conn.send(await self._login(command))
            return
        if isinstance(command, c.Idle):
            self._idling = True
            if self.executor is not None:  # RFC 9051 §6.3.13: report what is pending now
                await self.executor.report_changes(allow_expunge=True)
            if self.handle is not None:  # idle for minutes: the SQLite connection can go
                self.handle.quiet()
            return
        if isinstance(command, c.Noop) and self.executor is None:
            self.conn.send(Completion.ok(command.tag, "NOOP completed"))
            return
        assert self.executor is not None  # the core only passes these on after login
        try:
            completion = await self.executor.execute(command)
        except (OSError, ConnectionError):
            raise
        except Exception:
            log.exception("imap %s failed", command.name)
            completion = Completion.no(command.tag, "internal error", ResponseCode(Code.SERVERBUG))
        self.conn.send(completion)

    async def _login(self, command: c.Login | c.Authenticate) -> Completion:
        tag = command.tag
        if isinstance(command, c.Login):
            user, secret = command.username, command.password
        else:
            credentials = command.credentials
            if credentials is None:
                return Completion.no(tag, "unsupported authentication mechanism")
            if credentials.authzid and credentials.authzid != credentials.authcid:
                # RFC 4616 §2: acting as another user is not something this server allows.
                return Completion.no(
                    tag, "cannot act as another user", ResponseCode(Code.AUTHORIZATIONFAILED)
                )
            user, secret = credentials.authcid, credentials.password
        try:
            logged_in = await self.login.login(user, secret, self.peer_ip, "imap")
        except LoginRefused as e:
            if e.reason in ("failed", "app-password"):
                code = Code.AUTHENTICATIONFAILED
                text = str(e) if e.reason == "app-password" else "authentication failed"
                return Completion.no(tag, text, ResponseCode(code))
            return Completion.no(tag, str(e), ResponseCode(Code.UNAVAILABLE))
        except Exception:
            log.exception("imap login failed unexpectedly")
            return Completion.no(tag, "try again later", ResponseCode(Code.UNAVAILABLE))
        if not self.counter.admit(logged_in.user.id):
            await logged_in.mailbox.release()
            return Completion.no(
                tag, "too many sessions for this account", ResponseCode(Code.LIMIT)
            )
        self._user_id = logged_in.user.id
        self.handle = logged_in.mailbox
        self.executor = Executor(self.conn, self.handle, limits=self.limits, flush=self._write_out)
        caps = ResponseCode.capability(self.conn.capabilities(ConnectionState.AUTHENTICATED))
        return Completion.ok(tag, "logged in", caps)

    async def _start_tls(self) -> None:
        assert self.ssl_context is not None
        # Stop reading before the OK goes out: the ClientHello that answers it belongs to TLS,
        # and nothing pipelined behind STARTTLS in plaintext may survive (CVE-2011-0411).
        self.channel.discard_input()
        await self._write_out()
        await self.channel.start_tls(self.ssl_context)
        self.conn.tls_established()

    async def _finish(self) -> None:
        self.channel.close()
        handle, self.handle = self.handle, None
        if self.executor is not None:
            self.executor.close_feed()
        if self._user_id is not None:
            self.counter.leave(self._user_id)
        if handle is not None:
            await handle.release()
