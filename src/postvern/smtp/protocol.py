"""The server side of SMTP (RFC 5321) as a sans-I/O state machine, in the manner of h11.

Feed what the client sent to :meth:`ServerConnection.receive_data`, take events from
:meth:`ServerConnection.next_event`, and answer each with :meth:`ServerConnection.send`, which
returns the bytes to write. The core frames lines and message text, keeps the order of
commands and enforces every limit before memory is spent; how to answer a well-formed request
(accept this recipient? this password?) is the caller's policy.
"""

from __future__ import annotations

import enum
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from postvern.config import Limits
from postvern.smtp import commands, replies
from postvern.smtp.commands import CommandError
from postvern.smtp.events import (
    CONNECTION_CLOSED,
    NEED_DATA,
    Auth,
    AuthResponse,
    Bdat,
    ConnectionClosed,
    Data,
    Ehlo,
    Event,
    Helo,
    Help,
    Mail,
    MessageBody,
    MessageRejected,
    NeedData,
    Noop,
    ProtocolError,
    Quit,
    Rcpt,
    Refused,
    Rset,
    StartTLS,
    Unsynchronized,
    Vrfy,
)
from postvern.smtp.replies import Reply
from postvern.smtp.sasl import SASLError, decode_response

# --- Limits: defaults, each overridable through SMTPLimits (or config.Limits) ----------------

# RFC 5321 §4.5.3.1.4 requires at least 512 octets per command line, CRLF included. Extensions
# make lines longer (SIZE, DSN's ORCPT and ENVID, SMTPUTF8 addresses), and Postfix accepts
# 2048 before it complains; 4096 leaves room for all of them while keeping a line small.
MAX_COMMAND_LINE = 4096
# RFC 4954 §4: AUTH lines, the command with its initial response and each continuation,
# may be up to 12288 octets. They get this bound even when command lines are shorter.
MAX_AUTH_LINE = 12288
# RFC 5321 §4.5.3.1.6 says text lines are at most 1000 octets, but real mail (HTML from
# careless generators, unwrapped base64) is longer. Lenient, yet bounded: one line must not
# be able to hold the buffer open.
MAX_DATA_LINE = 65536
MAX_MESSAGE_SIZE = 50 * 1024 * 1024  # advertised in EHLO as SIZE (RFC 1870)
# RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients per message.
MAX_RECIPIENTS = 100
# Protocol errors (syntax, sequence, overlong lines) before 421: a real client makes one or
# two; a client making ten is probing or is not speaking SMTP (Postfix's hard limit is 20).
MAX_ERRORS = 10


@dataclass(frozen=True, slots=True)
class SMTPLimits:
    """The bounds one connection works within; see the constants above for the reasons."""

    command_line: int = MAX_COMMAND_LINE
    auth_line: int = MAX_AUTH_LINE
    data_line: int = MAX_DATA_LINE
    message_size: int = MAX_MESSAGE_SIZE
    recipients: int = MAX_RECIPIENTS
    errors: int = MAX_ERRORS

    @classmethod
    def from_config(cls, limits: Limits) -> SMTPLimits:
        return cls(
            command_line=limits.smtp_line,
            message_size=limits.message_size,
            recipients=limits.recipients,
            errors=limits.smtp_errors,
        )


class LocalProtocolError(Exception):
    """The caller used the connection wrongly: asked for an event before answering the last
    one, answered nothing, or sent a reply that cannot follow. Never raised for client input."""


class Mode(enum.Enum):
    """What the next bytes from the client are."""

    COMMAND = "command"  # command lines
    AUTH = "auth"  # a base64 line answering a 334 challenge
    DATA = "data"  # message text after 354, up to <CRLF>.<CRLF>
    CHUNK = "chunk"  # the octets of a BDAT chunk
    TLS = "tls"  # a TLS handshake, which happens outside the core
    CLOSED = "closed"


class _Frame(enum.Enum):
    NEED_DATA = enum.auto()
    TOO_LONG = enum.auto()


# Command lines are text: no C0 controls or DEL (RFC 5321 §4.1.1 grammar has none).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_END_OF_DATA = b"\r\n.\r\n"  # RFC 5321 §4.1.1.4: the only sequence that ends message text


class _Transaction:
    __slots__ = ("chunked", "recipients", "smtputf8")

    def __init__(self, smtputf8: bool) -> None:
        self.smtputf8 = smtputf8
        self.recipients = 0  # accepted RCPTs
        self.chunked = False  # BDAT has begun: DATA and RCPT may not follow (RFC 3030 §2)


class ServerConnection:
    """One SMTP server session without I/O.

    Usage: ``send()`` the greeting first. Then after every ``receive_data(chunk)``, call
    ``next_event()`` until it returns :class:`NeedData`, answering each request event with one
    ``send(reply)`` (replies may be written in one batch: RFC 2920 PIPELINING). Pass ``b""`` to
    ``receive_data`` at end of stream. Held memory stays within one read plus one line (or the
    message being received) as long as the events are drained this way.

    State changes follow the *replies*: a positive reply to MAIL opens the transaction, 354 to
    DATA starts reading text, 334 to AUTH reads a SASL line, 235 records authentication, 220 to
    STARTTLS hands the stream to TLS, and 221 or any 421 closes the connection. The caller
    therefore decides, and the core keeps the RFC's order around the decision.

    Special cases, all deliberate:

    * Message text ends only at ``<CR><LF>.<CR><LF>``. A bare CR or LF anywhere in it makes the
      message refused (550 5.5.2) once the real end arrives, so ``<LF>.<LF>``, ``<LF>.<CR><LF>``
      and friends can never end data here while ending it at another server (SMTP smuggling).
    * A line over its limit is discarded as it arrives, keeping nothing, and answered with 500
      once its end is seen; a message over SIZE is counted but no longer kept, read to its end,
      and then refused with 552 5.3.4. The session goes on after both.
    * On STARTTLS every byte already buffered behind the command is discarded and reported
      (CVE-2011-0411), and :meth:`tls_started` forgets EHLO, AUTH and the transaction
      (RFC 3207 §4.2).
    * DATA ends a pipelined group too (RFC 2920 §3.1): the text may follow only its 354. If
      DATA is refused with bytes already buffered behind it, they are discarded the same
      way and reported as :class:`Unsynchronized`, whose 421 closes the connection; read as
      commands, the lines of that text would join the open transaction. While a refused
      DATA awaits its reply, :attr:`refusing_data` is true, so that the caller can apply
      the same rule to bytes that it holds and the core has not seen.
    * AUTH is offered only when mechanisms are configured, and only under TLS when
      ``auth_requires_tls`` (538 5.7.11 otherwise).
    * The N-th protocol error (``SMTPLimits.errors``) is answered with 421 4.7.0 instead and
      closes the connection.
    """

    def __init__(
        self,
        limits: SMTPLimits | Limits | None = None,
        *,
        tls_available: bool = False,
        tls_active: bool = False,
        auth_mechanisms: Sequence[str] = (),
        auth_requires_tls: bool = True,
        smtputf8: bool = True,
        chunking: bool = True,
        dsn: bool = False,
    ) -> None:
        if isinstance(limits, Limits):
            limits = SMTPLimits.from_config(limits)
        self.limits = limits or SMTPLimits()
        self.tls_available = tls_available
        self.tls_active = tls_active
        self.auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        self.auth_requires_tls = auth_requires_tls
        self.smtputf8 = smtputf8
        self.chunking = chunking
        self.dsn = dsn

        self.mode = Mode.COMMAND
        self.client_name: str | None = None  # the accepted EHLO/HELO argument
        self.esmtp = False  # the client said EHLO, not HELO
        self.authenticated = False
        self.errors = 0

        self._buffer = bytearray()
        self._scanned = 0  # leading bytes of the buffer already searched for a line end
        self._overlong = False  # discarding the rest of a line that went over its limit
        self._eof = False
        self._greeted = False
        self._refused_session = False  # greeted with 554: only QUIT now (RFC 5321 §3.1)
        self._pending: Event | None = None
        self._refusing_data = False  # the pending event refuses DATA (see refusing_data)
        self._transaction: _Transaction | None = None
        self._discard_chunks = False  # a BDAT transaction failed; skip its remaining chunks

        # The message being received (DATA or BDAT).
        self._body = io.BytesIO()
        self._body_size = 0
        self._body_failure: Reply | None = None
        self._at_line_start = True  # the text so far ends with CRLF (or nothing came yet)
        self._chunk_remaining = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_refusal: Event | None = None

    # --- Queries -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.mode is Mode.CLOSED

    @property
    def in_transaction(self) -> bool:
        return self._transaction is not None

    @property
    def recipient_count(self) -> int:
        return self._transaction.recipients if self._transaction else 0

    @property
    def message_bytes(self) -> int:
        """Bytes of the message being received that are held in memory right now."""
        return self._body.getbuffer().nbytes

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed (the message being built is not counted)."""
        return len(self._buffer)

    @property
    def refusing_data(self) -> bool:
        """The pending event refuses DATA. The client must wait for that reply before it
        sends more (RFC 2920 §3.1): bytes received before the reply is written were sent
        without waiting, and the caller should answer :func:`replies.improper_pipelining`
        instead, as the core does with an :class:`Unsynchronized` event."""
        return self._refusing_data

    @property
    def auth_offered(self) -> bool:
        return bool(self.auth_mechanisms) and (self.tls_active or not self.auth_requires_tls)

    def extensions(self) -> list[str]:
        """The EHLO keywords to advertise now (RFC 5321 §4.1.1.1), in a stable order."""
        keywords = [
            "PIPELINING",  # RFC 2920
            f"SIZE {self.limits.message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "ENHANCEDSTATUSCODES",  # RFC 2034
        ]
        if self.smtputf8:
            keywords.append("SMTPUTF8")  # RFC 6531
        if self.chunking:
            keywords.append("CHUNKING")  # RFC 3030
        if self.dsn:
            keywords.append("DSN")  # RFC 3461
        if self.tls_available and not self.tls_active:
            keywords.append("STARTTLS")  # RFC 3207
        if self.auth_offered:
            keywords.append("AUTH " + " ".join(self.auth_mechanisms))  # RFC 4954
        return keywords

    # --- Input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client; ``b""`` means the client closed its side."""
        if self.mode is Mode.CLOSED:
            return
        if not data:
            self._eof = True
        elif self.mode is not Mode.TLS:
            # During the handshake the stream belongs to TLS; nothing is SMTP until
            # tls_started(), so anything fed here is dropped.
            self._buffer += data

    def next_event(self) -> Event:
        """The next thing the client asked for, :class:`NeedData`, or :class:`ConnectionClosed`."""
        if self._pending is not None:
            raise LocalProtocolError(f"answer {type(self._pending).__name__} before reading on")
        if not self._greeted:
            raise LocalProtocolError("send the greeting before reading commands")
        event = self._next()
        if not isinstance(event, NeedData | ConnectionClosed):
            self._pending = event
        return event

    def _next(self) -> Event:
        if self.mode is Mode.COMMAND:
            return self._next_command()
        if self.mode is Mode.AUTH:
            return self._next_auth_response()
        if self.mode is Mode.DATA:
            return self._next_data()
        if self.mode is Mode.CHUNK:
            return self._next_chunk()
        if self.mode is Mode.TLS:
            return self._closed_if_eof()
        return CONNECTION_CLOSED

    # --- Output --------------------------------------------------------------------------

    def send(self, reply: Reply) -> bytes:
        """Answer the pending event (or greet, or close with 421); returns the bytes to write."""
        event = self._pending
        if event is None:
            return self._send_unsolicited(reply)
        self._pending = None
        self._refusing_data = False
        if reply.code == 421:  # RFC 5321 §3.8: 421 always closes the channel
            self._close()
        else:
            self._apply(event, reply)
        return reply.to_bytes()

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: start over as RFC 3207 §4.2 demands."""
        if self.mode is not Mode.TLS:
            raise LocalProtocolError("tls_started() without an accepted STARTTLS")
        self.tls_active = True
        self.mode = Mode.COMMAND
        self.client_name = None
        self.esmtp = False
        self.authenticated = False
        self._reset_transaction()
        self._discard_chunks = False
        self._buffer.clear()
        self._scanned = 0
        self._overlong = False

    def _send_unsolicited(self, reply: Reply) -> bytes:
        if self.mode is Mode.CLOSED:
            raise LocalProtocolError("the connection is closed")
        if not self._greeted:
            self._greeted = True
            if reply.code == 554:
                self._refused_session = True
            elif reply.code != 220:
                self._close()
        elif reply.code == 421:  # idle timeout, shutdown
            self._close()
        else:
            raise LocalProtocolError("no request to answer; only a 421 may be sent unasked")
        return reply.to_bytes()

    def _apply(self, event: Event, reply: Reply) -> None:
        """Move the state on according to how the caller answered ``event``."""
        if reply.is_intermediate and not _takes_intermediate(event, reply):
            raise LocalProtocolError(f"{reply.code} cannot answer {type(event).__name__}")
        positive = reply.is_positive
        if isinstance(event, Ehlo | Helo):
            if positive:
                # RFC 5321 §4.1.4: an accepted EHLO resets the session as RSET would.
                self.client_name = event.domain
                self.esmtp = isinstance(event, Ehlo)
                self._reset_transaction()
                self._discard_chunks = False
        elif isinstance(event, Mail):
            if positive:
                self._transaction = _Transaction(event.params.smtputf8)
                self._discard_chunks = False
        elif isinstance(event, Rcpt):
            if positive and self._transaction is not None:
                self._transaction.recipients += 1
        elif isinstance(event, Data):
            if reply.code == 354:
                self._start_data()
        elif isinstance(event, Bdat):
            if not positive:  # RFC 3030 §2: a refused chunk fails the whole transaction
                self._reset_transaction()
                self._discard_chunks = True
        elif isinstance(event, MessageBody | MessageRejected):
            self._reset_transaction()
        elif isinstance(event, Rset):
            self._reset_transaction()
            self._discard_chunks = False
        elif isinstance(event, Quit):
            self._close()  # RFC 5321 §4.1.1.10: reply, then close
        elif isinstance(event, StartTLS):
            if reply.code == 220:
                self.mode = Mode.TLS
                self._buffer.clear()
        elif isinstance(event, Auth | AuthResponse):
            if reply.code == 334:
                self.mode = Mode.AUTH
            elif reply.code == 235:
                self.authenticated = True

    # --- Commands ------------------------------------------------------------------------

    def _next_command(self) -> Event:
        line = self._take_line(self._command_line_limit())
        if line is _Frame.NEED_DATA:
            return self._closed_if_eof()
        if line is _Frame.TOO_LONG:
            return self._error(replies.line_too_long())
        text = _decode_line(line)
        if isinstance(text, Reply):
            return self._error(text)
        verb, argument = commands.split_command(text)
        if self._refused_session and verb != "QUIT":
            return self._error(replies.bad_sequence("Service refused; only QUIT is accepted"))
        command = _COMMANDS.get(verb)
        if command is None:
            return self._error(replies.unrecognized_command())
        return command(self, argument)

    def _command_line_limit(self) -> int:
        if self._buffer[:5].upper() == b"AUTH ":
            return max(self.limits.command_line, self.limits.auth_line)
        return self.limits.command_line

    def _features(self) -> commands.Features:
        return commands.Features(
            esmtp=self.esmtp, smtputf8=self.smtputf8, dsn=self.dsn, auth=self.auth_offered
        )

    def _ehlo(self, argument: str) -> Event:
        try:
            return Ehlo(commands.parse_helo(argument))
        except CommandError as e:
            return self._error(e.reply)

    def _helo(self, argument: str) -> Event:
        try:
            return Helo(commands.parse_helo(argument))
        except CommandError as e:
            return self._error(e.reply)

    def _mail(self, argument: str) -> Event:
        if self.client_name is None:
            return self._error(replies.bad_sequence("Send EHLO or HELO first"))
        if self._transaction is not None:
            return self._error(replies.bad_sequence("Sender already specified"))
        try:
            address, params = commands.parse_mail(argument, self._features())
        except CommandError as e:
            return self._error(e.reply)
        if params.size is not None and params.size > self.limits.message_size:
            # RFC 1870 §6.1: refuse at MAIL rather than after the octets are sent.
            return Refused(replies.message_too_big(self.limits.message_size))
        return Mail(address, params)

    def _rcpt(self, argument: str) -> Event:
        transaction = self._transaction
        if transaction is None:
            return self._error(replies.bad_sequence("Need MAIL before RCPT"))
        if transaction.chunked:
            return self._error(replies.bad_sequence("RCPT cannot follow BDAT"))
        try:
            address, params = commands.parse_rcpt(
                argument, self._features(), smtputf8=transaction.smtputf8
            )
        except CommandError as e:
            return self._error(e.reply)
        if transaction.recipients >= self.limits.recipients:
            return Refused(replies.too_many_recipients())
        return Rcpt(address, params)

    def _data(self, argument: str) -> Event:
        refusal = self._data_refusal(argument)
        if refusal is None:
            return Data()
        self._refusing_data = True
        if self._buffer:
            # RFC 2920 §3.1: the text may follow only a 354. What came behind a refused DATA
            # is the message, sent without waiting; its lines must not run as commands.
            return Unsynchronized(
                "DATA", self._discard_buffer(), replies.improper_pipelining("DATA")
            )
        return refusal

    def _data_refusal(self, argument: str) -> Event | None:
        if argument:
            return self._error(replies.argument_error("DATA takes no arguments"))
        transaction = self._transaction
        if transaction is None:
            return self._error(replies.bad_sequence("Need MAIL command"))
        if transaction.chunked:
            return self._error(replies.bad_sequence("DATA cannot follow BDAT"))
        if transaction.recipients == 0:
            return Refused(replies.no_valid_recipients())
        return None

    def _bdat(self, argument: str) -> Event:
        if not self.chunking:
            return self._error(replies.not_implemented("CHUNKING not available"))
        try:
            size, last = commands.parse_bdat(argument)
        except CommandError as e:
            return self._error(e.reply)
        # The chunk's octets follow whatever the answer will be; they are read (or skipped)
        # before replying, or they would be taken for commands (RFC 3030 §2).
        refusal = self._bdat_refusal()
        self._start_chunk(size, last, refusal)
        return self._next_chunk()

    def _bdat_refusal(self) -> Event | None:
        if self.client_name is None or not self.esmtp:
            return self._error(replies.bad_sequence("Send EHLO first"))
        if self._discard_chunks:
            return Refused(replies.bad_sequence("Transaction failed; chunk discarded"))
        if self._transaction is None:
            return self._error(replies.bad_sequence("Need MAIL command"))
        if self._transaction.recipients == 0:
            return Refused(replies.no_valid_recipients())
        return None

    def _rset(self, argument: str) -> Event:
        if argument:
            return self._error(replies.argument_error("RSET takes no arguments"))
        return Rset()

    def _noop(self, argument: str) -> Event:
        return Noop()  # RFC 5321 §4.1.1.9: an argument is allowed and ignored

    def _quit(self, argument: str) -> Event:
        if argument:
            return self._error(replies.argument_error("QUIT takes no arguments"))
        return Quit()

    def _vrfy(self, argument: str) -> Event:
        if not argument.strip():
            return self._error(replies.argument_error("VRFY requires an argument"))
        return Vrfy(argument.strip())

    def _expn(self, argument: str) -> Event:
        # RFC 5321 §3.5.2 allows refusing EXPN; list membership is nobody's business.
        return Refused(replies.not_implemented("EXPN not available"))

    def _help(self, argument: str) -> Event:
        return Help(argument.strip())

    def _starttls(self, argument: str) -> Event:
        if argument:
            # RFC 3207 §4: "501 Syntax error (no parameters allowed)".
            return self._error(replies.argument_error("STARTTLS takes no arguments"))
        if self.tls_active:
            return self._error(replies.bad_sequence("TLS already active"))
        if not self.tls_available:
            return self._error(replies.not_implemented("STARTTLS not available"))
        if self.client_name is None or not self.esmtp:
            return self._error(replies.bad_sequence("Send EHLO first"))
        # STARTTLS ends a pipelined group (RFC 2920 §3.1). Plaintext behind it would be read
        # as if it came under TLS: the command-injection hole of CVE-2011-0411.
        return StartTLS(self._discard_buffer())

    def _auth(self, argument: str) -> Event:
        if self.client_name is None or not self.esmtp:
            return self._error(replies.bad_sequence("Send EHLO first"))
        if not self.auth_mechanisms:
            return self._error(replies.not_implemented("AUTH not available"))
        if self.auth_requires_tls and not self.tls_active:
            return self._error(replies.auth_encryption_required())
        if self.authenticated:
            return self._error(replies.already_authenticated())
        if self._transaction is not None:
            # RFC 4954 §4: "The AUTH command is not permitted during a mail transaction."
            return self._error(replies.bad_sequence("AUTH not permitted during a mail transaction"))
        try:
            mechanism, initial = commands.parse_auth(argument)
        except CommandError as e:
            return self._error(e.reply)
        if mechanism not in self.auth_mechanisms:
            return self._error(replies.auth_mechanism_unknown())
        if initial is None:
            return Auth(mechanism, None)
        try:
            return Auth(mechanism, decode_response(initial))
        except SASLError:
            return self._error(replies.auth_malformed())

    def _error(self, reply: Reply) -> ProtocolError:
        self.errors += 1
        if self.errors >= self.limits.errors:
            return ProtocolError(replies.too_many_errors())
        return ProtocolError(reply)

    # --- AUTH continuation ---------------------------------------------------------------

    def _next_auth_response(self) -> Event:
        line = self._take_line(self.limits.auth_line)
        if line is _Frame.NEED_DATA:
            return self._closed_if_eof()
        # Whatever this line is, the exchange is over unless the answer is another 334.
        self.mode = Mode.COMMAND
        if line is _Frame.TOO_LONG:
            return self._error(replies.auth_line_too_long())
        text = _decode_line(line)
        if isinstance(text, Reply):
            return self._error(text)
        if text == "*":
            return Refused(replies.auth_cancelled())
        try:
            return AuthResponse(decode_response(text))
        except SASLError:
            return self._error(replies.auth_malformed())

    # --- Line framing --------------------------------------------------------------------

    def _take_line(self, limit: int) -> bytes | _Frame:
        """The next line through its LF, or why there is none yet.

        A line longer than ``limit`` is not kept: the buffer is emptied as soon as it passes
        the limit, and only the fact is remembered, so a gigabyte without a newline costs no
        more memory than a short line. The 500 reply comes when the line finally ends.
        """
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            if len(self._buffer) > limit:
                self._overlong = True
                self._buffer.clear()
            self._scanned = len(self._buffer)
            return _Frame.NEED_DATA
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        self._scanned = 0
        if self._overlong or len(line) > limit:
            self._overlong = False
            return _Frame.TOO_LONG
        return line

    def _discard_buffer(self) -> int:
        """Drop the bytes pipelined behind a command that ends a group; returns how many."""
        discarded = len(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return discarded

    def _closed_if_eof(self) -> Event:
        if self._eof:
            self._close()
            return CONNECTION_CLOSED
        return NEED_DATA

    def _close(self) -> None:
        self.mode = Mode.CLOSED
        self._buffer.clear()
        self._reset_transaction()

    # --- Message text after DATA (RFC 5321 §4.1.1.4, §4.5.2) ------------------------------

    def _start_data(self) -> None:
        self.mode = Mode.DATA
        self._reset_body()
        self._at_line_start = True  # the DATA line's CRLF precedes the text
        self._scanned = 0

    def _next_data(self) -> Event:
        buffer = self._buffer
        end = self._find_end_of_data()
        if end is not None:
            text_end, consumed = end
            self._take_text(buffer[:text_end])
            del buffer[:consumed]
            self._scanned = 0
            self.mode = Mode.COMMAND
            if self._body_failure is not None:
                return MessageRejected(self._body_failure)
            return self._message_body()
        # Consume every complete line; keep only the unfinished last one.
        last_lf = buffer.rfind(b"\n", self._scanned)
        if last_lf >= 0:
            self._take_text(buffer[: last_lf + 1])
            del buffer[: last_lf + 1]
        if len(buffer) > self.limits.data_line:
            self._fail_body(replies.message_line_too_long())
            # Mid-line now, and nothing here is kept; only a final CR may begin the
            # end-of-data marker, so it alone survives.
            del buffer[:-1]
            self._at_line_start = False
        self._scanned = len(buffer)
        return self._closed_if_eof()

    def _find_end_of_data(self) -> tuple[int, int] | None:
        """(end of the text, end of the marker) if ``<CRLF>.<CRLF>`` is in the buffer.

        The first CRLF of the marker may be the one that ended the text already consumed,
        which is why a buffer starting with ".<CRLF>" counts only after a real CRLF: after a
        bare LF it is the ``<LF>.<CR><LF>`` of a smuggling attempt.
        """
        if self._at_line_start and self._buffer.startswith(b".\r\n"):
            return 0, 3
        # Bytes before _scanned hold no LF; the marker's CR may be the last of them.
        at = self._buffer.find(_END_OF_DATA, max(0, self._scanned - 1))
        if at < 0:
            return None
        return at + 2, at + len(_END_OF_DATA)

    def _take_text(self, text: bytearray) -> None:
        """Check, unstuff and keep complete lines of message text (they end with LF)."""
        if not text:
            return
        self._at_line_start = text.endswith(b"\r\n")
        if self._body_failure is not None:
            return
        crlf = text.count(b"\r\n")
        if text.count(b"\r") != crlf or text.count(b"\n") != crlf:
            self._fail_body(replies.bare_newline_in_data())
            return
        if _has_line_longer_than(text, self.limits.data_line):
            self._fail_body(replies.message_line_too_long())
            return
        # §4.5.2: a line's leading period is removed; ``text`` begins at a line start.
        # Most text has no such line, and looking is cheaper than rewriting.
        if b"\r\n." in text:
            text = text.replace(b"\r\n.", b"\r\n")
        if text.startswith(b"."):
            del text[0]
        self._keep(text)

    # --- BDAT chunks (RFC 3030) ----------------------------------------------------------

    def _start_chunk(self, size: int, last: bool, refusal: Event | None) -> None:
        self.mode = Mode.CHUNK
        self._chunk_remaining = size
        self._chunk_size = size
        self._chunk_last = last
        self._chunk_refusal = refusal
        transaction = self._transaction
        if refusal is None and transaction is not None:
            if not transaction.chunked:
                transaction.chunked = True
                self._reset_body()
            if self._body_size + size > self.limits.message_size:
                # Known too big already: skip the octets instead of storing them.
                self._fail_body(replies.message_too_big(self.limits.message_size))

    def _next_chunk(self) -> Event:
        take = min(len(self._buffer), self._chunk_remaining)
        if take:
            if self._chunk_refusal is None and self._body_failure is None:
                self._keep(self._buffer[:take])
            del self._buffer[:take]
            self._chunk_remaining -= take
        if self._chunk_remaining:
            return self._closed_if_eof()
        self.mode = Mode.COMMAND
        return self._finish_chunk()

    def _finish_chunk(self) -> Event:
        if self._chunk_refusal is not None:
            if self._chunk_last:
                self._discard_chunks = False
            return self._chunk_refusal
        if self._body_failure is not None:
            # The client sends no more chunks after a failure, but ones already pipelined
            # must be read and skipped (RFC 3030 §2).
            self._discard_chunks = not self._chunk_last
            return MessageRejected(self._body_failure)
        if self._chunk_last:
            return self._message_body()
        return Bdat(self._chunk_size)

    # --- The message being built ---------------------------------------------------------

    def _keep(self, data: bytes | bytearray) -> None:
        self._body_size += len(data)
        if self._body_size > self.limits.message_size:
            self._fail_body(replies.message_too_big(self.limits.message_size))
        else:
            self._body.write(data)

    def _fail_body(self, reply: Reply) -> None:
        """Refuse the message at its end; drop what was kept so far right away."""
        if self._body_failure is None:
            self._body_failure = reply
        self._body = io.BytesIO()

    def _message_body(self) -> MessageBody:
        # BytesIO.getvalue() hands over its buffer without a copy, so a 50 MB message is
        # held once, not twice.
        data = self._body.getvalue()
        self._body = io.BytesIO()
        return MessageBody(data)

    def _reset_body(self) -> None:
        self._body = io.BytesIO()
        self._body_size = 0
        self._body_failure = None

    def _reset_transaction(self) -> None:
        self._transaction = None
        self._reset_body()


def _decode_line(line: bytes) -> str | Reply:
    """A command or AUTH line as text, or the error reply for it.

    Lines end with CRLF and nothing else (RFC 5321 §2.3.8): a bare LF or CR is refused, not
    guessed at, so that no two parsers can split the same bytes into different commands.
    """
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        return replies.bare_newline_in_command()
    try:
        text = line[:-2].decode("utf-8")
    except UnicodeDecodeError:
        return replies.syntax_error("Command is not valid UTF-8")
    if _CONTROL.search(text):
        return replies.syntax_error("Control characters in command")
    return text


def _has_line_longer_than(text: bytes | bytearray, limit: int) -> bool:
    """Whether any LF-terminated line in ``text`` is over ``limit`` octets.

    Each step jumps to the last LF within ``limit`` bytes, so the loop runs about
    len(text)/limit times instead of once per line.
    """
    position = 0
    while len(text) - position > limit:
        lf = text.rfind(b"\n", position, position + limit)
        if lf < 0:
            return True
        position = lf + 1
    return False


def _takes_intermediate(event: Event, reply: Reply) -> bool:
    if isinstance(event, Data):
        return reply.code == 354
    if isinstance(event, Auth | AuthResponse):
        return reply.code == 334
    return False


_COMMANDS: dict[str, Callable[[ServerConnection, str], Event]] = {
    "EHLO": ServerConnection._ehlo,
    "HELO": ServerConnection._helo,
    "MAIL": ServerConnection._mail,
    "RCPT": ServerConnection._rcpt,
    "DATA": ServerConnection._data,
    "BDAT": ServerConnection._bdat,
    "RSET": ServerConnection._rset,
    "NOOP": ServerConnection._noop,
    "QUIT": ServerConnection._quit,
    "VRFY": ServerConnection._vrfy,
    "EXPN": ServerConnection._expn,
    "HELP": ServerConnection._help,
    "STARTTLS": ServerConnection._starttls,
    "AUTH": ServerConnection._auth,
}
