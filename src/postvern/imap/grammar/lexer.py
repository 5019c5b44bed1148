"""The tokens of IMAP command syntax (RFC 9051 §9): atoms, strings, literals, numbers, lists.

A framed command arrives as its text lines and the literals between them (see
:mod:`postvern.imap.parser`); :class:`Reader` walks them as one stream, handing out a literal
where a line ends in its ``{n}`` marker. Every reader method either returns a value or raises
:class:`CommandError`, which the protocol turns into a tagged BAD (or NO) response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

from postvern.imap.sequence import MAX_NUMBER, SequenceSet, SequenceSetError

# RFC 9051 §9: number64 (literal lengths, mod-sequences) is a signed 63-bit quantity.
MAX_NUMBER64 = 2**63 - 1
# The longest number64 is 19 digits; a longer digit run is refused before int() parses it.
MAX_NUMBER64_DIGITS = 19

_CTL = bytes(range(0x20)) + b"\x7f"
# RFC 9051 §9 atom-specials: "(" ")" "{" SP CTL list-wildcards quoted-specials resp-specials.
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]' + _CTL)
ATOM_CHARS = frozenset(range(0x01, 0x80)) - _ATOM_SPECIALS
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
# list-char = ATOM-CHAR / list-wildcards / resp-specials
LIST_CHARS = ASTRING_CHARS | {ord("%"), ord("*")}
# tag = 1*<any ASTRING-CHAR except "+">
TAG_CHARS = ASTRING_CHARS - {ord("+")}
_SEQUENCE_CHARS = frozenset(b"0123456789:,*$")
_DIGITS = frozenset(b"0123456789")

# A literal marker ends a line: "{" number64 ["+"] "}" or, for literal8, "~{" ... (RFC 3516).
LITERAL_MARKER = re.compile(rb"(~?)\{([0-9]+)(\+?)\}\Z")

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DATE_TEXT = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})\Z")
_DATE_TIME = re.compile(
    r"([ 0-9]?[0-9])-([A-Za-z]{3})-([0-9]{4}) "
    r"([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})\Z"
)


class CommandError(Exception):
    """A command that cannot be executed as written: answered with ``status`` and ``text``.

    ``code`` is a response code as (atom, data-or-None), e.g. ``("BADCHARSET", "(UTF-8)")``.
    """

    def __init__(
        self, text: str, *, status: str = "BAD", code: tuple[str, str | None] | None = None
    ) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Literal:
    """The octets of one literal; ``binary`` for literal8 (``~{n}``, RFC 3516)."""

    data: bytes = field(repr=False)
    binary: bool = False


@dataclass(slots=True)
class RawCommand:
    """One framed command: ``lines[i]`` ends with the marker of ``literals[i]``."""

    lines: list[bytes]
    literals: list[Literal] = field(default_factory=list)


class Reader:
    """A cursor over a :class:`RawCommand`."""

    def __init__(self, raw: RawCommand) -> None:
        self._lines = raw.lines
        self._literals = raw.literals
        self._index = 0
        self._line = raw.lines[0] if raw.lines else b""
        self._pos = 0

    # -- position ---------------------------------------------------------------------------

    def peek(self) -> int | None:
        return self._line[self._pos] if self._pos < len(self._line) else None

    def at_end(self) -> bool:
        return self._pos >= len(self._line) and self._index >= len(self._lines) - 1

    def at_literal(self) -> bool:
        return LITERAL_MARKER.match(self._line, self._pos) is not None

    def end(self) -> None:
        if not self.at_end():
            char = self.peek()
            if char is not None and char >= 0x80:
                raise CommandError("8-bit characters must be quoted or sent as a literal")
            raise CommandError("unexpected extra arguments")

    def mark(self) -> tuple[int, int, bytes]:
        return self._index, self._pos, self._line

    def reset(self, mark: tuple[int, int, bytes]) -> None:
        self._index, self._pos, self._line = mark

    # -- single bytes -----------------------------------------------------------------------

    def take(self, char: bytes) -> bool:
        if self.peek() == char[0]:
            self._pos += 1
            return True
        return False

    def expect(self, char: bytes, what: str) -> None:
        if not self.take(char):
            raise CommandError(f"expected {what}")

    def sp(self) -> None:
        if self.take(b" "):
            return
        if self.at_end():
            raise CommandError("missing argument")
        char = self.peek()
        if char is not None and char >= 0x80:
            raise CommandError("8-bit characters must be quoted or sent as a literal")
        raise CommandError("expected a space")

    def open_paren(self) -> None:
        self.expect(b"(", '"("')

    def close_paren(self) -> None:
        self.expect(b")", '")"')

    # -- atoms and numbers ------------------------------------------------------------------

    def run(self, allowed: frozenset[int]) -> bytes:
        start = self._pos
        line = self._line
        while self._pos < len(line) and line[self._pos] in allowed:
            self._pos += 1
        return line[start : self._pos]

    def atom(self, what: str = "an atom") -> str:
        text = self.run(ATOM_CHARS)
        if not text:
            char = self.peek()
            if char is not None and char >= 0x80:
                raise CommandError("8-bit characters are not allowed here")
            raise CommandError(f"expected {what}")
        return text.decode("ascii")

    def keyword(self) -> str:
        return self.atom("a keyword").upper()

    def peek_keyword(self) -> str:
        mark = self.mark()
        text = self.run(ATOM_CHARS)
        self.reset(mark)
        return text.decode("ascii").upper()

    def take_keyword(self, word: str) -> bool:
        """Consume ``word`` if it is the next whole atom (case-insensitive)."""
        if self.peek_keyword() == word:
            self._pos += len(word)
            return True
        return False

    def number(self, limit: int = MAX_NUMBER, what: str = "a number") -> int:
        digits = self.run(_DIGITS)
        if not digits:
            raise CommandError(f"expected {what}")
        if len(digits) > MAX_NUMBER64_DIGITS or int(digits) > limit:
            raise CommandError(f"{what} out of range")
        return int(digits)

    def nz_number(self, what: str = "a number") -> int:
        value = self.number(what=what)
        if value == 0:
            raise CommandError(f"{what} must not be zero")
        return value

    def number64(self, what: str = "a number") -> int:
        return self.number(MAX_NUMBER64, what)

    def sequence_set(self) -> SequenceSet:
        text = self.run(_SEQUENCE_CHARS)
        try:
            return SequenceSet.parse(text.decode("ascii"))
        except SequenceSetError as e:
            raise CommandError(f"invalid sequence set: {e}") from None

    # -- strings ----------------------------------------------------------------------------

    def quoted(self) -> bytes:
        self.expect(b'"', "a quoted string")
        out = bytearray()
        line = self._line
        while self._pos < len(line):
            char = line[self._pos]
            self._pos += 1
            if char == 0x22:
                return bytes(out)
            if char == 0x5C:
                if self._pos >= len(line) or line[self._pos] not in b'"\\':
                    raise CommandError('only \\" and \\\\ may be escaped in a quoted string')
                char = line[self._pos]
                self._pos += 1
            elif char == 0:
                raise CommandError("NUL in a quoted string")
            out.append(char)
        raise CommandError("unterminated quoted string")

    def literal(self, *, binary_ok: bool = False, nul_ok: bool = False) -> Literal:
        match = LITERAL_MARKER.match(self._line, self._pos)
        if match is None:
            raise CommandError("malformed literal (a literal must end its line)")
        if self._index >= len(self._literals):
            raise CommandError("missing literal data")
        value = self._literals[self._index]
        if value.binary and not binary_ok:
            raise CommandError("literal8 is only allowed for message data")
        if not (nul_ok or value.binary) and b"\x00" in value.data:
            raise CommandError("NUL in a literal")
        self._index += 1
        self._line = self._lines[self._index] if self._index < len(self._lines) else b""
        self._pos = 0
        return value

    def string(self) -> bytes:
        if self.peek() == ord('"'):
            return self.quoted()
        if self.peek() == ord("{") or self.at_literal():
            return self.literal().data
        raise CommandError("expected a string")

    def astring(self, what: str = "a string") -> bytes:
        char = self.peek()
        if char == ord('"'):
            return self.quoted()
        if char == ord("{") or self.at_literal():
            return self.literal().data
        text = self.run(ASTRING_CHARS)
        if not text:
            if char is not None and char >= 0x80:
                raise CommandError("8-bit characters must be quoted or sent as a literal")
            raise CommandError(f"expected {what}")
        return text

    def nstring(self) -> bytes | None:
        if self.take_keyword("NIL"):
            return None
        return self.string()

    def list_mailbox(self) -> bytes:
        char = self.peek()
        if char in (ord('"'), ord("{")) or self.at_literal():
            return self.string()
        text = self.run(LIST_CHARS)
        if not text:
            raise CommandError("expected a mailbox pattern")
        return text

    # -- flags, lists and dates -------------------------------------------------------------

    def flag(self) -> str:
        """``\\Seen`` and friends (system flags normalised to RFC spelling) or a keyword."""
        if self.take(b"\\"):
            return normalise_flag("\\" + self.atom("a flag name"))
        return self.atom("a flag or keyword")

    def flag_list(self) -> tuple[str, ...]:
        self.open_paren()
        flags: list[str] = []
        while not self.take(b")"):
            if flags:
                self.sp()
            flags.append(self.flag())
        return tuple(flags)

    def date(self) -> date:
        text = self.quoted() if self.peek() == ord('"') else self.run(ATOM_CHARS)
        return parse_date(text)

    def date_time(self) -> datetime:
        if self.peek() != ord('"'):
            raise CommandError("expected a quoted date-time")
        return parse_date_time(self.quoted())


SYSTEM_FLAGS = {
    name.upper(): name
    for name in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")
}


def normalise_flag(flag: str) -> str:
    """RFC 9051 §2.3.2: flags are case-insensitive; system flags get their usual spelling."""
    return SYSTEM_FLAGS.get(flag.upper(), flag)


def _month(name: str) -> int:
    try:
        return MONTHS.index(name.upper()) + 1
    except ValueError:
        raise CommandError(f"invalid month {name!r}") from None


def parse_date(text: bytes) -> date:
    match = _DATE_TEXT.match(text.decode("ascii", "replace"))
    if match is None:
        raise CommandError("expected a date like 1-Feb-1994")
    day, month, year = match.groups()
    try:
        return date(int(year), _month(month), int(day))
    except ValueError:
        raise CommandError("invalid date") from None


def parse_date_time(text: bytes) -> datetime:
    match = _DATE_TIME.match(text.decode("ascii", "replace"))
    if match is None:
        raise CommandError('expected a date-time like "17-Jul-1996 02:44:25 -0700"')
    day, month, year, hh, mm, ss, sign, zh, zm = match.groups()
    offset = timedelta(hours=int(zh), minutes=int(zm))
    try:
        return datetime(
            int(year),
            _month(month),
            int(day),
            int(hh),
            int(mm),
            int(ss),
            tzinfo=timezone(-offset if sign == "-" else offset),
        )
    except ValueError:
        raise CommandError("invalid date-time") from None
