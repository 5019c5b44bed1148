"""The IMAP server connection as a sans-I/O state machine (RFC 9051 §3), in the style of h11.

:class:`ImapConnection` is fed the client's bytes and hands back events; the session executes
commands against the mailbox store and gives responses back; the connection turns them into
bytes. No socket, no asyncio, no store: everything that needs only the protocol (framing,
literals and their limits, state checks, CAPABILITY, ENABLE, ID, NAMESPACE, the AUTHENTICATE
PLAIN exchange, IDLE's continuation and DONE, STARTTLS and COMPRESS=DEFLATE) is done here.

The loop a session runs::

    conn = ImapConnection(ProtocolConfig(...), tls_active=implicit_tls)
    conn.greeting()
    while True:
        write(conn.data_to_send())                 # always flush before waiting
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(await read())        # b"" at end of stream
        elif isinstance(event, CommandReceived):
            ...execute event.command; conn.send(untagged…); conn.send(Completion.ok(tag, …))
        elif isinstance(event, IdleDone):          # DONE arrived (or IDLE was aborted)
            if not event.aborted: conn.send(Completion.ok(event.tag, "IDLE terminated"))
        elif isinstance(event, StartTLSRequested): # flush first; then handshake, then:
            write(conn.data_to_send()); await start_tls(); conn.tls_established()
        elif isinstance(event, ConnectionClosed):  # LOGOUT, BYE, EOF or a fatal error
            write(conn.data_to_send()); close(); break

Events: :class:`CommandReceived` (a parsed, state-checked command: the session must answer it
with exactly one tagged :class:`~postvern.imap.serialize.Completion`; until then
:meth:`~ImapConnection.next_event` returns ``PAUSED``, except during IDLE where it keeps
reading input to find DONE), :class:`IdleDone`, :class:`StartTLSRequested`,
:class:`CompressionStarted` (informational: the COMPRESS OK has been queued and everything
after it is compressed) and :class:`ConnectionClosed`. :meth:`~ImapConnection.send` accepts any
:class:`~postvern.imap.serialize.Response`, untagged ones at any time (IDLE updates).

State follows the responses, as in h11: a tagged OK to LOGIN/AUTHENTICATE moves to
authenticated, an OK to SELECT/EXAMINE to selected (a NO leaves the selected state, RFC 9051
§6.3.2), an OK to CLOSE/UNSELECT back to authenticated, an untagged BYE to logout. Commands
that the session gets have already been checked against the state and against the advertised
capabilities (``ProtocolConfig.capabilities``: only what is listed is advertised or accepted).
Credentials in AUTHENTICATE PLAIN arrive decoded in ``Authenticate.credentials``.

Input is only processed inside :meth:`~ImapConnection.next_event`; a session that keeps
feeding bytes while a command is PAUSED makes the input buffer grow, so it should stop
reading from the socket until the command completes (``pending_input`` tells how much is held).
"""

from __future__ import annotations

import enum
import functools
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from postvern import __version__
from postvern.config import Limits
from postvern.imap.compress import CompressionError, DeflateStream
from postvern.imap.grammar import commands as c
from postvern.imap.grammar.lexer import CommandError, RawCommand
from postvern.imap.grammar.parse import (
    COMMAND_NAMES,
    GrammarContext,
    Head,
    decode_sasl,
    parse_command,
    split_head,
)
from postvern.imap.parser import (
    NEED_DATA,
    CommandFramer,
    FramingError,
    FramingLimits,
    LiteralAnnounced,
    LocalProtocolError,
    NeedData,
    NonSyncLiterals,
)
from postvern.imap.search import ModSeqTest, SequenceTest, walk
from postvern.imap.serialize import (
    CapabilityData,
    Code,
    Completion,
    Condition,
    Continuation,
    EnabledData,
    IdData,
    NamespaceData,
    Response,
    ResponseCode,
    Status,
)
from postvern.imap.wire import WireContext

__all__ = [
    "DEFAULT_CAPABILITIES",
    "NEED_DATA",
    "PAUSED",
    "CommandReceived",
    "CompressionStarted",
    "ConnectionClosed",
    "ConnectionState",
    "IdleDone",
    "ImapConnection",
    "LocalProtocolError",
    "ProtocolConfig",
    "StartTLSRequested",
]

# Everything the grammar and this core implement. The session's config may list fewer:
# what is not listed is neither advertised nor accepted. IMAP4rev2 needs its built-in
# extensions (RFC 9051 Appendix E) to stay listed.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "IMAP4rev2",
    "IMAP4rev1",
    "LITERAL+",
    "SASL-IR",
    "ID",
    "ENABLE",
    "IDLE",
    "NAMESPACE",
    "UNSELECT",
    "UIDPLUS",
    "MOVE",
    "CHILDREN",
    "LIST-EXTENDED",
    "LIST-STATUS",
    "SPECIAL-USE",
    "CREATE-SPECIAL-USE",
    "ESEARCH",
    "SEARCHRES",
    "CONDSTORE",
    "QRESYNC",
    "BINARY",
    "MULTIAPPEND",
    "UTF8=ACCEPT",
    "STATUS=SIZE",
    "APPENDLIMIT",
    "WITHIN",
    "QUOTA",
    "QUOTA=RES-STORAGE",
    "QUOTA=RES-MESSAGE",
    "SORT",
    "THREAD=REFERENCES",
    "THREAD=ORDEREDSUBJECT",
    "COMPRESS=DEFLATE",
)
# Shown before login: enough to choose how to log in, nothing about the mailbox features.
_PRE_AUTH_CAPABILITIES = frozenset(
    {"IMAP4rev2", "IMAP4rev1", "LITERAL+", "LITERAL-", "SASL-IR", "ID", "ENABLE", "IDLE"}
)
# RFC 5161 §3.1: what ENABLE can switch on, by upper-case name → canonical spelling.
_ENABLEABLE = {
    "CONDSTORE": "CONDSTORE",
    "QRESYNC": "QRESYNC",
    "IMAP4REV2": "IMAP4rev2",
    "UTF8=ACCEPT": "UTF8=ACCEPT",
}
# Consecutive BAD answers before the server gives up on a client (Dovecot uses 20 too): a
# confused or hostile peer cannot keep a connection busy with garbage.
MAX_BAD_COMMANDS = 20
# Namespace of every user (RFC 2342): one personal namespace, "/" as the hierarchy delimiter.
PERSONAL_NAMESPACE = (("", "/"),)


class ConnectionState(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


_NA = ConnectionState.NOT_AUTHENTICATED
_AUTH = ConnectionState.AUTHENTICATED
_SEL = ConnectionState.SELECTED
_ANY = frozenset({_NA, _AUTH, _SEL})
_AUTHED = frozenset({_AUTH, _SEL})
# RFC 9051 §6: the states in which each command is valid.
_ALLOWED_STATES: dict[str, frozenset[ConnectionState]] = {
    **dict.fromkeys(("CAPABILITY", "NOOP", "LOGOUT", "ID"), _ANY),
    **dict.fromkeys(("STARTTLS", "AUTHENTICATE", "LOGIN"), frozenset({_NA})),
    "ENABLE": frozenset({_AUTH}),  # RFC 5161 §3.1: before any mailbox is selected
    **dict.fromkeys(
        (
            "SELECT",
            "EXAMINE",
            "CREATE",
            "DELETE",
            "RENAME",
            "SUBSCRIBE",
            "UNSUBSCRIBE",
            "LIST",
            "LSUB",
            "NAMESPACE",
            "STATUS",
            "APPEND",
            "IDLE",
            "GETQUOTA",
            "GETQUOTAROOT",
            "SETQUOTA",
            "COMPRESS",
        ),
        _AUTHED,
    ),
}
# Commands that exist only with an extension: (capability or prefix, exact match?).
_REQUIRED_CAPABILITY = {
    "ENABLE": "ENABLE",
    "IDLE": "IDLE",
    "NAMESPACE": "NAMESPACE",
    "UNSELECT": "UNSELECT",
    "MOVE": "MOVE",
    "UID MOVE": "MOVE",
    "UID EXPUNGE": "UIDPLUS",
    "SORT": "SORT",
    "UID SORT": "SORT",
    "THREAD": "THREAD=",
    "UID THREAD": "THREAD=",
    "GETQUOTA": "QUOTA",
    "GETQUOTAROOT": "QUOTA",
    "SETQUOTA": "QUOTA",
    "ID": "ID",
    "COMPRESS": "COMPRESS=DEFLATE",
}


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """Execute this command and answer it with one tagged Completion."""

    command: c.Command


@dataclass(frozen=True, slots=True)
class IdleDone:
    """IDLE ended: DONE arrived (send the tagged OK), or ``aborted`` (BAD already sent)."""

    tag: str
    aborted: bool = False


@dataclass(frozen=True, slots=True)
class StartTLSRequested:
    """The STARTTLS OK is queued: flush, run the TLS handshake, call tls_established()."""


@dataclass(frozen=True, slots=True)
class CompressionStarted:
    """COMPRESS DEFLATE accepted; from now on both directions are compressed by the core."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over (``reason``: logout, eof, bye, error); flush and close."""

    reason: str


class _Paused:
    def __repr__(self) -> str:
        return "PAUSED"


PAUSED: Final = _Paused()
"""A command is being executed: send its tagged completion before asking for more."""

Event = CommandReceived | IdleDone | StartTLSRequested | CompressionStarted | ConnectionClosed


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """What the server offers. ``plaintext_auth`` allows LOGIN/AUTHENTICATE without TLS
    (tests, loopback only); ``tls_available`` means a certificate exists for STARTTLS."""

    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    sasl_mechanisms: tuple[str, ...] = ("PLAIN",)
    tls_available: bool = True
    plaintext_auth: bool = False
    limits: Limits = field(default_factory=Limits)
    server_id: tuple[tuple[str, str], ...] = (("name", "Postvern"), ("version", __version__))
    max_bad_commands: int = MAX_BAD_COMMANDS


@functools.lru_cache(maxsize=16)
def _advertised(capabilities: tuple[str, ...]) -> frozenset[str]:
    """One set per capability list, shared by every connection (1 KiB each otherwise)."""
    return frozenset(capabilities)


@functools.lru_cache(maxsize=16)
def _advertised_upper(capabilities: tuple[str, ...]) -> frozenset[str]:
    """The same, upper-cased once for :meth:`ImapConnection.has_capability` (every command)."""
    return frozenset(cap.upper() for cap in capabilities)


@functools.lru_cache(maxsize=64)
def _capability_list(
    offered: tuple[str, ...],
    mechanisms: tuple[str, ...],
    append_limit: int,
    state: tuple[bool, bool, bool, bool],
) -> tuple[str, ...]:
    """What :meth:`ImapConnection.capabilities` answers; the same few lists for every
    connection, built once (each connection asks twice: greeting and login). ``state``:
    not authenticated, STARTTLS possible, authentication allowed, compression on."""
    pre_auth, starttls, auth, deflate = state
    if pre_auth:
        caps = [cap for cap in offered if cap in _PRE_AUTH_CAPABILITIES]
        if starttls:
            caps.append("STARTTLS")
        if auth:
            caps += [f"AUTH={m}" for m in mechanisms]
        else:
            caps.append("LOGINDISABLED")  # RFC 9051 §6.2.3
        return tuple(caps)
    caps = []
    for cap in offered:
        if cap == "APPENDLIMIT":
            caps.append(f"APPENDLIMIT={append_limit}")
        elif cap == "SASL-IR" or (cap == "COMPRESS=DEFLATE" and deflate):
            continue
        else:
            caps.append(cap)
    return tuple(caps)


class ImapConnection:
    """One client connection, server side. See the module docstring for the loop."""

    def __init__(self, config: ProtocolConfig | None = None, *, tls_active: bool = False) -> None:
        self.config = config or ProtocolConfig()
        self.state = ConnectionState.NOT_AUTHENTICATED
        self.tls_active = tls_active
        self.enabled: set[str] = set()
        self.selected_read_only = False
        self.client_id: tuple[tuple[str, str | None], ...] | None = None
        # The tag of the selected-state command that enabled CONDSTORE by using it, until
        # the session has answered it (see _note_condstore).
        self.condstore_enabling_tag: str | None = None
        self.bad_commands = 0
        self._advertised = _advertised(self.config.capabilities)
        self._framer = CommandFramer(
            FramingLimits.from_config(self.config.limits), self._non_sync_mode()
        )
        self._events: deque[Event] = deque()
        self._out = bytearray()
        self._deflate: DeflateStream | None = None
        self._current: c.Command | None = None
        self._sasl_tag: str | None = None
        self._idle_tag: str | None = None
        self._eof = False
        self._close_reason: str | None = None
        self._close_reported = False

    # -- what the session reads -------------------------------------------------------------

    @property
    def utf8_names(self) -> bool:
        """Mailbox names are UTF-8 on the wire (IMAP4rev2 or UTF8=ACCEPT enabled)."""
        return bool(self.enabled & {"IMAP4rev2", "UTF8=ACCEPT"})

    @property
    def rev2(self) -> bool:
        """The client enabled IMAP4rev2 (ESEARCH replies, no RECENT, RFC 9051 semantics)."""
        return "IMAP4rev2" in self.enabled

    @property
    def condstore_enabled(self) -> bool:
        return "CONDSTORE" in self.enabled

    @property
    def qresync_enabled(self) -> bool:
        return "QRESYNC" in self.enabled

    @property
    def compression_active(self) -> bool:
        return self._deflate is not None

    @property
    def current_command(self) -> c.Command | None:
        return self._current

    @property
    def pending_input(self) -> int:
        """Octets received and not yet turned into commands."""
        held = self._framer.buffered
        return held + (self._deflate.buffered if self._deflate else 0)

    @property
    def wire_context(self) -> WireContext:
        return WireContext(utf8=self.utf8_names)

    def has_capability(self, name: str) -> bool:
        """Advertised by configuration (a "THREAD=" style prefix matches any value)."""
        if name.endswith("="):
            return any(cap.upper().startswith(name.upper()) for cap in self._advertised)
        return name.upper() in _advertised_upper(self.config.capabilities)

    def capabilities(self, state: ConnectionState | None = None) -> list[str]:
        """The CAPABILITY list for the current state, or for ``state`` (RFC 9051 §6.1.1).

        A LOGIN/AUTHENTICATE OK carries the list of the state it leads to:
        ``ResponseCode.capability(conn.capabilities(ConnectionState.AUTHENTICATED))``.
        """
        config = self.config
        state_now = (
            (state or self.state) is _NA,
            config.tls_available and not self.tls_active,
            self._auth_allowed,
            self._deflate is not None,
        )
        return list(
            _capability_list(
                config.capabilities,
                config.sasl_mechanisms,
                config.limits.imap_literal,
                state_now,
            )
        )
        caps = []
        for cap in self.config.capabilities:
            if cap == "APPENDLIMIT":
                caps.append(f"APPENDLIMIT={self.config.limits.imap_literal}")
            elif cap == "SASL-IR" or (cap == "COMPRESS=DEFLATE" and self._deflate):
                continue
            else:
                caps.append(cap)
        return caps

    # -- input ------------------------------------------------------------------------------

    def greeting(self, text: str = "Postvern IMAP ready", *, preauth: bool = False) -> None:
        """Queue the server greeting (RFC 9051 §7.1.1/§7.1.4)."""
        if preauth:
            self._set_state(_AUTH)
        status = Status.PREAUTH if preauth else Status.OK
        self._write(Condition(status, text, ResponseCode.capability(self.capabilities())))

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` means the client closed its side."""
        if self.state is ConnectionState.LOGOUT:
            return
        if not data:
            self._eof = True
        elif self._deflate is not None:
            self._deflate.feed(data)
        else:
            self._framer.receive(data)

    def next_event(self) -> Event | NeedData | _Paused:
        """The next thing the session must act on, NEED_DATA, or PAUSED."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.state is ConnectionState.LOGOUT:
                if not self._close_reported:
                    self._close_reported = True
                    return ConnectionClosed(self._close_reason or "logout")
                return NEED_DATA
            if self._current is not None and self._idle_tag is None:
                return PAUSED
            frame = self._framer.next_event()
            if frame is NEED_DATA:
                if self._inflate_more():
                    continue
                if self._eof:
                    self._close("eof")
                    continue
                return NEED_DATA
            if isinstance(frame, LiteralAnnounced):
                self._on_literal(frame)
            elif isinstance(frame, FramingError):
                self._on_framing_error(frame)
            elif isinstance(frame, RawCommand):
                event = self._on_command(frame)
                if event is not None:
                    return event

    def _inflate_more(self) -> bool:
        if self._deflate is None or not self._deflate.has_input():
            return False
        try:
            self._framer.receive(self._deflate.inflate())
        except CompressionError as e:
            self._bye(f"compression error: {e}", "error")
        return True

    # -- output -----------------------------------------------------------------------------

    def send(self, response: Response) -> None:
        """Queue a response from the session; a Completion ends the current command."""
        if self.state is ConnectionState.LOGOUT:
            return
        if isinstance(response, Completion):
            current = self._current
            if current is None or response.tag != current.tag:
                raise LocalProtocolError(f"no command with tag {response.tag!r} is in progress")
            self._finish(current, response)
        elif isinstance(response, Condition) and response.status is Status.BYE:
            self._write(response)
            self._close("bye")
            return
        self._write(response)

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call (compressed if active)."""
        if self._deflate is not None:
            self._out += self._deflate.flush()
        data = bytes(self._out)
        self._out.clear()
        return data

    def take_pending_input(self) -> bytes:
        """Input received and not yet framed, taken out: a proxy that hands the connection to
        another server after LOGIN passes on what the client pipelined (cluster/proxy.py)."""
        return self._framer.take_unprocessed()

    def tls_established(self) -> None:
        """The session finished the STARTTLS handshake."""
        self.tls_active = True

    def _write(self, response: Response) -> None:
        data = response.to_bytes(self.wire_context)
        self._out += self._deflate.compress(data) if self._deflate else data

    # -- state ------------------------------------------------------------------------------

    @property
    def _auth_allowed(self) -> bool:
        return self.tls_active or self.config.plaintext_auth

    def _non_sync_mode(self) -> NonSyncLiterals:
        if "LITERAL+" in self._advertised:
            return NonSyncLiterals.LITERAL_PLUS
        if "LITERAL-" in self._advertised or "IMAP4rev2" in self._advertised:
            return NonSyncLiterals.LITERAL_MINUS  # RFC 9051 includes LITERAL-
        return NonSyncLiterals.REFUSED

    def _set_state(self, state: ConnectionState) -> None:
        self.state = state
        self._framer.authenticated = state in _AUTHED
        if state is not _SEL:
            self.selected_read_only = False

    def _finish(self, command: c.Command, completion: Completion) -> None:
        """A tagged completion was sent: apply its effect on the state (RFC 9051 §3)."""
        self._current = None
        if self._idle_tag is not None:  # the session ended IDLE itself
            self._idle_tag = None
            self._framer.plain_lines = False
        ok = completion.status is Status.OK
        if isinstance(command, c.Login | c.Authenticate) and ok:
            self._set_state(_AUTH)
        elif isinstance(command, c.Select):
            if ok:
                self._set_state(_SEL)
                code = completion.code.name if completion.code else None
                self.selected_read_only = command.read_only or code == Code.READ_ONLY
            elif self.state is _SEL:
                self._set_state(_AUTH)  # RFC 9051 §6.3.2: a failed SELECT deselects
        elif isinstance(command, c.Close | c.Unselect) and ok:
            self._set_state(_AUTH)

    def _close(self, reason: str) -> None:
        self.state = ConnectionState.LOGOUT
        self._close_reason = self._close_reason or reason
        self._framer.close()

    def _bye(self, text: str, reason: str) -> None:
        self._write(Condition(Status.BYE, text))
        self._close(reason)

    # -- framing events ---------------------------------------------------------------------

    def _on_literal(self, frame: LiteralAnnounced) -> None:
        head = split_head(frame.head)
        refusal = self._refusal(head)
        if refusal is None and frame.binary:
            if head.name != "APPEND":
                refusal = CommandError("literal8 is only allowed in APPEND")
            elif not self.has_capability("BINARY"):
                refusal = CommandError("literal8 needs BINARY, which is not available")
        if refusal is not None:
            self._framer.reject_literal(refusal.text, status=refusal.status, code=refusal.code)
            return
        self._framer.accept_literal()
        if frame.synchronizing:
            self._write(Continuation("Ready for literal data"))

    def _on_framing_error(self, error: FramingError) -> None:
        if self._sasl_tag is not None or self._idle_tag is not None:
            self._abort_continuation(error.text)
            return
        if error.fatal:
            self._bye(error.text, "error")
            return
        self._error(split_head(error.head).tag, error.status, error.text, error.code)

    def _error(
        self,
        tag: str | None,
        status: str,
        text: str,
        code: tuple[str, str | None] | None = None,
    ) -> None:
        response_code = ResponseCode.from_pair(code) if code else None
        if tag is None:
            self._write(Condition(Status.BAD, text, response_code))
        else:
            self._write(Completion(tag, Status(status), text, response_code))
        if status == "BAD":
            self.bad_commands += 1
            if self.bad_commands >= self.config.max_bad_commands:
                self._bye("too many invalid commands", "error")

    def _refusal(self, head: Head) -> CommandError | None:
        """Why a command may not run here, judged from its name alone (before any argument)."""
        if head.tag is None:
            return CommandError("invalid tag")
        name = head.name
        if name is None:
            return CommandError("missing command")
        if name not in COMMAND_NAMES:
            return CommandError(f"unknown command {name[:32]}")
        required = _REQUIRED_CAPABILITY.get(name)
        if required is not None and not self.has_capability(required):
            return CommandError(f"unknown command {name}")
        if name == "STARTTLS" and not self.config.tls_available:
            return CommandError("unknown command STARTTLS")
        allowed = _ALLOWED_STATES.get(name, frozenset({_SEL}))
        if self.state not in allowed:
            return CommandError(_state_text(name, self.state))
        if name in ("LOGIN", "AUTHENTICATE") and not self._auth_allowed:
            # RFC 9051 §6.2.3 LOGINDISABLED / §7.1 PRIVACYREQUIRED.
            return CommandError(
                "authentication needs TLS: use STARTTLS first",
                status="NO",
                code=(Code.PRIVACYREQUIRED, None),
            )
        return None

    # -- commands ---------------------------------------------------------------------------

    def _on_command(self, raw: RawCommand) -> Event | None:
        if self._sasl_tag is not None:
            return self._on_sasl_line(raw.lines[0])
        if self._idle_tag is not None:
            return self._on_idle_line(raw.lines[0])
        head = split_head(raw.lines[0])
        if raw.lines == [b""]:
            self._error(None, "BAD", "empty command line")
            return None
        refusal = self._refusal(head)
        if refusal is None:
            try:
                command = parse_command(raw, self._grammar_context())
                refusal = self._extension_problem(command)
            except CommandError as e:
                refusal = e
        if refusal is not None:
            self._error(head.tag, refusal.status, refusal.text, refusal.code)
            return None
        self.bad_commands = 0
        self._note_condstore(command)
        return self._dispatch(command)

    def _grammar_context(self) -> GrammarContext:
        return GrammarContext(
            utf8_names=self.utf8_names,
            qresync=self.qresync_enabled,
            max_search_depth=self.config.limits.search_depth,
        )

    def _dispatch(self, command: c.Command) -> Event | None:
        tag = command.tag
        if isinstance(command, c.Capability):
            self._write(CapabilityData(self.capabilities()))
            self._write(Completion.ok(tag, "CAPABILITY completed"))
        elif isinstance(command, c.Logout):
            self._write(Condition(Status.BYE, "logging out"))
            self._write(Completion.ok(tag, "LOGOUT completed"))
            self._close("logout")
        elif isinstance(command, c.Id):
            self.client_id = command.parameters
            self._write(IdData(self.config.server_id))
            self._write(Completion.ok(tag, "ID completed"))
        elif isinstance(command, c.Namespace):
            self._write(NamespaceData(PERSONAL_NAMESPACE))
            self._write(Completion.ok(tag, "NAMESPACE completed"))
        elif isinstance(command, c.Enable):
            self._enable(command)
        elif isinstance(command, c.SetQuota):
            # RFC 9208 §4.3: quotas are set by the administrator, not over IMAP.
            self._write(Completion.no(tag, "quotas are set by the administrator", _code("NOPERM")))
        elif isinstance(command, c.StartTLS):
            return self._start_tls(command)
        elif isinstance(command, c.Compress):
            return self._compress(command)
        elif isinstance(command, c.Authenticate):
            return self._authenticate(command)
        elif isinstance(command, c.Idle):
            self._idle_tag = tag
            self._framer.plain_lines = True
            self._current = command
            self._write(Continuation("idling"))
            return CommandReceived(command)
        else:
            self._current = command
            return CommandReceived(command)
        return None

    def _enable(self, command: c.Enable) -> None:
        newly: list[str] = []
        for name in command.capabilities:
            canonical = _ENABLEABLE.get(name.upper())
            # RFC 5161 §3.1: unknown or unadvertised names are ignored, not an error.
            if canonical is None or not self.has_capability(canonical):
                continue
            if canonical not in self.enabled and canonical not in newly:
                newly.append(canonical)
        self.enabled.update(newly)
        if "QRESYNC" in self.enabled:
            self.enabled.add("CONDSTORE")  # RFC 7162 §3.2.3: QRESYNC implies CONDSTORE
        self._write(EnabledData(newly))
        self._write(Completion.ok(command.tag, "ENABLE completed"))

    def _start_tls(self, command: c.StartTLS) -> Event | None:
        if self.tls_active:
            self._error(command.tag, "BAD", "TLS is already active")
            return None
        self._write(Completion.ok(command.tag, "begin TLS negotiation now"))
        # RFC 9051 §6.2.1 (and CVE-2011-0411): anything the client pipelined after STARTTLS
        # arrived in plaintext and must not be executed inside the TLS session.
        self._framer.take_unprocessed()
        return StartTLSRequested()

    def _compress(self, command: c.Compress) -> Event | None:
        if command.mechanism != "DEFLATE":
            self._error(command.tag, "BAD", "unknown compression mechanism")
            return None
        if self._deflate is not None:
            self._write(
                Completion.no(command.tag, "already compressing", _code("COMPRESSIONACTIVE"))
            )
            return None
        self._write(Completion.ok(command.tag, "DEFLATE active"))
        self._deflate = DeflateStream()
        # RFC 4978 §3: the client starts compressing right after the command's CRLF.
        self._deflate.feed(self._framer.take_unprocessed())
        return CompressionStarted()

    # -- AUTHENTICATE and IDLE ---------------------------------------------------------------

    def _authenticate(self, command: c.Authenticate) -> Event | None:
        tag = command.tag
        if command.mechanism not in self.config.sasl_mechanisms:
            self._write(Completion.no(tag, "unsupported authentication mechanism"))
            return None
        if command.initial_response is not None:
            if not self.has_capability("SASL-IR"):
                self._error(tag, "BAD", "initial response without SASL-IR")
                return None
            return self._plain(tag, command.initial_response)
        self._sasl_tag = tag
        self._framer.plain_lines = True
        self._write(Continuation())
        return None

    def _on_sasl_line(self, line: bytes) -> Event | None:
        tag = self._sasl_tag
        assert tag is not None
        self._end_continuation()
        if line.strip() == b"*":
            # RFC 9051 §6.2.2: a cancelled exchange is answered with a tagged BAD.
            self._error(tag, "BAD", "authentication cancelled")
            return None
        try:
            data = decode_sasl(line.strip())
        except CommandError as e:
            self._error(tag, "BAD", e.text)
            return None
        return self._plain(tag, data)

    def _plain(self, tag: str, data: bytes) -> Event | None:
        """RFC 4616 §2: message = [authzid] NUL authcid NUL passwd, all UTF-8."""
        parts = data.split(b"\x00")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            self._error(tag, "BAD", "malformed PLAIN response")
            return None
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            self._error(tag, "BAD", "PLAIN response is not UTF-8")
            return None
        credentials = c.PlainCredentials(authzid=authzid, authcid=authcid, password=password)
        command = c.Authenticate(tag=tag, mechanism="PLAIN", credentials=credentials)
        self._current = command
        return CommandReceived(command)

    def _on_idle_line(self, line: bytes) -> Event:
        tag = self._idle_tag
        assert tag is not None
        self._end_continuation()
        if line.strip().upper() == b"DONE":
            return IdleDone(tag)
        # RFC 9051 §6.3.13: only DONE may follow IDLE.
        self._current = None
        self._error(tag, "BAD", "expected DONE")
        return IdleDone(tag, aborted=True)

    def _end_continuation(self) -> None:
        self._sasl_tag = None
        self._idle_tag = None
        self._framer.plain_lines = False

    def _abort_continuation(self, text: str) -> None:
        tag = self._sasl_tag or self._idle_tag
        was_idle = self._idle_tag is not None
        self._end_continuation()
        if was_idle:
            self._current = None
            assert tag is not None
            self._events.append(IdleDone(tag, aborted=True))
        self._error(tag, "BAD", text)

    # -- extension checks -------------------------------------------------------------------

    def _extension_problem(self, command: c.Command) -> CommandError | None:
        missing = next((cap for cap in _needed_capabilities(command) if not self._has(cap)), None)
        if missing is not None:
            return CommandError(f"{command.name} uses {missing}, which is not available")
        if isinstance(command, c.Append) and any(m.utf8 for m in command.messages):
            if "UTF8=ACCEPT" not in self.enabled:
                return CommandError("APPEND UTF8 needs ENABLE UTF8=ACCEPT")
        return None

    def _has(self, capability: str) -> bool:
        return self.has_capability(capability)

    def _note_condstore(self, command: c.Command) -> None:
        """RFC 7162 §3.1: using a CONDSTORE feature enables CONDSTORE for the session."""
        if self.has_capability("CONDSTORE") and "CONDSTORE" in _needed_capabilities(command):
            if "CONDSTORE" not in self.enabled and self.state is _SEL:
                # RFC 7162 §3.1: this command's tagged OK must carry [HIGHESTMODSEQ] (a
                # SELECT (CONDSTORE) announces it among the SELECT data instead).
                self.condstore_enabling_tag = command.tag
            self.enabled.add("CONDSTORE")


def _code(name: str) -> ResponseCode:
    return ResponseCode(name)


def _state_text(name: str, state: ConnectionState) -> str:
    allowed = _ALLOWED_STATES.get(name, frozenset({_SEL}))
    if state is _NA:
        return f"{name} needs authentication: log in first"
    if allowed == {_NA}:
        return f"{name} is not valid after authentication"
    if allowed == {_AUTH}:
        return f"{name} is only valid before a mailbox is selected"
    return f"{name} needs a selected mailbox"


def _needed_capabilities(command: c.Command) -> list[str]:
    """Extensions a command's arguments rely on (the command name is checked separately)."""
    needs: list[str] = []
    if isinstance(command, c.Select) and command.condstore:
        needs.append("CONDSTORE")
    elif isinstance(command, c.Fetch):
        if command.changed_since is not None or any(i.name == "MODSEQ" for i in command.items):
            needs.append("CONDSTORE")
        if any(i.name.startswith("BINARY") for i in command.items):
            needs.append("BINARY")
        if command.sequence.saved:
            needs.append("SEARCHRES")
    elif isinstance(command, c.Store | c.Copy | c.Move) and command.sequence.saved:
        needs.append("SEARCHRES")
    if isinstance(command, c.Store) and command.unchanged_since is not None:
        needs.append("CONDSTORE")
    elif isinstance(command, c.Search | c.Sort | c.Thread):
        needs += _search_needs(command)
    elif isinstance(command, c.List):
        if command.extended:
            needs.append("LIST-EXTENDED")
        if command.return_status is not None:
            needs.append("LIST-STATUS")
        if "SPECIAL-USE" in command.selection or command.return_special_use:
            needs.append("SPECIAL-USE")
    elif isinstance(command, c.Create) and command.special_use:
        needs.append("CREATE-SPECIAL-USE")
    elif isinstance(command, c.Append):
        if len(command.messages) > 1:
            needs.append("MULTIAPPEND")
        if any(m.binary for m in command.messages):
            needs.append("BINARY")
    elif isinstance(command, c.Status):
        needs += _status_needs(command.items)
    return needs


def _search_needs(command: c.Search | c.Sort | c.Thread) -> list[str]:
    needs: list[str] = []
    criteria = command.criteria if isinstance(command, c.Search) else command.search
    if isinstance(command, c.Search) and command.return_options is not None:
        needs.append("ESEARCH")
        if "SAVE" in command.return_options:
            needs.append("SEARCHRES")
    if isinstance(command, c.Thread):
        needs.append(f"THREAD={command.algorithm}")
    for key in walk(criteria):
        if isinstance(key, ModSeqTest):
            needs.append("CONDSTORE")
        elif isinstance(key, SequenceTest) and key.sequence.saved:
            needs.append("SEARCHRES")
    return needs


def _status_needs(items: tuple[str, ...]) -> list[str]:
    extension = {"HIGHESTMODSEQ": "CONDSTORE", "SIZE": "STATUS=SIZE", "APPENDLIMIT": "APPENDLIMIT"}
    return [extension[item] for item in items if item in extension]
