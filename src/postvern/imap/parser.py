"""Command framing: where each IMAP command ends, literals included (RFC 9051 §4.3).

A command is one or more lines; a line that ends in ``{n}`` (synchronizing), ``{n+}``
(RFC 7888 LITERAL+/LITERAL-) or ``~{n}`` (RFC 3516 literal8) is followed by n octets of
literal data and then the rest of the command. :class:`CommandFramer` is fed bytes and returns
whole :class:`RawCommand` objects. Every literal is announced *before* its data is read, so
the protocol can refuse it (wrong state, too large) before the client sends it; every limit is
checked before a byte is buffered, and input past a limit is skipped with a bounded tail.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from postvern.config import Limits
from postvern.imap.grammar.lexer import (
    LITERAL_MARKER,
    MAX_NUMBER64,
    MAX_NUMBER64_DIGITS,
    Literal,
    RawCommand,
)

_DEFAULTS = Limits()
# The text of one command, literals excluded. 64 KiB (config.Limits.imap_line) holds a UID set
# of thousands of ranges; RFC 7162 §4 asks servers to accept lines of at least 8192 octets.
DEFAULT_LINE_LIMIT = _DEFAULTS.imap_line
# One literal, and all literals of one command together, after login (config.Limits.imap_literal:
# the largest message APPEND accepts, also advertised as APPENDLIMIT).
DEFAULT_LITERAL_LIMIT = _DEFAULTS.imap_literal
# Before login only user names, passwords and SASL data travel: 4 KiB is plenty, and an
# anonymous peer must not make the server buffer megabytes (config.Limits.imap_literal_unauth).
DEFAULT_UNAUTH_LITERAL_LIMIT = _DEFAULTS.imap_literal_unauth
# RFC 7888 §4: under LITERAL- a non-synchronizing literal may be at most 4096 octets.
LITERAL_MINUS_MAX = 4096
# MULTIAPPEND (RFC 3502) is the only command with many literals; 1000 messages in one APPEND
# is far beyond what clients send, and bounds the bookkeeping per command.
MAX_LITERALS_PER_COMMAND = 1000
# Octets kept from the start of a refused command (to answer with its tag) and from the end of
# a skipped line (to see whether it announced a literal that must be skipped too).
HEAD_KEEP = 128
TAIL_KEEP = 32


@dataclass(frozen=True, slots=True)
class FramingLimits:
    line: int = DEFAULT_LINE_LIMIT
    literal: int = DEFAULT_LITERAL_LIMIT
    literal_unauthenticated: int = DEFAULT_UNAUTH_LITERAL_LIMIT
    literals_per_command: int = MAX_LITERALS_PER_COMMAND

    @classmethod
    def from_config(cls, limits: Limits) -> FramingLimits:
        return cls(
            line=limits.imap_line,
            literal=limits.imap_literal,
            literal_unauthenticated=limits.imap_literal_unauth,
        )


class NonSyncLiterals(enum.Enum):
    """Which non-synchronizing literal extension the server advertises (RFC 7888)."""

    REFUSED = "none"
    LITERAL_PLUS = "LITERAL+"
    LITERAL_MINUS = "LITERAL-"


class LocalProtocolError(Exception):
    """The code driving the framer or the connection broke the API contract (a bug here)."""


@dataclass(frozen=True, slots=True)
class LiteralAnnounced:
    """A line ended in a literal marker: call accept_literal() or reject_literal() now.

    ``head`` is the first line of the command so far (for the tag and command name).
    """

    head: bytes
    size: int
    synchronizing: bool
    binary: bool


@dataclass(frozen=True, slots=True)
class FramingError:
    """A command that was refused while framing; it has been skipped entirely.

    ``fatal`` means the stream cannot be resynchronized and the connection must end.
    """

    head: bytes
    text: str
    status: str = "BAD"
    code: tuple[str, str | None] | None = None
    fatal: bool = False


class NeedData:
    """The type of NEED_DATA."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
"""No complete command yet: feed more bytes."""

FrameEvent = RawCommand | LiteralAnnounced | FramingError | NeedData


class _Mode(enum.Enum):
    LINE = "line"
    LITERAL = "literal"
    DECIDE = "waiting for accept_literal/reject_literal"
    SKIP_LINE = "skipping a refused line"
    SKIP_LITERAL = "skipping a refused literal"
    CLOSED = "closed"


class _Continue:
    pass


_CONTINUE = _Continue()


@dataclass(frozen=True, slots=True)
class _Marker:
    size: int | None  # None: a number no literal can have
    synchronizing: bool
    binary: bool


def _find_marker(line: bytes) -> _Marker | None:
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    if start > 0 and line[start - 1] == ord("~"):
        start -= 1
    match = LITERAL_MARKER.match(line, max(start, 0))
    if match is None:
        return None
    binary, digits, plus = match.groups()
    size = int(digits) if len(digits) <= MAX_NUMBER64_DIGITS else None
    if size is not None and size > MAX_NUMBER64:
        size = None
    return _Marker(size, not plus, bool(binary))


class CommandFramer:
    """Feed bytes with :meth:`receive`; take commands with :meth:`next_event`.

    ``authenticated`` selects the literal limit; ``plain_lines`` turns off literal detection
    (for AUTHENTICATE responses and IDLE's DONE, which are bare lines).
    """

    def __init__(
        self,
        limits: FramingLimits | None = None,
        non_sync: NonSyncLiterals = NonSyncLiterals.LITERAL_PLUS,
    ) -> None:
        self.limits = limits or FramingLimits()
        self.non_sync = non_sync
        self.authenticated = False
        self.plain_lines = False
        self._buf = bytearray()
        self._scan = 0
        self._literal = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._mode = _Mode.LINE
        self._lines: list[bytes] = []
        self._literals: list[Literal] = []
        self._line_bytes = 0
        self._literal_bytes = 0
        self._head = b""
        self._tail = b""
        self._error: FramingError | None = None
        self._ready: FrameEvent | None = None
        self._remaining = 0
        self._marker: _Marker | None = None
        self._literal = bytearray()

    # -- public API -------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if self._mode is not _Mode.CLOSED:
            self._buf += data

    @property
    def buffered(self) -> int:
        """Octets held for the command in progress (the memory a client can make us spend)."""
        return len(self._buf) + len(self._literal) + self._line_bytes + self._literal_bytes

    def take_unprocessed(self) -> bytes:
        """Remove and return input not yet framed (after STARTTLS or COMPRESS)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return data

    def close(self) -> None:
        self._mode = _Mode.CLOSED
        self._buf.clear()

    def accept_literal(self) -> None:
        if self._mode is not _Mode.DECIDE or self._marker is None:
            raise LocalProtocolError("no literal is waiting for a decision")
        self._mode = _Mode.LITERAL
        self._remaining = self._marker.size or 0

    def reject_literal(
        self, text: str, *, status: str = "BAD", code: tuple[str, str | None] | None = None
    ) -> None:
        marker = self._marker
        if self._mode is not _Mode.DECIDE or marker is None:
            raise LocalProtocolError("no literal is waiting for a decision")
        error = FramingError(self._head, text, status, code)
        if marker.synchronizing:
            # The client waits for "+" before sending the data: the command ends here.
            self._reset()
            self._ready = error
        else:
            self._skip_literal(marker.size or 0, error)

    def next_event(self) -> FrameEvent:
        while True:
            if self._ready is not None:
                event, self._ready = self._ready, None
                return event
            mode = self._mode
            if mode is _Mode.DECIDE:
                raise LocalProtocolError("accept_literal() or reject_literal() first")
            if mode is _Mode.CLOSED:
                self._buf.clear()
                return NEED_DATA
            if mode is _Mode.LINE:
                result = self._read_line()
            elif mode is _Mode.LITERAL:
                result = self._read_literal()
            elif mode is _Mode.SKIP_LINE:
                result = self._skip_line_data()
            else:
                result = self._skip_literal_data()
            if not isinstance(result, _Continue):
                return result

    # -- lines ------------------------------------------------------------------------------

    def _read_line(self) -> FrameEvent | _Continue:
        buf = self._buf
        budget = self.limits.line - self._line_bytes
        lf = buf.find(b"\n", self._scan)
        if lf < 0:
            if len(buf) > budget + 1:  # +1: a CR waiting for its LF
                if not self._lines:
                    self._head = bytes(buf[:HEAD_KEEP])
                self._tail = bytes(buf[-TAIL_KEEP:])
                buf.clear()
                self._scan = 0
                return self._start_skipping("command line too long")
            self._scan = len(buf)
            return NEED_DATA
        end = lf - 1 if lf > 0 and buf[lf - 1] == 0x0D else lf
        self._scan = 0
        if end > budget:
            if not self._lines:
                self._head = bytes(buf[:HEAD_KEEP])
            self._tail = bytes(buf[max(0, end - TAIL_KEEP) : end])
            del buf[: lf + 1]
            self._error = FramingError(self._head, "command line too long")
            return self._skipped_line_ended()
        line = bytes(buf[:end])
        del buf[: lf + 1]
        if not self._lines:
            self._head = line[:HEAD_KEEP]
        self._lines.append(line)
        self._line_bytes += len(line)
        if self.plain_lines:
            return self._complete()
        return self._after_line(line)

    def _after_line(self, line: bytes) -> FrameEvent | _Continue:
        marker = _find_marker(line)
        if marker is None:
            return self._complete()
        if marker.size is None:
            if marker.synchronizing:
                return self._fail("literal size out of range")
            # A non-synchronizing literal of unknown length cannot be skipped.
            return self._fatal("literal size out of range")
        problem = self._literal_problem(marker)
        if problem is not None:
            if marker.synchronizing:
                return self._fail(*problem)
            self._skip_literal(marker.size, FramingError(self._head, *problem))
            return _CONTINUE
        self._marker = marker
        self._mode = _Mode.DECIDE
        return LiteralAnnounced(self._head, marker.size, marker.synchronizing, marker.binary)

    def _literal_problem(self, marker: _Marker) -> tuple[str, str, tuple[str, None]] | None:
        size = marker.size or 0
        toobig = ("TOOBIG", None)
        if not marker.synchronizing:
            if self.non_sync is NonSyncLiterals.REFUSED:
                return ("non-synchronizing literals are not supported", "BAD", toobig)
            # RFC 7888 §4: a LITERAL- server answers a larger one with a tagged BAD.
            if self.non_sync is NonSyncLiterals.LITERAL_MINUS and size > LITERAL_MINUS_MAX:
                return ("non-synchronizing literal over 4096 octets (LITERAL-)", "BAD", toobig)
        if len(self._literals) >= self.limits.literals_per_command:
            return ("too many literals in one command", "BAD", toobig)
        limit = self.limits.literal if self.authenticated else self.limits.literal_unauthenticated
        status = "NO" if marker.synchronizing else "BAD"
        if size > limit or self._literal_bytes + size > limit:
            return (f"literal too large (limit {limit} octets)", status, toobig)
        return None

    def _complete(self) -> RawCommand:
        command = RawCommand(self._lines, self._literals)
        self._reset()
        return command

    def _fail(
        self, text: str, status: str = "BAD", code: tuple[str, str | None] | None = None
    ) -> FramingError:
        error = FramingError(self._head, text, status, code)
        self._reset()
        return error

    def _fatal(self, text: str) -> FramingError:
        error = FramingError(self._head, text, fatal=True)
        self._reset()
        self.close()
        return error

    # -- literals ---------------------------------------------------------------------------

    def _read_literal(self) -> FrameEvent | _Continue:
        if self._remaining:
            buf = self._buf
            take = min(self._remaining, len(buf))
            if take == 0:
                return NEED_DATA
            with memoryview(buf) as view:
                self._literal += view[:take]
            del buf[:take]
            self._remaining -= take
            if self._remaining:
                return NEED_DATA
        marker = self._marker
        assert marker is not None
        self._literals.append(Literal(bytes(self._literal), marker.binary))
        self._literal_bytes += len(self._literal)
        self._literal = bytearray()
        self._marker = None
        self._mode = _Mode.LINE
        return _CONTINUE

    # -- skipping a refused command ---------------------------------------------------------

    def _start_skipping(self, text: str) -> _Continue:
        self._error = FramingError(self._head, text)
        self._drop_command()
        self._mode = _Mode.SKIP_LINE
        return _CONTINUE

    def _skip_literal(self, size: int, error: FramingError) -> None:
        self._error = self._error or error
        self._remaining = size
        self._mode = _Mode.SKIP_LITERAL
        self._drop_command()

    def _drop_command(self) -> None:
        """Forget what was framed of a refused command (only its head is still needed)."""
        self._lines = []
        self._literals = []
        self._line_bytes = self._literal_bytes = 0

    def _skip_line_data(self) -> FrameEvent | _Continue:
        buf = self._buf
        lf = buf.find(b"\n")
        if lf < 0:
            self._tail = (self._tail + bytes(buf[-TAIL_KEEP:]))[-TAIL_KEEP:]
            buf.clear()
            return NEED_DATA
        self._tail = (self._tail + bytes(buf[max(0, lf - TAIL_KEEP) : lf]))[-TAIL_KEEP:]
        del buf[: lf + 1]
        return self._skipped_line_ended()

    def _skipped_line_ended(self) -> FrameEvent | _Continue:
        tail = self._tail[:-1] if self._tail.endswith(b"\r") else self._tail
        self._tail = b""
        marker = _find_marker(tail)
        if marker is not None and not marker.synchronizing:
            if marker.size is None:
                return self._fatal("literal size out of range")
            self._skip_literal(marker.size, FramingError(self._head, ""))
            return _CONTINUE
        error = self._error or FramingError(self._head, "command refused")
        self._reset()
        return error

    def _skip_literal_data(self) -> FrameEvent | _Continue:
        take = min(self._remaining, len(self._buf))
        del self._buf[:take]
        self._remaining -= take
        if self._remaining:
            return NEED_DATA
        self._mode = _Mode.SKIP_LINE
        return _CONTINUE
