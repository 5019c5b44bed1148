"""POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595) and SASL PLAIN (RFC 5034), sans-I/O.

POP3 lets a client download a maildrop and delete what it has taken. :class:`POP3Connection`
is fed the client's bytes and hands back one event per command, in the manner of h11: it
parses, keeps the AUTHORIZATION / TRANSACTION / UPDATE state and the deletion marks, and
answers by itself whatever the maildrop snapshot can answer. What needs the outside world
(credentials, TLS, a message's bytes, committing deletions) becomes an event that the caller
works on and answers; only then are further pipelined commands read.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

# RFC 2449 §4 bounds a command at 255 octets, but an AUTH PLAIN initial response for a long
# address and password goes beyond that (RFC 5034 §4 lets it). Dovecot reads up to 2048
# octets and disconnects a client that sends more; so do we. The bound is enforced on the
# buffer, so a gigabyte without a line feed costs 2 KiB.
MAX_LINE = 2048
# Dovecot's CLIENT_MAX_BAD_COMMANDS: a client that keeps sending refused commands in a row is
# broken or probing, and answering it forever only spends our time.
MAX_BAD_COMMANDS = 20
# Dovecot drops a connection after three failed logins; the abuse module counts failures
# across connections, this keeps one connection from guessing at leisure.
MAX_AUTH_FAILURES = 3
# Message numbers and TOP line counts: ten digits cover any maildrop (and any "all lines"
# request) and keep int() away from a 2000-digit argument.
MAX_NUMBER_DIGITS = 10
# RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
_UNIQUE_ID = re.compile(r"[\x21-\x7e]{1,70}\Z")

GREETING = "+OK Postvern ready."
# What the listener says when it turns a connection away before any session starts.
BUSY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
PLAINTEXT_REFUSED = (
    "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)


class ProtocolMisuse(Exception):
    """The caller used the core out of turn: a bug in the session, never the client's doing."""


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"  # RFC 1939 §4: until the client has logged in
    TRANSACTION = "TRANSACTION"  # §5: reading and marking messages
    UPDATE = "UPDATE"  # §6: after QUIT, while the deletions are committed
    CLOSED = "CLOSED"  # nothing more is read; send what is left and close


class ResponseCode(enum.Enum):
    """Extended response codes (RFC 2449 §8, RFC 3206) a caller may refuse a login with."""

    AUTH = "AUTH"  # the credentials are wrong: ask the user, do not just retry
    LOGIN_DELAY = "LOGIN-DELAY"  # too many attempts: try again later, credentials may be fine
    IN_USE = "IN-USE"  # the maildrop is locked by another session
    SYS_TEMP = "SYS/TEMP"  # a temporary server failure: try again later


_REFUSAL_TEXT = {
    ResponseCode.AUTH: "Authentication failed.",
    ResponseCode.LOGIN_DELAY: "Too many login attempts, try again later.",
    ResponseCode.IN_USE: "Mailbox is in use by another session.",
    ResponseCode.SYS_TEMP: "Temporary server failure, try again later.",
}


class NeedData:
    """No complete command is buffered: read more bytes and call ``receive_data``."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class MaildropEntry:
    """One message of the snapshot taken at login; its position + 1 is its message number."""

    uid: int
    size: int
    unique_id: str  # RFC 1939 §7 UIDL: stable across sessions


@dataclass(frozen=True, slots=True)
class Answered:
    """The core answered the command by itself: send ``data_to_send()``."""

    command: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check these credentials; answer with ``accept_login()`` or ``refuse_login()``."""

    mechanism: str  # "USER" (USER/PASS) or "PLAIN" (AUTH PLAIN)
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Send ``data_to_send()``, run the TLS handshake, then call ``tls_started()``."""


@dataclass(frozen=True, slots=True)
class Retrieve:
    """RETR (``lines`` is None) or TOP: answer with ``send_message()`` or ``message_missing()``."""

    number: int
    uid: int
    lines: int | None


@dataclass(frozen=True, slots=True)
class Update:
    """QUIT in TRANSACTION (RFC 1939 §6): commit, then call ``update_finished()``.

    ``deleted`` are the UIDs marked with DELE; ``seen`` the UIDs retrieved in full with RETR
    that are not being deleted.
    """

    deleted: tuple[int, ...]
    seen: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Closed:
    """The conversation is over: send ``data_to_send()`` and close the connection."""

    reason: str


Event = Answered | Authenticate | StartTLS | Retrieve | Update | Closed
_E = TypeVar("_E", Authenticate, StartTLS, Retrieve, Update)
_Handler = Callable[["POP3Connection", bytes], Event]


class POP3Connection:
    """The server side of one POP3 conversation.

    Feed bytes with :meth:`receive_data` (``b""`` at end of input) and call
    :meth:`next_event` until it returns :data:`NEED_DATA`; after each event send what
    :meth:`data_to_send` returns. Events other than :class:`Answered` and :class:`Closed`
    must be answered (the method is named in each) before the next call to ``next_event``:
    that is how pipelined commands (RFC 2449 §6.6) stay answered in order.

    Credentials are refused until TLS is active (RFC 2595 §2.1), and CAPA hides USER and
    SASL until then. Bytes that follow STLS, whether in the same read or any read before
    :meth:`tls_started`, are discarded: they came in plaintext and must not run as if they
    had arrived inside TLS (the STARTTLS command injection, CVE-2011-0411).
    """

    def __init__(
        self, *, tls_active: bool, tls_available: bool, implementation: str | None = None
    ) -> None:
        self.state = State.AUTHORIZATION
        self.tls_active = tls_active
        self._tls_available = tls_available and not tls_active
        self._implementation = implementation
        self._buffer = bytearray()
        self._eof = False
        self._out: list[bytes] = [f"{GREETING}\r\n".encode()]
        self._pending: Event | None = None
        self._username: str | None = None
        self._awaiting_sasl = False
        self._bad_commands = 0
        self._auth_failures = 0
        self._closed_reason = ""
        self._maildrop: tuple[MaildropEntry, ...] = ()
        self._deleted: set[int] = set()  # message numbers
        self._retrieved: set[int] = set()  # message numbers sent in full by RETR

    # -- bytes in, bytes out ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` means the client closed its side."""
        if self.state is State.CLOSED or isinstance(self._pending, StartTLS):
            return
        if not data:
            self._eof = True
            return
        self._buffer += data
        if len(self._buffer) > MAX_LINE and self._buffer.find(b"\n", 0, MAX_LINE) == -1:
            # The first line is already too long: keep only enough to know it.
            del self._buffer[MAX_LINE:]

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def retrieved_uids(self) -> tuple[int, ...]:
        """UIDs sent in full by RETR (they become \\Seen), whether marked deleted or not."""
        return tuple(self._maildrop[n - 1].uid for n in sorted(self._retrieved))

    # -- reading commands ---------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        if self._pending is not None:
            raise ProtocolMisuse(f"{type(self._pending).__name__} has not been answered")
        if self.state is State.CLOSED:
            return Closed(self._closed_reason)
        end = self._buffer.find(b"\n", 0, MAX_LINE)
        if end == -1:
            if len(self._buffer) >= MAX_LINE:
                return self._close("-ERR Input line too long.", "line too long")
            if self._eof:
                return self._close(None, "connection closed by client")
            return NEED_DATA
        line = bytes(self._buffer[:end]).removesuffix(b"\r")
        del self._buffer[: end + 1]
        if self._awaiting_sasl:
            self._awaiting_sasl = False
            return self._sasl_response(line)
        return self._command(line)

    def _command(self, line: bytes) -> Event:
        verb, _, rest = line.partition(b" ")
        name = verb.decode("ascii", "replace").upper()
        if self.state is State.AUTHORIZATION:
            handler = self._AUTHORIZATION.get(name)
        else:
            handler = self._TRANSACTION.get(name)
        if handler is None:
            if name in self._AUTHORIZATION or name in self._TRANSACTION:
                return self._refuse(name, "-ERR Command not valid in this state.")
            return self._refuse("", "-ERR Unknown command.")
        return handler(self, rest)

    # -- replies ------------------------------------------------------------------------

    def _reply(self, line: str) -> None:
        self._out.append(f"{line}\r\n".encode())

    def _multiline(self, status: str, lines: Iterable[str]) -> None:
        # Every line given here starts with a digit or a capability name, never with the
        # termination octet, so no byte-stuffing is needed (RFC 1939 §3).
        body = "".join(f"{line}\r\n" for line in lines)
        self._out.append(f"{status}\r\n{body}.\r\n".encode())

    def _answer(self, command: str, line: str) -> Answered:
        self._bad_commands = 0
        self._reply(line)
        return Answered(command)

    def _refuse(self, command: str, line: str) -> Event:
        self._reply(line)
        self._bad_commands += 1
        if self._bad_commands > MAX_BAD_COMMANDS:
            return self._close("-ERR Too many bad commands.", "too many bad commands")
        return Answered(command)

    def _close(self, line: str | None, reason: str) -> Closed:
        if line is not None:
            self._reply(line)
        self.state = State.CLOSED
        self._closed_reason = reason
        self._pending = None
        self._buffer.clear()
        return Closed(reason)

    def _await(self, event: Event) -> Event:
        self._bad_commands = 0
        self._pending = event
        return event

    # -- AUTHORIZATION (RFC 1939 §4, RFC 2595, RFC 5034) -------------------------------------

    def _capa(self, rest: bytes) -> Event:
        # RFC 2449 §5: what is announced in AUTHORIZATION is announced in both states; USER
        # and SASL appear only once credentials may be sent, which is only over TLS.
        lines = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.tls_active:
            lines += ["USER", "SASL PLAIN"]
        elif self._tls_available:
            lines.append("STLS")
        if self._implementation:
            lines.append(f"IMPLEMENTATION {self._implementation}")
        self._bad_commands = 0
        self._multiline("+OK Capability list follows.", lines)
        return Answered("CAPA")

    def _user(self, rest: bytes) -> Event:
        if not self.tls_active:
            return self._refuse("USER", PLAINTEXT_REFUSED)
        name = _text(rest.strip(b" "))
        if not name:
            return self._refuse("USER", "-ERR Invalid username.")
        self._username = name
        return self._answer("USER", "+OK")

    def _pass(self, rest: bytes) -> Event:
        if not self.tls_active:
            return self._refuse("PASS", PLAINTEXT_REFUSED)
        if self._username is None:
            return self._refuse("PASS", "-ERR No username given.")
        # RFC 1939 §7: the server may treat spaces in the argument as part of the password.
        password = _text(rest)
        username, self._username = self._username, None
        if not password:
            return self._refuse("PASS", "-ERR Invalid password.")
        return self._await(Authenticate("USER", username, password))

    def _auth(self, rest: bytes) -> Event:
        args = rest.split()
        if not args:
            # The RFC 1734 form that some clients still send to list mechanisms.
            self._bad_commands = 0
            self._multiline("+OK", ["PLAIN"] if self.tls_active else [])
            return Answered("AUTH")
        if not self.tls_active:
            return self._refuse("AUTH", PLAINTEXT_REFUSED)
        if args[0].upper() != b"PLAIN":
            return self._refuse("AUTH", "-ERR Unsupported authentication mechanism.")
        if len(args) > 2:
            return self._refuse("AUTH", "-ERR Invalid arguments.")
        if len(args) == 2:
            return self._sasl_plain(args[1])
        # RFC 5034 §4: no initial response, so an empty challenge asks for it.
        self._awaiting_sasl = True
        self._reply("+ ")
        return Answered("AUTH")

    def _sasl_response(self, line: bytes) -> Event:
        if line.strip() == b"*":
            # RFC 5034 §4: a cancelled exchange MUST be rejected with -ERR.
            return self._refuse("AUTH", "-ERR Authentication cancelled.")
        return self._sasl_plain(line.strip())

    def _sasl_plain(self, response: bytes) -> Event:
        # RFC 5034 §4: "=" is an initial response of zero length.
        try:
            message = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            return self._refuse("AUTH", "-ERR Invalid base64 data.")
        credentials = _plain_credentials(message)
        if credentials is None:
            return self._refuse("AUTH", "-ERR [AUTH] Malformed PLAIN credentials.")
        authzid, authcid, password = credentials
        # RFC 4616 §2: acting as someone else is not offered, so an authorization identity
        # must be empty or name the authenticating user.
        if authzid and authzid != authcid:
            return self._refuse("AUTH", "-ERR [AUTH] Authorization identity not permitted.")
        return self._await(Authenticate("PLAIN", authcid, password))

    def _apop(self, rest: bytes) -> Event:
        # APOP needs the plaintext password on the server; the mailbox key slots never hold it.
        return self._refuse("APOP", "-ERR APOP is not supported.")

    def _stls(self, rest: bytes) -> Event:
        if self.tls_active:
            return self._refuse("STLS", "-ERR TLS is already active.")
        if not self._tls_available:
            return self._refuse("STLS", "-ERR TLS is not available.")
        if rest.strip():
            return self._refuse("STLS", "-ERR STLS takes no arguments.")
        # Whatever was pipelined behind STLS arrived in plaintext: drop it (RFC 2595 §4
        # "the client MUST discard"; the server side of CVE-2011-0411).
        self._buffer.clear()
        self._username = None
        self._reply("+OK Begin TLS negotiation now.")
        return self._await(StartTLS())

    def _quit_authorization(self, rest: bytes) -> Event:
        return self._close("+OK Logging out.", "quit")

    # -- TRANSACTION (RFC 1939 §5) -------------------------------------------------------

    def _live(self) -> list[tuple[int, MaildropEntry]]:
        return [
            (n, entry) for n, entry in enumerate(self._maildrop, start=1) if n not in self._deleted
        ]

    def _totals(self) -> tuple[int, int]:
        live = self._live()
        return len(live), sum(entry.size for _, entry in live)

    def _message(self, argument: bytes) -> tuple[int, MaildropEntry] | str:
        number = _number(argument)
        if number is None or not 1 <= number <= len(self._maildrop):
            return "-ERR No such message."
        if number in self._deleted:
            return f"-ERR Message {number} is marked deleted."
        return number, self._maildrop[number - 1]

    def _stat(self, rest: bytes) -> Event:
        count, size = self._totals()
        return self._answer("STAT", f"+OK {count} {size}")

    def _list(self, rest: bytes) -> Event:
        return self._scan_listing("LIST", rest, lambda entry: str(entry.size))

    def _uidl(self, rest: bytes) -> Event:
        return self._scan_listing("UIDL", rest, lambda entry: entry.unique_id)

    def _scan_listing(
        self, command: str, rest: bytes, column: Callable[[MaildropEntry], str]
    ) -> Event:
        args = rest.split()
        if len(args) > 1:
            return self._refuse(command, "-ERR Invalid arguments.")
        if args:
            found = self._message(args[0])
            if isinstance(found, str):
                return self._refuse(command, found)
            number, entry = found
            return self._answer(command, f"+OK {number} {column(entry)}")
        count, size = self._totals()
        self._bad_commands = 0
        self._multiline(
            f"+OK {count} messages ({size} octets)",
            (f"{n} {column(entry)}" for n, entry in self._live()),
        )
        return Answered(command)

    def _retr(self, rest: bytes) -> Event:
        args = rest.split()
        if len(args) != 1:
            return self._refuse("RETR", "-ERR Invalid arguments.")
        found = self._message(args[0])
        if isinstance(found, str):
            return self._refuse("RETR", found)
        number, entry = found
        return self._await(Retrieve(number, entry.uid, None))

    def _top(self, rest: bytes) -> Event:
        args = rest.split()
        if len(args) != 2:
            return self._refuse("TOP", "-ERR Invalid arguments.")
        found = self._message(args[0])
        if isinstance(found, str):
            return self._refuse("TOP", found)
        lines = _number(args[1])
        if lines is None:
            return self._refuse("TOP", "-ERR Invalid number of lines.")
        number, entry = found
        return self._await(Retrieve(number, entry.uid, lines))

    def _dele(self, rest: bytes) -> Event:
        args = rest.split()
        if len(args) != 1:
            return self._refuse("DELE", "-ERR Invalid arguments.")
        found = self._message(args[0])
        if isinstance(found, str):
            return self._refuse("DELE", found)
        number, _ = found
        self._deleted.add(number)
        return self._answer("DELE", f"+OK Message {number} deleted.")

    def _rset(self, rest: bytes) -> Event:
        self._deleted.clear()
        count, size = self._totals()
        return self._answer("RSET", f"+OK Maildrop has {count} messages ({size} octets).")

    def _noop(self, rest: bytes) -> Event:
        return self._answer("NOOP", "+OK")

    def _quit_transaction(self, rest: bytes) -> Event:
        # RFC 1939 §6: deletions happen now and only now; nothing pipelined after QUIT runs.
        self.state = State.UPDATE
        self._buffer.clear()
        deleted = tuple(self._maildrop[n - 1].uid for n in sorted(self._deleted))
        seen = tuple(self._maildrop[n - 1].uid for n in sorted(self._retrieved - self._deleted))
        return self._await(Update(deleted, seen))

    _AUTHORIZATION: ClassVar[Mapping[str, _Handler]] = {
        "CAPA": _capa,
        "USER": _user,
        "PASS": _pass,
        "AUTH": _auth,
        "APOP": _apop,
        "STLS": _stls,
        "QUIT": _quit_authorization,
    }
    _TRANSACTION: ClassVar[Mapping[str, _Handler]] = {
        "CAPA": _capa,
        "STAT": _stat,
        "LIST": _list,
        "UIDL": _uidl,
        "RETR": _retr,
        "TOP": _top,
        "DELE": _dele,
        "RSET": _rset,
        "NOOP": _noop,
        "QUIT": _quit_transaction,
    }

    # -- answers from the caller -----------------------------------------------------------

    def _take(self, kind: type[_E]) -> _E:
        event = self._pending
        if not isinstance(event, kind):
            raise ProtocolMisuse(f"no {kind.__name__} is awaiting an answer")
        self._pending = None
        return event

    def accept_login(self, maildrop: Sequence[MaildropEntry]) -> None:
        """The credentials were good; ``maildrop`` is the snapshot, in message-number order."""
        self._take(Authenticate)
        for entry in maildrop:
            if not _UNIQUE_ID.match(entry.unique_id):
                raise ProtocolMisuse("a unique-id must be 1-70 characters 0x21-0x7E")
        self._maildrop = tuple(maildrop)
        self.state = State.TRANSACTION
        self._reply("+OK Logged in.")

    def refuse_login(self, code: ResponseCode, text: str | None = None) -> None:
        self._take(Authenticate)
        self._reply(f"-ERR [{code.value}] {text or _REFUSAL_TEXT[code]}")
        if code is ResponseCode.AUTH:
            self._auth_failures += 1
            if self._auth_failures >= MAX_AUTH_FAILURES:
                self._close(None, "too many authentication failures")
        elif code is ResponseCode.LOGIN_DELAY:
            self._close(None, "login refused")

    def take_pending_input(self) -> bytes:
        """Input received and not yet read as commands, taken out: a proxy that hands the
        connection to another server after login passes it on (cluster/proxy.py)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def tls_started(self) -> None:
        self._take(StartTLS)
        # RFC 2595 §4: the session starts over inside TLS, except that STLS is gone.
        self.tls_active = True
        self._tls_available = False
        self._buffer.clear()

    def send_message(self, raw: bytes) -> None:
        """Answer RETR or TOP with the stored message (any line endings; RFC 1939 §3 framing)."""
        event = self._take(Retrieve)
        # NUL would end the text for many clients: sent as 0x80, one octet for one, as
        # Dovecot's IMAP does (postvern.imap.wire.NUL_SUBSTITUTE); the size stays the same.
        text = to_crlf(raw).replace(b"\x00", b"\x80")
        if event.lines is None:
            self._retrieved.add(event.number)
            self._out.append(f"+OK {len(text)} octets\r\n".encode())
        else:
            text = top_of(text, event.lines)
            self._out.append(b"+OK Top of message follows.\r\n")
        self._out.append(dot_stuff(text))

    def message_missing(self, code: ResponseCode | None = None) -> None:
        """The message cannot be read: gone (expunged elsewhere), or ``code`` says why."""
        event = self._take(Retrieve)
        if code is None:
            self._reply(f"-ERR Message {event.number} was removed by another session.")
        else:
            self._reply(f"-ERR [{code.value}] Cannot read message {event.number} now.")

    def update_finished(self, ok: bool) -> None:
        event = self._take(Update)
        if ok:
            self._reply(f"+OK Logging out, {len(event.deleted)} messages deleted.")
        else:
            # RFC 1939 §6: the -ERR of QUIT says some deleted messages were not removed.
            self._reply("-ERR [SYS/TEMP] Some deleted messages were not removed.")
        self._close(None, "quit")

    def idle_timeout(self) -> None:
        """RFC 1939 §3: autologout closes without entering UPDATE, so nothing is deleted."""
        if self.state is not State.CLOSED:
            self._close("-ERR Disconnected for inactivity.", "idle timeout")

    def shutdown(self) -> None:
        """The server is stopping: say so and close without entering UPDATE."""
        if self.state is not State.CLOSED:
            self._close("-ERR Server shutting down.", "server shutdown")


def _text(raw: bytes) -> str | None:
    """UTF-8 text without NUL, or None; credentials are compared as Unicode strings."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def _number(raw: bytes) -> int | None:
    if not raw.isdigit() or len(raw) > MAX_NUMBER_DIGITS:
        return None
    return int(raw)


def _plain_credentials(message: bytes) -> tuple[str, str, str] | None:
    """RFC 4616 §2: [authzid] NUL authcid NUL passwd, each UTF-8; None if malformed."""
    parts = message.split(b"\0")
    if len(parts) != 3:
        return None
    texts = [_text(part) for part in parts]
    authzid, authcid, password = texts
    if authzid is None or not authcid or not password:
        return None
    return authzid, authcid, password


# -- message framing (RFC 1939 §3, §11) ------------------------------------------------------


def to_crlf(raw: bytes) -> bytes:
    """Every line ending as CRLF (RFC 1939 §11): stored bare-LF messages are sent as CRLF."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def top_of(text: bytes, lines: int) -> bytes:
    """The header section, the blank line and the first ``lines`` body lines (RFC 1939 §7)."""
    if text.startswith(b"\r\n"):
        headers, body = b"", text[2:]
    else:
        split = text.find(b"\r\n\r\n")
        if split == -1:
            return text  # no body at all
        headers, body = text[: split + 2], text[split + 4 :]
    if lines > body.count(b"\r\n"):
        return headers + b"\r\n" + body
    end = 0
    for _ in range(lines):
        end = body.find(b"\r\n", end) + 2
    return headers + b"\r\n" + body[:end]


def dot_stuff(text: bytes) -> bytes:
    """Byte-stuff lines starting with "." and add the terminating ".CRLF" (RFC 1939 §3)."""
    if text.startswith(b"."):
        text = b"." + text
    text = text.replace(b"\r\n.", b"\r\n..")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text + b".\r\n"
