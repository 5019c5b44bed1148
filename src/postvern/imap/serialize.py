"""IMAP responses (RFC 9051 §7): typed objects the session builds, and their wire form.

Tagged completions (:class:`Completion`), untagged status (:class:`Condition`), continuation
requests and one ``…Data`` class per kind of untagged server data. Every class renders itself
with :meth:`Response.to_bytes`; strings are quoted or sent as literals by :mod:`.wire`, and
mailbox names are spelled for the client (UTF-8 or modified UTF-7).
"""

from __future__ import annotations

import base64
import enum
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from postvern.imap.sequence import SequenceSet, format_numbers
from postvern.imap.structure import body_value, envelope_value
from postvern.imap.wire import (
    CRLF,
    Atom,
    Binary,
    Joined,
    Mailbox,
    WireContext,
    write_spaced,
)
from postvern.mime.model import BodyPart, Envelope


class Status(enum.StrEnum):
    OK = "OK"
    NO = "NO"
    BAD = "BAD"
    BYE = "BYE"
    PREAUTH = "PREAUTH"


class Code(enum.StrEnum):
    """Response codes: RFC 9051 §7.1 and those of the extensions the server speaks."""

    ALERT = "ALERT"
    ALREADYEXISTS = "ALREADYEXISTS"
    APPENDUID = "APPENDUID"  # RFC 4315
    AUTHENTICATIONFAILED = "AUTHENTICATIONFAILED"
    AUTHORIZATIONFAILED = "AUTHORIZATIONFAILED"
    BADCHARSET = "BADCHARSET"
    CANNOT = "CANNOT"
    CAPABILITY = "CAPABILITY"
    CLIENTBUG = "CLIENTBUG"
    CLOSED = "CLOSED"
    COMPRESSIONACTIVE = "COMPRESSIONACTIVE"  # RFC 4978
    CONTACTADMIN = "CONTACTADMIN"
    COPYUID = "COPYUID"  # RFC 4315
    CORRUPTION = "CORRUPTION"
    EXPIRED = "EXPIRED"
    EXPUNGEISSUED = "EXPUNGEISSUED"
    HASCHILDREN = "HASCHILDREN"
    HIGHESTMODSEQ = "HIGHESTMODSEQ"  # RFC 7162
    INUSE = "INUSE"
    LIMIT = "LIMIT"
    MODIFIED = "MODIFIED"  # RFC 7162
    NOMODSEQ = "NOMODSEQ"  # RFC 7162
    NONEXISTENT = "NONEXISTENT"
    NOPERM = "NOPERM"
    OVERQUOTA = "OVERQUOTA"
    PARSE = "PARSE"
    PERMANENTFLAGS = "PERMANENTFLAGS"
    PRIVACYREQUIRED = "PRIVACYREQUIRED"
    READ_ONLY = "READ-ONLY"
    READ_WRITE = "READ-WRITE"
    SERVERBUG = "SERVERBUG"
    TOOBIG = "TOOBIG"  # RFC 4469, RFC 7889
    TRYCREATE = "TRYCREATE"
    UIDNEXT = "UIDNEXT"
    UIDNOTSTICKY = "UIDNOTSTICKY"
    UIDVALIDITY = "UIDVALIDITY"
    UNAVAILABLE = "UNAVAILABLE"
    UNKNOWN_CTE = "UNKNOWN-CTE"  # RFC 3516


def _numbers(values: Iterable[int] | SequenceSet | str, *, sort: bool = False) -> Atom:
    if isinstance(values, SequenceSet | str):
        return Atom(str(values))
    return Atom(format_numbers(values, sort=sort))


@dataclass(frozen=True, slots=True)
class ResponseCode:
    """``[NAME data…]``; build the common ones with the class methods."""

    name: str
    data: tuple[object, ...] = ()

    @classmethod
    def capability(cls, capabilities: Iterable[str]) -> ResponseCode:
        return _capability_code(tuple(capabilities))

    @classmethod
    def permanent_flags(cls, flags: Iterable[str]) -> ResponseCode:
        return cls(Code.PERMANENTFLAGS, ([Atom(f) for f in flags],))

    @classmethod
    def uidnext(cls, uid: int) -> ResponseCode:
        return cls(Code.UIDNEXT, (uid,))

    @classmethod
    def uidvalidity(cls, value: int) -> ResponseCode:
        return cls(Code.UIDVALIDITY, (value,))

    @classmethod
    def highest_modseq(cls, modseq: int) -> ResponseCode:
        return cls(Code.HIGHESTMODSEQ, (modseq,))

    @classmethod
    def appenduid(cls, uidvalidity: int, uids: Iterable[int]) -> ResponseCode:
        return cls(Code.APPENDUID, (uidvalidity, _numbers(uids)))

    @classmethod
    def copyuid(
        cls, uidvalidity: int, source: Iterable[int], destination: Iterable[int]
    ) -> ResponseCode:
        """RFC 4315 §3: the n-th source UID became the n-th destination UID (order kept)."""
        return cls(Code.COPYUID, (uidvalidity, _numbers(source), _numbers(destination)))

    @classmethod
    def modified(cls, numbers: Iterable[int]) -> ResponseCode:
        return cls(Code.MODIFIED, (_numbers(numbers, sort=True),))

    @classmethod
    def badcharset(cls, charsets: Iterable[str]) -> ResponseCode:
        return cls(Code.BADCHARSET, ([Atom(c) for c in charsets],))

    @classmethod
    def from_pair(cls, pair: tuple[str, str | None]) -> ResponseCode:
        """A code as the grammar and framer report it: (atom, raw data or None)."""
        name, raw = pair
        return cls(name, () if raw is None else (Atom(raw),))

    def write(self, out: bytearray, ctx: WireContext) -> None:
        out += b"[" + str(self.name).encode("ascii")
        if self.data:
            out += b" "
            write_spaced(self.data, out, ctx)
        out += b"]"


@functools.lru_cache(maxsize=32)
def _capability_code(capabilities: tuple[str, ...]) -> ResponseCode:
    """One atom of the whole list, made once: every greeting and every login carries one of
    a few such lists, and writing thirty atoms one by one was a tenth of a warm login."""
    return ResponseCode(Code.CAPABILITY, (Atom(" ".join(capabilities)),))


# RFC 9051 text = 1*TEXT-CHAR: CR, LF and NUL become spaces.
_NOT_TEXT = str.maketrans("\r\n\x00", "   ")


def _clean_text(text: str, default: str) -> bytes:
    """RFC 9051 text = 1*TEXT-CHAR: no CR, LF or NUL, and never empty."""
    cleaned = text.translate(_NOT_TEXT).strip() or default
    return cleaned.encode("utf-8", "replace")


class Response:
    """Anything the server sends; :meth:`to_bytes` gives the wire form including CRLF."""

    def write(self, out: bytearray, ctx: WireContext) -> None:
        raise NotImplementedError

    def to_bytes(self, ctx: WireContext | None = None) -> bytes:
        out = bytearray()
        self.write(out, ctx or WireContext())
        return bytes(out)


def _write_status(
    out: bytearray,
    status: str,
    code: ResponseCode | None,
    text: str,
    ctx: WireContext,
) -> None:
    out += status.encode("ascii") + b" "
    if code is not None:
        code.write(out, ctx)
        out += b" "
    out += _clean_text(text, status) + CRLF


@dataclass(frozen=True, slots=True)
class Completion(Response):
    """The tagged OK/NO/BAD that ends a command."""

    tag: str
    status: Status
    text: str = ""
    code: ResponseCode | None = None

    @classmethod
    def ok(cls, tag: str, text: str = "", code: ResponseCode | None = None) -> Completion:
        return cls(tag, Status.OK, text or "completed", code)

    @classmethod
    def no(cls, tag: str, text: str = "", code: ResponseCode | None = None) -> Completion:
        return cls(tag, Status.NO, text or "failed", code)

    @classmethod
    def bad(cls, tag: str, text: str = "", code: ResponseCode | None = None) -> Completion:
        return cls(tag, Status.BAD, text or "invalid command", code)

    def write(self, out: bytearray, ctx: WireContext) -> None:
        out += self.tag.encode("ascii") + b" "
        _write_status(out, self.status, self.code, self.text, ctx)


@dataclass(frozen=True, slots=True)
class Condition(Response):
    """Untagged OK/NO/BAD/PREAUTH/BYE (RFC 9051 §7.1)."""

    status: Status
    text: str = ""
    code: ResponseCode | None = None

    def write(self, out: bytearray, ctx: WireContext) -> None:
        out += b"* "
        _write_status(out, self.status, self.code, self.text, ctx)


@dataclass(frozen=True, slots=True)
class Continuation(Response):
    """``+ text`` (literal go-ahead, IDLE) or ``+ base64`` (a SASL challenge)."""

    text: str = ""
    challenge: bytes | None = None

    def write(self, out: bytearray, ctx: WireContext) -> None:
        if self.challenge is not None:
            out += b"+ " + base64.b64encode(self.challenge) + CRLF
        else:
            out += b"+ " + _clean_text(self.text, "").strip() + CRLF


class _Untagged(Response):
    """Untagged data: ``* `` then values separated by spaces."""

    def values(self) -> list[object]:
        raise NotImplementedError

    def write(self, out: bytearray, ctx: WireContext) -> None:
        out += b"* "
        write_spaced(self.values(), out, ctx)
        out += CRLF


@dataclass(frozen=True, slots=True)
class ExistsData(_Untagged):
    count: int

    def values(self) -> list[object]:
        return [self.count, Atom("EXISTS")]


@dataclass(frozen=True, slots=True)
class RecentData(_Untagged):
    """RFC 3501 only; IMAP4rev2 has no RECENT."""

    count: int

    def values(self) -> list[object]:
        return [self.count, Atom("RECENT")]


@dataclass(frozen=True, slots=True)
class ExpungeData(_Untagged):
    number: int

    def values(self) -> list[object]:
        return [self.number, Atom("EXPUNGE")]


@dataclass(frozen=True, slots=True)
class VanishedData(_Untagged):
    """RFC 7162 §3.2.10: ``* VANISHED [(EARLIER)] uid-set``."""

    uids: Iterable[int] | SequenceSet | str
    earlier: bool = False

    def values(self) -> list[object]:
        head: list[object] = [Atom("VANISHED")]
        if self.earlier:
            head.append([Atom("EARLIER")])
        return [*head, _numbers(self.uids, sort=True)]


@dataclass(frozen=True, slots=True)
class FlagsData(_Untagged):
    flags: Sequence[str]

    def values(self) -> list[object]:
        return [Atom("FLAGS"), [Atom(f) for f in self.flags]]


@dataclass(frozen=True, slots=True)
class CapabilityData(_Untagged):
    capabilities: Sequence[str]

    def values(self) -> list[object]:
        return [Atom("CAPABILITY"), *(Atom(c) for c in self.capabilities)]


@dataclass(frozen=True, slots=True)
class EnabledData(_Untagged):
    capabilities: Sequence[str]

    def values(self) -> list[object]:
        return [Atom("ENABLED"), *(Atom(c) for c in self.capabilities)]


@dataclass(frozen=True, slots=True)
class ListData(_Untagged):
    """LIST (or LSUB) data. ``childinfo`` is RFC 5258 CHILDINFO, ``old_name`` RFC 5465 OLDNAME."""

    mailbox: str
    attributes: Sequence[str] = ()
    delimiter: str | None = "/"
    childinfo: Sequence[str] = ()
    old_name: str | None = None
    lsub: bool = False

    def values(self) -> list[object]:
        items: list[object] = [
            Atom("LSUB" if self.lsub else "LIST"),
            [Atom(a) for a in self.attributes],
            self.delimiter,
            Mailbox(self.mailbox),
        ]
        extended: list[object] = []
        if self.childinfo:
            extended += ["CHILDINFO", [str(c) for c in self.childinfo]]
        if self.old_name is not None:
            extended += ["OLDNAME", [Mailbox(self.old_name)]]
        if extended:
            items.append(extended)
        return items


@dataclass(frozen=True, slots=True)
class StatusData(_Untagged):
    mailbox: str
    items: Sequence[tuple[str, int]]

    def values(self) -> list[object]:
        flat: list[object] = []
        for name, value in self.items:
            flat += [Atom(name), value]
        return [Atom("STATUS"), Mailbox(self.mailbox), flat]


@dataclass(frozen=True, slots=True)
class SearchData(_Untagged):
    """RFC 3501 ``* SEARCH n…``, with RFC 7162 ``(MODSEQ n)`` when asked for."""

    numbers: Sequence[int]
    modseq: int | None = None

    def values(self) -> list[object]:
        items: list[object] = [Atom("SEARCH"), *self.numbers]
        if self.modseq is not None:
            items.append([Atom("MODSEQ"), self.modseq])
        return items


@dataclass(frozen=True, slots=True)
class SortData(_Untagged):
    """RFC 5256 ``* SORT n…`` (message order matters: it is the answer)."""

    numbers: Sequence[int]
    modseq: int | None = None

    def values(self) -> list[object]:
        items: list[object] = [Atom("SORT"), *self.numbers]
        if self.modseq is not None:
            items.append([Atom("MODSEQ"), self.modseq])
        return items


@dataclass(frozen=True, slots=True)
class ESearchData(_Untagged):
    """RFC 4731 / RFC 9051 §7.3.4: ``* ESEARCH (TAG "t") [UID] MIN… MAX… COUNT… ALL…``.

    Fields left None are omitted; ALL is omitted when empty, as RFC 4731 §3.1 requires.
    """

    tag: str | None
    uid: bool = False
    min: int | None = None
    max: int | None = None
    count: int | None = None
    all: Sequence[int] | None = None
    modseq: int | None = None

    def values(self) -> list[object]:
        items: list[object] = [Atom("ESEARCH")]
        if self.tag is not None:
            items.append([Atom("TAG"), self.tag])
        if self.uid:
            items.append(Atom("UID"))
        for name, value in (("MIN", self.min), ("MAX", self.max), ("COUNT", self.count)):
            if value is not None:
                items += [Atom(name), value]
        if self.all:
            items += [Atom("ALL"), _numbers(self.all, sort=True)]
        if self.modseq is not None:
            items += [Atom("MODSEQ"), self.modseq]
        return items


@dataclass(slots=True)
class ThreadNode:
    """A message in a thread (``number`` None for a missing parent, RFC 5256 §4)."""

    number: int | None
    children: list[ThreadNode] = field(default_factory=list)


def _thread_chain(node: ThreadNode) -> str:
    """RFC 5256 §4: a single child continues the list; several are parenthesized each."""
    head = "" if node.number is None else str(node.number)
    if len(node.children) == 1 and node.number is not None:
        return f"{head} {_thread_chain(node.children[0])}"
    branches = "".join(f"({_thread_chain(child)})" for child in node.children)
    if not branches:
        return head
    return f"{head} {branches}" if head else branches


@dataclass(frozen=True, slots=True)
class ThreadData(_Untagged):
    threads: Sequence[ThreadNode]

    def values(self) -> list[object]:
        text = "".join(f"({_thread_chain(root)})" for root in self.threads)
        return [Atom("THREAD"), Atom(text)] if text else [Atom("THREAD")]


@dataclass(frozen=True, slots=True)
class NamespaceData(_Untagged):
    """RFC 2342: personal, other users' and shared namespaces, each [(prefix, delimiter)]."""

    personal: Sequence[tuple[str, str | None]] | None = (("", "/"),)
    other: Sequence[tuple[str, str | None]] | None = None
    shared: Sequence[tuple[str, str | None]] | None = None

    def values(self) -> list[object]:
        def spaces(items: Sequence[tuple[str, str | None]] | None) -> object:
            # RFC 2342 §5: "(" 1*( "(" prefix SP delimiter ")" ) ")" — no space between.
            return None if not items else [Joined([[Mailbox(p), d] for p, d in items])]

        return [Atom("NAMESPACE"), spaces(self.personal), spaces(self.other), spaces(self.shared)]


@dataclass(frozen=True, slots=True)
class QuotaData(_Untagged):
    """RFC 9208 §5.1: ``* QUOTA root (RESOURCE usage limit …)``."""

    root: str
    resources: Sequence[tuple[str, int, int]]

    def values(self) -> list[object]:
        flat: list[object] = []
        for name, usage, limit in self.resources:
            flat += [Atom(name), usage, limit]
        return [Atom("QUOTA"), self.root, flat]


@dataclass(frozen=True, slots=True)
class QuotaRootData(_Untagged):
    mailbox: str
    roots: Sequence[str]

    def values(self) -> list[object]:
        return [Atom("QUOTAROOT"), Mailbox(self.mailbox), *self.roots]


@dataclass(frozen=True, slots=True)
class IdData(_Untagged):
    """RFC 2971: ``* ID ("name" "Postvern" …)`` or ``* ID NIL``."""

    parameters: Sequence[tuple[str, str | None]] | None

    def values(self) -> list[object]:
        if not self.parameters:
            return [Atom("ID"), None]
        flat: list[object] = []
        for name, value in self.parameters:
            flat += [name, value]
        return [Atom("ID"), flat]


def _fetch_value(name: str, value: object) -> object:
    """The wire value of one FETCH item, chosen by the item's name (RFC 9051 §7.5.2)."""
    upper = name.upper()
    if upper == "FLAGS":
        assert isinstance(value, Iterable)
        return [Atom(f) for f in value]
    if upper == "MODSEQ":
        return [value]
    if upper == "ENVELOPE" and isinstance(value, Envelope):
        return envelope_value(value)
    if upper in ("BODY", "BODYSTRUCTURE") and isinstance(value, BodyPart):
        return body_value(value, extensible=upper == "BODYSTRUCTURE")
    if upper.startswith("BINARY[") and isinstance(value, bytes | bytearray | memoryview):
        return Binary(bytes(value))
    if isinstance(value, datetime) or value is None:
        return value
    return value


@dataclass(frozen=True, slots=True)
class FetchData(_Untagged):
    """``* n FETCH (name value …)``: ``items`` pairs a response name (see
    :attr:`postvern.imap.grammar.commands.FetchItem.response_name`) with its value:
    flags as strings, INTERNALDATE a datetime, ENVELOPE an Envelope, BODY/BODYSTRUCTURE a
    BodyPart, sections bytes (or None for NIL), sizes, UID and MODSEQ ints."""

    number: int
    items: Sequence[tuple[str, object]]

    def values(self) -> list[object]:
        flat: list[object] = []
        for name, value in self.items:
            flat += [Atom(name), _fetch_value(name, value)]
        return [self.number, Atom("FETCH"), flat]


def serialize(response: Response, ctx: WireContext | None = None) -> bytes:
    return response.to_bytes(ctx)
