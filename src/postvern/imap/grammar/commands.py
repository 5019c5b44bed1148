"""Typed IMAP commands: what a client asked for, with every argument parsed and checked.

One class per command of RFC 9051 and the extensions the server speaks (CONDSTORE/QRESYNC,
LIST-EXTENDED, ESEARCH, SORT/THREAD, QUOTA, ID, COMPRESS, BINARY, MULTIAPPEND). UID variants
are the same class with ``uid=True``. Mailbox names are decoded (UTF-8 or modified UTF-7, INBOX
normalised); the session never sees the wire spelling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from postvern.imap.search import SearchKey
from postvern.imap.sequence import SequenceSet

__all__ = [
    "Append",
    "AppendMessage",
    "Authenticate",
    "Capability",
    "Check",
    "Close",
    "Command",
    "Compress",
    "Copy",
    "Create",
    "Delete",
    "Enable",
    "Examine",
    "Expunge",
    "Fetch",
    "FetchItem",
    "GetQuota",
    "GetQuotaRoot",
    "Id",
    "Idle",
    "List",
    "Login",
    "Logout",
    "Lsub",
    "Move",
    "Namespace",
    "Noop",
    "PlainCredentials",
    "QResyncParams",
    "Rename",
    "Search",
    "Section",
    "Select",
    "SetQuota",
    "Sort",
    "SortCriterion",
    "StartTLS",
    "Status",
    "Store",
    "StoreAction",
    "Subscribe",
    "Thread",
    "Unselect",
    "Unsubscribe",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    tag: str
    NAME: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return self.NAME


@dataclass(frozen=True, slots=True, kw_only=True)
class UidCommand(Command):
    uid: bool = False

    @property
    def name(self) -> str:
        return f"UID {self.NAME}" if self.uid else self.NAME


# -- any state ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Capability(Command):
    NAME: ClassVar[str] = "CAPABILITY"


@dataclass(frozen=True, slots=True, kw_only=True)
class Noop(Command):
    NAME: ClassVar[str] = "NOOP"


@dataclass(frozen=True, slots=True, kw_only=True)
class Logout(Command):
    NAME: ClassVar[str] = "LOGOUT"


@dataclass(frozen=True, slots=True, kw_only=True)
class Id(Command):
    """RFC 2971: the client's identification, ``None`` for ``ID NIL``."""

    NAME: ClassVar[str] = "ID"
    parameters: tuple[tuple[str, str | None], ...] | None = None


# -- not authenticated ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTLS(Command):
    NAME: ClassVar[str] = "STARTTLS"


@dataclass(frozen=True, slots=True, kw_only=True)
class PlainCredentials:
    """RFC 4616 PLAIN: authorization identity (may be empty), user name and password."""

    authzid: str
    authcid: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Authenticate(Command):
    """AUTHENTICATE; the protocol core runs the exchange and fills ``credentials`` for PLAIN."""

    NAME: ClassVar[str] = "AUTHENTICATE"
    mechanism: str
    initial_response: bytes | None = field(default=None, repr=False)  # RFC 4959 SASL-IR
    credentials: PlainCredentials | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Login(Command):
    NAME: ClassVar[str] = "LOGIN"
    username: str
    password: str = field(repr=False)


# -- authenticated --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Enable(Command):
    """RFC 5161; the core answers it and records what is enabled."""

    NAME: ClassVar[str] = "ENABLE"
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class QResyncParams:
    """RFC 7162 §3.2.5: ``QRESYNC (uidvalidity modseq [known-uids [seq-match-data]])``."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    known_sequences: SequenceSet | None = None  # seq-match-data: message numbers…
    known_sequence_uids: SequenceSet | None = None  # …and the UIDs they had


@dataclass(frozen=True, slots=True, kw_only=True)
class Select(Command):
    NAME: ClassVar[str] = "SELECT"
    mailbox: str
    read_only: bool = False  # EXAMINE
    condstore: bool = False  # RFC 7162 §3.1.8 SELECT (CONDSTORE)
    qresync: QResyncParams | None = None

    @property
    def name(self) -> str:
        return "EXAMINE" if self.read_only else "SELECT"


Examine = Select  # EXAMINE is SELECT with read_only=True


@dataclass(frozen=True, slots=True, kw_only=True)
class Create(Command):
    NAME: ClassVar[str] = "CREATE"
    mailbox: str
    special_use: tuple[str, ...] = ()  # RFC 6154 CREATE-SPECIAL-USE: CREATE x (USE (\Sent))


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete(Command):
    NAME: ClassVar[str] = "DELETE"
    mailbox: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Rename(Command):
    NAME: ClassVar[str] = "RENAME"
    mailbox: str
    new_name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe(Command):
    NAME: ClassVar[str] = "SUBSCRIBE"
    mailbox: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe(Command):
    NAME: ClassVar[str] = "UNSUBSCRIBE"
    mailbox: str


@dataclass(frozen=True, slots=True, kw_only=True)
class List(Command):
    """LIST, with RFC 5258 LIST-EXTENDED, RFC 5819 LIST-STATUS and RFC 6154 SPECIAL-USE.

    ``selection`` holds SUBSCRIBED / REMOTE / RECURSIVEMATCH / SPECIAL-USE; the ``return_*``
    fields are the RETURN options. ``return_status`` is the STATUS item list, or None.
    """

    NAME: ClassVar[str] = "LIST"
    reference: str
    patterns: tuple[str, ...]
    selection: frozenset[str] = frozenset()
    return_subscribed: bool = False
    return_children: bool = False
    return_special_use: bool = False
    return_status: tuple[str, ...] | None = None
    extended: bool = False  # the client used LIST-EXTENDED syntax (answers may carry CHILDINFO)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lsub(Command):
    NAME: ClassVar[str] = "LSUB"
    reference: str
    pattern: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Namespace(Command):
    NAME: ClassVar[str] = "NAMESPACE"


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Command):
    NAME: ClassVar[str] = "STATUS"
    mailbox: str
    items: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendMessage:
    """One message of an APPEND (RFC 3502 MULTIAPPEND sends several)."""

    data: bytes = field(repr=False)
    flags: tuple[str, ...] = ()
    internal_date: datetime | None = None
    binary: bool = False  # sent as literal8 (RFC 3516): may hold NUL, no CTE needed
    utf8: bool = False  # RFC 6855 "UTF8 (literal8)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Append(Command):
    NAME: ClassVar[str] = "APPEND"
    mailbox: str
    messages: tuple[AppendMessage, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Idle(Command):
    NAME: ClassVar[str] = "IDLE"


@dataclass(frozen=True, slots=True, kw_only=True)
class GetQuota(Command):
    NAME: ClassVar[str] = "GETQUOTA"
    root: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GetQuotaRoot(Command):
    NAME: ClassVar[str] = "GETQUOTAROOT"
    mailbox: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetQuota(Command):
    NAME: ClassVar[str] = "SETQUOTA"
    root: str
    limits: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Compress(Command):
    NAME: ClassVar[str] = "COMPRESS"
    mechanism: str


# -- selected -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Check(Command):
    NAME: ClassVar[str] = "CHECK"


@dataclass(frozen=True, slots=True, kw_only=True)
class Close(Command):
    NAME: ClassVar[str] = "CLOSE"


@dataclass(frozen=True, slots=True, kw_only=True)
class Unselect(Command):
    NAME: ClassVar[str] = "UNSELECT"


@dataclass(frozen=True, slots=True, kw_only=True)
class Expunge(Command):
    """EXPUNGE, or UID EXPUNGE (RFC 4315) when ``uids`` is given."""

    NAME: ClassVar[str] = "EXPUNGE"
    uids: SequenceSet | None = None

    @property
    def name(self) -> str:
        return "UID EXPUNGE" if self.uids is not None else "EXPUNGE"


@dataclass(frozen=True, slots=True, kw_only=True)
class Search(UidCommand):
    """SEARCH. ``return_options`` is None for the RFC 3501 form, a tuple for ESEARCH
    (RFC 4731/9051: an empty ``RETURN ()`` means ALL, kept as ``("ALL",)``)."""

    NAME: ClassVar[str] = "SEARCH"
    criteria: SearchKey
    charset: str | None = None
    return_options: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Section:
    """A BODY/BINARY section: part numbers and what of the part (RFC 9051 §6.4.5).

    ``specifier`` is None (the whole part), HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT or
    MIME; ``fields`` the header names for HEADER.FIELDS[.NOT].
    """

    part: tuple[int, ...] = ()
    specifier: str | None = None
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        items = [str(n) for n in self.part]
        if self.specifier:
            items.append(self.specifier)
        text = ".".join(items)
        if self.fields:
            text += " (" + " ".join(self.fields) + ")"
        return text


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchItem:
    """One fetch-att. ``name`` is ENVELOPE, FLAGS, INTERNALDATE, RFC822, RFC822.HEADER,
    RFC822.TEXT, RFC822.SIZE, BODY, BODYSTRUCTURE, UID, MODSEQ, BINARY or BINARY.SIZE; BODY and
    BINARY carry a ``section`` when written with brackets. ``partial`` is (origin, count)."""

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False  # BODY.PEEK / BINARY.PEEK: do not set \Seen

    @property
    def response_name(self) -> str:
        """How the FETCH response names this item (RFC 9051 §7.5.2: ``<origin>`` only)."""
        if self.section is None:
            return self.name
        text = f"{self.name}[{self.section}]"
        if self.partial is not None:
            text += f"<{self.partial[0]}>"
        return text

    @property
    def sets_seen(self) -> bool:
        """RFC 9051 §6.4.5: BODY[...], BINARY[...], RFC822 and RFC822.TEXT set \\Seen."""
        if self.peek:
            return False
        if self.name in ("BODY", "BINARY"):
            return self.section is not None
        return self.name in ("RFC822", "RFC822.TEXT")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetch(UidCommand):
    NAME: ClassVar[str] = "FETCH"
    sequence: SequenceSet
    items: tuple[FetchItem, ...]
    changed_since: int | None = None  # RFC 7162 CHANGEDSINCE
    vanished: bool = False  # RFC 7162 §3.2.6 VANISHED (UID FETCH only)


class StoreAction(enum.Enum):
    REPLACE = ""
    ADD = "+"
    REMOVE = "-"


@dataclass(frozen=True, slots=True, kw_only=True)
class Store(UidCommand):
    NAME: ClassVar[str] = "STORE"
    sequence: SequenceSet
    action: StoreAction
    flags: tuple[str, ...]
    silent: bool = False
    unchanged_since: int | None = None  # RFC 7162 UNCHANGEDSINCE


@dataclass(frozen=True, slots=True, kw_only=True)
class Copy(UidCommand):
    NAME: ClassVar[str] = "COPY"
    sequence: SequenceSet
    mailbox: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Move(UidCommand):
    NAME: ClassVar[str] = "MOVE"
    sequence: SequenceSet
    mailbox: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SortCriterion:
    """RFC 5256 sort-key (ARRIVAL CC DATE FROM SIZE SUBJECT TO; RFC 5957 DISPLAYFROM/TO)."""

    key: str
    reverse: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Sort(UidCommand):
    NAME: ClassVar[str] = "SORT"
    criteria: tuple[SortCriterion, ...]
    charset: str
    search: SearchKey


@dataclass(frozen=True, slots=True, kw_only=True)
class Thread(UidCommand):
    NAME: ClassVar[str] = "THREAD"
    algorithm: str  # REFERENCES or ORDEREDSUBJECT
    charset: str
    search: SearchKey
