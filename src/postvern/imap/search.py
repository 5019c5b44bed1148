"""SEARCH criteria (RFC 9051 §6.4.4): a tree of keys the session evaluates per message.

The grammar is recursive (parentheses, NOT, OR), so nesting depth is counted while parsing and
refused before a deep tree is built: a client cannot make the server recurse without bound.
FROM/TO/CC/BCC/SUBJECT become header tests, NEW and OLD become the flag tests they stand for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date

from postvern.config import Limits
from postvern.imap.grammar.lexer import MAX_NUMBER64, CommandError, Reader
from postvern.imap.sequence import SequenceSet

# Each "(", NOT and OR is one level; 32 covers every real client query (Thunderbird's deepest
# saved searches are under 10 levels) while bounding recursion. From config.Limits.search_depth.
DEFAULT_MAX_DEPTH = Limits().search_depth
# RFC 5032 WITHIN: OLDER/YOUNGER take an interval in seconds (nz-number).
_INTERVAL_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class All:
    """ALL: every message."""


@dataclass(frozen=True, slots=True)
class FlagTest:
    """ANSWERED/UNANSWERED, SEEN, KEYWORD x…: ``flag`` is set (``present``) or not."""

    flag: str
    present: bool = True


@dataclass(frozen=True, slots=True)
class HeaderContains:
    """HEADER name value, and FROM/TO/CC/BCC/SUBJECT; an empty value tests presence."""

    field: str
    value: str


@dataclass(frozen=True, slots=True)
class TextContains:
    """BODY (``headers`` False) or TEXT (header and body)."""

    value: str
    headers: bool = False


@dataclass(frozen=True, slots=True)
class DateTest:
    """BEFORE/ON/SINCE (internal date) or SENTBEFORE/SENTON/SENTSINCE (Date: header)."""

    relation: str  # "BEFORE", "ON" or "SINCE"
    value: date
    sent: bool = False


@dataclass(frozen=True, slots=True)
class SizeTest:
    """LARGER n (``larger``) or SMALLER n, on RFC822.SIZE."""

    size: int
    larger: bool


@dataclass(frozen=True, slots=True)
class SequenceTest:
    """A message-number set, or ``UID set``."""

    sequence: SequenceSet
    uid: bool = False


@dataclass(frozen=True, slots=True)
class ModSeqTest:
    """RFC 7162 §3.1.5 MODSEQ: messages whose mod-sequence is at least ``modseq``."""

    modseq: int
    entry: str | None = None  # e.g. "/flags/\\Seen"
    entry_type: str | None = None  # "priv", "shared" or "all"


@dataclass(frozen=True, slots=True)
class AgeTest:
    """RFC 5032 OLDER/YOUNGER: internal date more (``older``) or less than ``seconds`` ago."""

    seconds: int
    older: bool


@dataclass(frozen=True, slots=True)
class Not:
    key: SearchKey


@dataclass(frozen=True, slots=True)
class Or:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class And:
    keys: tuple[SearchKey, ...]


SearchKey = (
    All
    | FlagTest
    | HeaderContains
    | TextContains
    | DateTest
    | SizeTest
    | SequenceTest
    | ModSeqTest
    | AgeTest
    | Not
    | Or
    | And
)

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "RECENT": ("\\Recent", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = frozenset({"BCC", "CC", "FROM", "SUBJECT", "TO"})
_DATE_KEYS = {
    "BEFORE": ("BEFORE", False),
    "ON": ("ON", False),
    "SINCE": ("SINCE", False),
    "SENTBEFORE": ("BEFORE", True),
    "SENTON": ("ON", True),
    "SENTSINCE": ("SINCE", True),
}
_ENTRY_TYPES = frozenset({"PRIV", "SHARED", "ALL"})


class SearchTooDeep(CommandError):
    """The criteria nest deeper than the configured limit."""


class _SearchParser:
    def __init__(self, reader: Reader, decode: Callable[[bytes], str], max_depth: int) -> None:
        self.reader = reader
        self.decode = decode
        self.max_depth = max_depth

    def keys_until_end(self) -> SearchKey:
        keys = [self.key(1)]
        while not self.reader.at_end():
            self.reader.sp()
            keys.append(self.key(1))
        return keys[0] if len(keys) == 1 else And(tuple(keys))

    def key(self, depth: int) -> SearchKey:
        if depth > self.max_depth:
            raise SearchTooDeep(f"search criteria nested deeper than {self.max_depth} levels")
        reader = self.reader
        char = reader.peek()
        if char == ord("("):
            return self.group(depth + 1)
        if char is not None and char in b"0123456789*$":
            return SequenceTest(reader.sequence_set())
        word = reader.keyword()
        if word in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[word]
            return FlagTest(flag, present)
        if word in _HEADER_KEYS:
            reader.sp()
            return HeaderContains(word, self.text())
        if word in _DATE_KEYS:
            relation, sent = _DATE_KEYS[word]
            reader.sp()
            return DateTest(relation, reader.date(), sent)
        return self.other(word, depth)

    def other(self, word: str, depth: int) -> SearchKey:
        reader = self.reader
        if word == "ALL":
            return All()
        if word == "NEW":  # RFC 3501: RECENT UNSEEN
            return And((FlagTest("\\Recent"), FlagTest("\\Seen", False)))
        if word == "OLD":  # RFC 3501: NOT RECENT
            return FlagTest("\\Recent", False)
        if word == "NOT":
            reader.sp()
            return Not(self.key(depth + 1))
        if word == "OR":
            reader.sp()
            left = self.key(depth + 1)
            reader.sp()
            return Or(left, self.key(depth + 1))
        reader.sp()
        if word in ("KEYWORD", "UNKEYWORD"):
            return FlagTest(reader.flag(), word == "KEYWORD")
        if word == "HEADER":
            name = self.text()
            reader.sp()
            return HeaderContains(name.upper(), self.text())
        if word in ("BODY", "TEXT"):
            return TextContains(self.text(), word == "TEXT")
        if word in ("LARGER", "SMALLER"):
            return SizeTest(reader.number64("a size"), word == "LARGER")
        if word == "UID":
            return SequenceTest(reader.sequence_set(), uid=True)
        if word in ("OLDER", "YOUNGER"):
            seconds = reader.number(_INTERVAL_MAX, "an interval")
            if seconds == 0:
                raise CommandError("interval must not be zero")
            return AgeTest(seconds, word == "OLDER")
        if word == "MODSEQ":
            return self.modseq()
        raise CommandError(f"unknown search key {word[:32]}")

    def group(self, depth: int) -> SearchKey:
        reader = self.reader
        reader.open_paren()
        keys = [self.key(depth)]
        while not reader.take(b")"):
            reader.sp()
            keys.append(self.key(depth))
        return keys[0] if len(keys) == 1 else And(tuple(keys))

    def modseq(self) -> SearchKey:
        reader = self.reader
        entry = entry_type = None
        if reader.peek() == ord('"'):
            entry = reader.quoted().decode("ascii", "replace")
            if not entry.lower().startswith("/flags/"):
                raise CommandError("MODSEQ entry name must be /flags/<flag>")
            reader.sp()
            entry_type = reader.keyword()
            if entry_type not in _ENTRY_TYPES:
                raise CommandError("MODSEQ entry type must be priv, shared or all")
            entry_type = entry_type.lower()
            reader.sp()
        return ModSeqTest(reader.number(MAX_NUMBER64, "a mod-sequence"), entry, entry_type)

    def text(self) -> str:
        return self.decode(self.reader.astring())


def parse_search(
    reader: Reader, decode: Callable[[bytes], str], *, max_depth: int = DEFAULT_MAX_DEPTH
) -> SearchKey:
    """Read ``1*(SP search-key)`` up to the end of the command (the leading SP is consumed)."""
    reader.sp()
    return _SearchParser(reader, decode, max_depth).keys_until_end()


def walk(key: SearchKey) -> Iterator[SearchKey]:
    """Every key in the tree, depth first (the tree is bounded by the parse depth)."""
    yield key
    if isinstance(key, Not):
        yield from walk(key.key)
    elif isinstance(key, Or):
        yield from walk(key.left)
        yield from walk(key.right)
    elif isinstance(key, And):
        for sub in key.keys:
            yield from walk(sub)
