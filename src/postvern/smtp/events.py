"""Events an SMTP server connection reports (the h11 pattern: the core speaks in events).

Every event but :class:`NeedData` and :class:`ConnectionClosed` is a client request that
must be answered with exactly one ``ServerConnection.send(reply)`` before the next event is
asked for. Events carrying client secrets or message text keep them out of ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from postvern.smtp.address import Address
from postvern.smtp.commands import MailParams, RcptParams
from postvern.smtp.replies import Reply


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of everything :meth:`ServerConnection.next_event` returns."""


@dataclass(frozen=True, slots=True)
class Ehlo(Event):
    domain: str


@dataclass(frozen=True, slots=True)
class Helo(Event):
    domain: str


@dataclass(frozen=True, slots=True)
class Mail(Event):
    """MAIL FROM. ``address`` is ``None`` for the null reverse-path ``<>`` (bounces)."""

    address: Address | None
    params: MailParams


@dataclass(frozen=True, slots=True)
class Rcpt(Event):
    address: Address
    params: RcptParams


@dataclass(frozen=True, slots=True)
class Data(Event):
    """DATA was accepted by the core; answer 354 to receive the message, or refuse it."""


@dataclass(frozen=True, slots=True)
class Bdat(Event):
    """A BDAT chunk that is not the last one has been read (RFC 3030); answer 250."""

    size: int


@dataclass(frozen=True, slots=True)
class MessageBody(Event):
    """The complete message: dot-unstuffed after DATA, concatenated chunks after BDAT LAST."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class MessageRejected(Event):
    """The core refused the message it just read to the end (too big, bare CR/LF, a line
    too long); send ``reply``. The transaction is over, the session goes on."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Rset(Event):
    pass


@dataclass(frozen=True, slots=True)
class Noop(Event):
    pass


@dataclass(frozen=True, slots=True)
class Quit(Event):
    pass


@dataclass(frozen=True, slots=True)
class Vrfy(Event):
    argument: str


@dataclass(frozen=True, slots=True)
class Help(Event):
    topic: str


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """STARTTLS. ``discarded`` counts bytes the client pipelined after it, which the core
    threw away (RFC 3207 §4.2, CVE-2011-0411): a non-zero value is an attack or a bug."""

    discarded: int


@dataclass(frozen=True, slots=True)
class Unsynchronized(Event):
    """The client sent more behind a command it must wait on (RFC 2920 §3.1): DATA that the
    core refused. ``discarded`` bytes were thrown away, as after STARTTLS, for they are the
    message text and would otherwise run as commands. Send ``reply`` (a 421: the
    connection closes)."""

    command: str
    discarded: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class Auth(Event):
    """AUTH. ``initial_response`` is decoded from base64: ``None`` when absent, ``b""`` for "="."""

    mechanism: str
    initial_response: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """A decoded client response to a 334 challenge."""

    response: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ProtocolError(Event):
    """The client broke the protocol (syntax, order, line length, bare CR/LF, AUTH where it
    is not offered or not allowed yet); send ``reply``.

    These count towards the session's error limit; the one that reaches it carries a 421,
    after which the connection is closed.
    """

    reply: Reply


@dataclass(frozen=True, slots=True)
class Refused(Event):
    """The core refused a well-formed command by rule or limit; send ``reply``. Not counted as
    an error: SIZE over the maximum, too many recipients, DATA or BDAT without an accepted
    recipient, EXPN, a cancelled AUTH, a chunk of a failed BDAT transaction."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class NeedData(Event):
    """Nothing more can be said until more bytes arrive: flush the replies, then read."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The client closed the connection, or the server ended the session (221, 421)."""


NEED_DATA = NeedData()
CONNECTION_CLOSED = ConnectionClosed()
