"""The command rules of RFC 9051 §9 and its extensions: a framed command in, a typed one out.

:func:`split_head` reads only the tag and command name (enough to check the state before any
argument is parsed, and to answer a refused literal with the right tag); :func:`parse_command`
reads the whole command. Both report malformed input as :class:`CommandError`, never by
raising anything else.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass

from postvern.imap import utf7
from postvern.imap.grammar import commands as c
from postvern.imap.grammar.lexer import (
    ATOM_CHARS,
    MAX_NUMBER64,
    TAG_CHARS,
    CommandError,
    RawCommand,
    Reader,
)
from postvern.imap.search import DEFAULT_MAX_DEPTH, parse_search

HIERARCHY_DELIMITER = "/"
INBOX = "INBOX"

# RFC 2971 §3.3: field ≤ 30 octets, value ≤ 1024 octets, at most 30 pairs.
ID_MAX_FIELD = 30
ID_MAX_VALUE = 1024
ID_MAX_PAIRS = 30

SEARCH_CHARSETS = ("US-ASCII", "UTF-8")  # RFC 9051 §6.4.4: the two every server supports
STATUS_ITEMS = frozenset(
    {
        "MESSAGES",
        "UIDNEXT",
        "UIDVALIDITY",
        "UNSEEN",
        "DELETED",  # RFC 9051
        "SIZE",  # RFC 8438 STATUS=SIZE
        "HIGHESTMODSEQ",  # RFC 7162
        "RECENT",  # RFC 3501 only
        "APPENDLIMIT",  # RFC 7889
    }
)
LIST_SELECTION_OPTIONS = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
SEARCH_RETURN_OPTIONS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})
SORT_KEYS = frozenset(
    {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}
)
THREAD_ALGORITHMS = frozenset({"REFERENCES", "ORDEREDSUBJECT"})
SECTION_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})
FETCH_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
SIMPLE_FETCH_ITEMS = frozenset(
    {
        "ENVELOPE",
        "FLAGS",
        "INTERNALDATE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.SIZE",
        "RFC822.TEXT",
        "BODYSTRUCTURE",
        "UID",
        "MODSEQ",
    }
)
_FETCH_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")
_SECTION_CHARS = _FETCH_NAME_CHARS | frozenset(b"-")
_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_STORE_ITEM = re.compile(r"([+-]?)FLAGS(\.SILENT)?\Z")


@dataclass(frozen=True, slots=True)
class GrammarContext:
    """What the grammar needs to know about the connection."""

    utf8_names: bool = False  # IMAP4rev2 or UTF8=ACCEPT enabled: names are UTF-8, not mUTF-7
    qresync: bool = False  # RFC 7162 §3.2.3: QRESYNC enabled, so QRESYNC/VANISHED are valid
    max_search_depth: int = DEFAULT_MAX_DEPTH


@dataclass(frozen=True, slots=True)
class Head:
    """Tag and command name (``UID FETCH`` for UID commands); ``None`` where unreadable."""

    tag: str | None
    name: str | None


def split_head(line: bytes) -> Head:
    reader = Reader(RawCommand([line]))
    tag = reader.run(TAG_CHARS)
    if not tag or reader.peek() not in (None, ord(" ")):
        return Head(None, None)
    if not reader.take(b" "):
        return Head(tag.decode("ascii"), None)
    name = reader.run(ATOM_CHARS).decode("ascii").upper()
    if name == "UID" and reader.take(b" "):
        name = "UID " + reader.run(ATOM_CHARS).decode("ascii").upper()
    return Head(tag.decode("ascii"), name or None)


def parse_command(raw: RawCommand, context: GrammarContext | None = None) -> c.Command:
    """Build the typed command; raise :class:`CommandError` for anything malformed."""
    args = _Args(Reader(raw), context or GrammarContext())
    reader = args.reader
    tag = reader.run(TAG_CHARS)
    if not tag:
        raise CommandError("missing or invalid tag")
    args.tag = tag.decode("ascii")
    if reader.at_end():
        raise CommandError("missing command")
    reader.sp()
    name = reader.keyword()
    if name == "UID":
        reader.sp()
        name = reader.keyword()
        rule = _UID_RULES.get(name)
        args.uid = True
    else:
        rule = _RULES.get(name)
    if rule is None:
        raise CommandError(f"unknown command {name[:32]}")
    command = rule(args)
    reader.end()
    return command


# -- names ----------------------------------------------------------------------------------


def normalise_inbox(name: str) -> str:
    """RFC 9051 §5.1: INBOX is case-insensitive, and so is it as a hierarchy prefix."""
    head = name[: len(INBOX)]
    if head.upper() == INBOX and name[len(INBOX) : len(INBOX) + 1] in ("", HIERARCHY_DELIMITER):
        return INBOX + name[len(INBOX) :]
    return name


class UndecodableName(str):
    """A mailbox name that is valid syntax (an astring) but names no mailbox: malformed
    modified UTF-7 (RFC 3501 §5.1.3: "&" not followed by canonical base64 and "-") or a
    control character. The command goes on, and the executor answers NO with ``reason``,
    as for any mailbox that does not exist; a BAD would blame the client's syntax, and
    enough of them end the connection."""

    reason: str = ""

    @classmethod
    def because(cls, text: str, reason: str) -> UndecodableName:
        name = cls(text)
        name.reason = reason
        return name


def decode_mailbox(raw: bytes, utf8: bool, *, inbox: bool = True) -> str:
    """A mailbox name or pattern from the wire: UTF-8 (rev2, UTF8=ACCEPT) or modified UTF-7.

    Text that is not a name at all (8-bit in a rev1 name, invalid UTF-8) is a syntax error;
    a name whose spelling is malformed comes back as an :class:`UndecodableName`.
    """
    if utf8:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("mailbox name is not valid UTF-8") from None
    else:
        if not raw.isascii():
            raise CommandError("8-bit mailbox name: use modified UTF-7 (RFC 3501 §5.1.3)")
        text = raw.decode("ascii")
        try:
            text = utf7.decode(text)
        except utf7.MUTF7Error as e:
            return UndecodableName.because(text, f"not valid modified UTF-7: {e}")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        return UndecodableName.because(text, "control character in mailbox name")
    return normalise_inbox(text) if inbox else text


def decode_pattern(raw: bytes, utf8: bool, *, inbox: bool = True) -> str:
    """A LIST/LSUB reference or pattern: as :func:`decode_mailbox`, but one that can match
    no name in its own spelling is refused with NO (a pattern has no "no such mailbox")."""
    text = decode_mailbox(raw, utf8, inbox=inbox)
    if isinstance(text, UndecodableName):
        raise CommandError(f"mailbox pattern is {text.reason}", status="NO")
    return text


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(f"{what} is not valid UTF-8") from None


# -- the rules ------------------------------------------------------------------------------


class _Args:
    """The reader plus what every rule needs."""

    def __init__(self, reader: Reader, context: GrammarContext) -> None:
        self.reader = reader
        self.context = context
        self.tag = ""
        self.uid = False

    def mailbox(self) -> str:
        self.reader.sp()
        return decode_mailbox(self.reader.astring("a mailbox name"), self.context.utf8_names)

    def atom_list(self) -> list[str]:
        """``"(" [atom *(SP atom)] ")"``, upper-cased."""
        reader = self.reader
        reader.open_paren()
        items: list[str] = []
        while not reader.take(b")"):
            if items:
                reader.sp()
            items.append(reader.keyword())
        return items


def _no_arguments(cls: type[c.Command]) -> Callable[[_Args], c.Command]:
    return lambda args: cls(tag=args.tag)


def _authenticate(args: _Args) -> c.Command:
    reader = args.reader
    reader.sp()
    mechanism = reader.keyword()
    initial = None
    if not reader.at_end():
        reader.sp()
        initial = decode_sasl(reader.run(_BASE64_CHARS))
    return c.Authenticate(tag=args.tag, mechanism=mechanism, initial_response=initial)


def decode_sasl(text: bytes) -> bytes:
    """RFC 9051 §6.2.2 / RFC 4959: base64 data, "=" standing for an empty response."""
    if text == b"=":
        return b""
    if not text:
        raise CommandError("expected base64 data")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("invalid base64 data") from None


def _login(args: _Args) -> c.Command:
    reader = args.reader
    reader.sp()
    user = _utf8(reader.astring("a user name"), "user name")
    reader.sp()
    password = _utf8(reader.astring("a password"), "password")
    return c.Login(tag=args.tag, username=user, password=password)


def _enable(args: _Args) -> c.Command:
    reader = args.reader
    names = []
    while True:
        reader.sp()
        names.append(reader.keyword())
        if reader.at_end():
            return c.Enable(tag=args.tag, capabilities=tuple(names))


def _select(read_only: bool) -> Callable[[_Args], c.Command]:
    def rule(args: _Args) -> c.Command:
        mailbox = args.mailbox()
        reader = args.reader
        condstore = False
        qresync = None
        if not reader.at_end():
            reader.sp()
            reader.open_paren()
            while True:
                word = reader.keyword()
                if word == "CONDSTORE":
                    condstore = True
                elif word == "QRESYNC" and qresync is None:
                    if not args.context.qresync:
                        raise CommandError("QRESYNC parameter without ENABLE QRESYNC")
                    reader.sp()
                    qresync = _qresync(reader)
                else:
                    raise CommandError(f"unknown SELECT parameter {word[:32]}")
                if reader.take(b")"):
                    break
                reader.sp()
        return c.Select(
            tag=args.tag, mailbox=mailbox, read_only=read_only, condstore=condstore, qresync=qresync
        )

    return rule


def _qresync(reader: Reader) -> c.QResyncParams:
    """RFC 7162 §3.2.5: "(" uidvalidity SP mod-sequence-value [SP known-uids]
    [SP seq-match-data] ")"."""
    reader.open_paren()
    uidvalidity = reader.nz_number("a UIDVALIDITY")
    reader.sp()
    modseq = reader.number64("a mod-sequence")
    known_uids = seqs = uids = None
    if reader.take(b" "):
        if reader.peek() != ord("("):
            known_uids = reader.sequence_set()
            if reader.take(b" ") and reader.peek() != ord("("):
                raise CommandError("expected sequence match data")
        if reader.take(b"("):
            seqs = reader.sequence_set()
            reader.sp()
            uids = reader.sequence_set()
            reader.close_paren()
    reader.close_paren()
    return c.QResyncParams(
        uidvalidity=uidvalidity,
        modseq=modseq,
        known_uids=known_uids,
        known_sequences=seqs,
        known_sequence_uids=uids,
    )


def _create(args: _Args) -> c.Command:
    mailbox = args.mailbox()
    reader = args.reader
    uses: tuple[str, ...] = ()
    if not reader.at_end():
        # RFC 6154 §3: create-param = "USE" SP "(" [use-attr *(SP use-attr)] ")"
        reader.sp()
        reader.open_paren()
        if not reader.take_keyword("USE"):
            raise CommandError("unknown CREATE parameter")
        reader.sp()
        uses = reader.flag_list()
        if any(not flag.startswith("\\") for flag in uses):
            raise CommandError("special-use attributes start with a backslash")
        reader.close_paren()
    return c.Create(tag=args.tag, mailbox=mailbox, special_use=uses)


def _one_mailbox(cls: type[c.Delete | c.Subscribe | c.Unsubscribe]) -> Callable[[_Args], c.Command]:
    return lambda args: cls(tag=args.tag, mailbox=args.mailbox())


def _rename(args: _Args) -> c.Command:
    old = args.mailbox()
    return c.Rename(tag=args.tag, mailbox=old, new_name=args.mailbox())


def _pattern(args: _Args) -> str:
    return decode_pattern(args.reader.list_mailbox(), args.context.utf8_names)


def _reference(args: _Args) -> str:
    args.reader.sp()
    raw = args.reader.astring("a reference name")
    return decode_pattern(raw, args.context.utf8_names, inbox=False)


def _list(args: _Args) -> c.Command:
    reader = args.reader
    selection: set[str] = set()
    extended = False
    mark = reader.mark()
    reader.sp()
    if reader.peek() == ord("("):
        extended = True
        selection = set(args.atom_list())
        _check_selection(selection)
    else:
        reader.reset(mark)
    reference = _reference(args)
    reader.sp()
    if reader.peek() == ord("("):
        extended = True
        reader.open_paren()
        patterns = [_pattern(args)]
        while not reader.take(b")"):
            reader.sp()
            patterns.append(_pattern(args))
    else:
        patterns = [_pattern(args)]
    options = _ListReturn()
    if not reader.at_end():
        reader.sp()
        if not reader.take_keyword("RETURN"):
            raise CommandError("expected RETURN")
        reader.sp()
        extended = True
        options.read(args)
    return c.List(
        tag=args.tag,
        reference=reference,
        patterns=tuple(patterns),
        selection=frozenset(selection),
        return_subscribed=options.subscribed,
        return_children=options.children,
        return_special_use=options.special_use,
        return_status=options.status,
        extended=extended,
    )


def _check_selection(selection: set[str]) -> None:
    unknown = selection - LIST_SELECTION_OPTIONS
    if unknown:
        raise CommandError(f"unknown LIST selection option {sorted(unknown)[0][:32]}")
    # RFC 5258 §3: RECURSIVEMATCH alone (or with only REMOTE) is a syntax error.
    if "RECURSIVEMATCH" in selection and not selection - {"RECURSIVEMATCH", "REMOTE"}:
        raise CommandError("RECURSIVEMATCH needs another selection option")


class _ListReturn:
    def __init__(self) -> None:
        self.subscribed = self.children = self.special_use = False
        self.status: tuple[str, ...] | None = None

    def read(self, args: _Args) -> None:
        reader = args.reader
        reader.open_paren()
        first = True
        while not reader.take(b")"):
            if not first:
                reader.sp()
            first = False
            word = reader.keyword()
            if word == "SUBSCRIBED":
                self.subscribed = True
            elif word == "CHILDREN":
                self.children = True
            elif word == "SPECIAL-USE":
                self.special_use = True
            elif word == "STATUS":  # RFC 5819 LIST-STATUS
                reader.sp()
                self.status = _status_items(args)
            else:
                raise CommandError(f"unknown LIST return option {word[:32]}")


def _lsub(args: _Args) -> c.Command:
    reference = _reference(args)
    args.reader.sp()
    return c.Lsub(tag=args.tag, reference=reference, pattern=_pattern(args))


def _status_items(args: _Args) -> tuple[str, ...]:
    items = args.atom_list()
    if not items:
        raise CommandError("empty status item list")
    for item in items:
        if item not in STATUS_ITEMS:
            raise CommandError(f"unknown status item {item[:32]}")
    return tuple(items)


def _status(args: _Args) -> c.Command:
    mailbox = args.mailbox()
    args.reader.sp()
    return c.Status(tag=args.tag, mailbox=mailbox, items=_status_items(args))


def _append(args: _Args) -> c.Command:
    mailbox = args.mailbox()
    reader = args.reader
    messages = []
    while True:
        reader.sp()
        messages.append(_append_message(reader))
        if reader.at_end():
            return c.Append(tag=args.tag, mailbox=mailbox, messages=tuple(messages))


def _append_message(reader: Reader) -> c.AppendMessage:
    flags: tuple[str, ...] = ()
    when = None
    if reader.peek() == ord("("):
        flags = reader.flag_list()
        if "\\Recent" in flags:
            raise CommandError("\\Recent cannot be set by APPEND")
        reader.sp()
    if reader.peek() == ord('"'):
        when = reader.date_time()
        reader.sp()
    utf8 = reader.take_keyword("UTF8")
    if utf8:  # RFC 6855 §4: "UTF8" SP "(" literal8 ")"
        reader.sp()
        reader.open_paren()
    if not reader.at_literal():
        raise CommandError("expected the message as a literal")
    literal = reader.literal(binary_ok=True, nul_ok=True)
    if utf8:
        if not literal.binary:
            raise CommandError("APPEND UTF8 takes a literal8")
        reader.close_paren()
    return c.AppendMessage(
        data=literal.data, flags=flags, internal_date=when, binary=literal.binary, utf8=utf8
    )


def _expunge(args: _Args) -> c.Command:
    if not args.uid:
        return c.Expunge(tag=args.tag)
    args.reader.sp()
    return c.Expunge(tag=args.tag, uids=args.reader.sequence_set())


def _charset_decoder(charset: str | None) -> Callable[[bytes], str]:
    if charset == "US-ASCII":

        def ascii_text(raw: bytes) -> str:
            if not raw.isascii():
                raise CommandError("8-bit search text with CHARSET US-ASCII")
            return raw.decode("ascii")

        return ascii_text
    return lambda raw: _utf8(raw, "search text")


def _charset(reader: Reader) -> str:
    name = reader.astring("a charset").decode("ascii", "replace").upper()
    if name not in SEARCH_CHARSETS:
        raise CommandError(
            "unsupported charset",
            status="NO",
            code=("BADCHARSET", "(" + " ".join(SEARCH_CHARSETS) + ")"),
        )
    return name


def _search(args: _Args) -> c.Command:
    reader = args.reader
    return_options = None
    charset = None
    mark = reader.mark()
    reader.sp()
    if reader.take_keyword("RETURN"):
        reader.sp()
        return_options = tuple(args.atom_list()) or ("ALL",)  # RFC 4731 §3: () means ALL
        unknown = set(return_options) - SEARCH_RETURN_OPTIONS
        if unknown:
            raise CommandError(f"unknown SEARCH return option {sorted(unknown)[0][:32]}")
        mark = reader.mark()
        reader.sp()
    if reader.take_keyword("CHARSET"):
        reader.sp()
        charset = _charset(reader)
    else:
        reader.reset(mark)
    criteria = parse_search(
        reader, _charset_decoder(charset), max_depth=args.context.max_search_depth
    )
    return c.Search(
        tag=args.tag,
        uid=args.uid,
        criteria=criteria,
        charset=charset,
        return_options=return_options,
    )


# -- FETCH ----------------------------------------------------------------------------------


def _fetch(args: _Args) -> c.Command:
    reader = args.reader
    reader.sp()
    sequence = reader.sequence_set()
    reader.sp()
    items = _fetch_items(reader)
    changed_since = None
    vanished = False
    if not reader.at_end():
        reader.sp()
        changed_since, vanished = _fetch_modifiers(args)
    names = {item.name for item in items}
    # RFC 9051 §6.4.9: UID FETCH always returns UID; RFC 7162 §3.1.4.1: CHANGEDSINCE adds MODSEQ.
    if args.uid and "UID" not in names:
        items.append(c.FetchItem(name="UID"))
    if changed_since is not None and "MODSEQ" not in names:
        items.append(c.FetchItem(name="MODSEQ"))
    return c.Fetch(
        tag=args.tag,
        uid=args.uid,
        sequence=sequence,
        items=tuple(items),
        changed_since=changed_since,
        vanished=vanished,
    )


def _fetch_items(reader: Reader) -> list[c.FetchItem]:
    if reader.take(b"("):
        items = [_fetch_att(reader)]
        while not reader.take(b")"):
            reader.sp()
            items.append(_fetch_att(reader))
        return items
    mark = reader.mark()
    word = reader.run(_FETCH_NAME_CHARS).decode("ascii").upper()
    if word in FETCH_MACROS and reader.peek() in (None, ord(" ")):
        return [c.FetchItem(name=name) for name in FETCH_MACROS[word]]
    reader.reset(mark)
    return [_fetch_att(reader)]


def _fetch_att(reader: Reader) -> c.FetchItem:
    name = reader.run(_FETCH_NAME_CHARS).decode("ascii").upper()
    if not name:
        raise CommandError("expected a fetch attribute")
    if name in SIMPLE_FETCH_ITEMS:
        return c.FetchItem(name=name)
    if name == "BODY" and reader.peek() != ord("["):
        return c.FetchItem(name="BODY")
    base, _, modifier = name.partition(".")
    if (
        base not in ("BODY", "BINARY")
        or modifier not in ("", "PEEK", "SIZE")
        or name == "BODY.SIZE"
    ):
        raise CommandError(f"unknown fetch attribute {name[:32]}")
    binary = base == "BINARY"
    reader.expect(b"[", '"[" (a section)')
    section = _binary_section(reader) if binary else _section(reader)
    partial = None
    if reader.take(b"<"):
        if modifier == "SIZE":
            raise CommandError("BINARY.SIZE takes no partial range")
        origin = reader.number64("a partial origin")
        reader.expect(b".", '"."')
        count = reader.number64("a partial length")
        if count == 0:
            raise CommandError("partial length must not be zero")
        reader.expect(b">", '">"')
        partial = (origin, count)
    return c.FetchItem(
        name="BINARY.SIZE" if modifier == "SIZE" else base,
        section=section,
        partial=partial,
        peek=modifier == "PEEK",
    )


def _section_parts(text: str) -> tuple[list[int], list[str]]:
    parts: list[int] = []
    words = text.split(".") if text else []
    while words and words[0].isdigit():
        number = int(words.pop(0)) if len(words[0]) <= 10 else 0
        if not 0 < number <= 2**32 - 1:
            raise CommandError("invalid section part number")
        parts.append(number)
    if any(not word for word in words):
        raise CommandError("empty section component")
    return parts, words


def _section(reader: Reader) -> c.Section:
    """RFC 9051: section = "[" [section-spec] "]"."""
    parts, words = _section_parts(reader.run(_SECTION_CHARS).decode("ascii").upper())
    specifier = ".".join(words) or None
    if specifier is not None and specifier not in SECTION_TEXTS:
        raise CommandError(f"invalid section {specifier[:32]}")
    if specifier == "MIME" and not parts:
        raise CommandError("MIME needs a part number")
    fields: tuple[str, ...] = ()
    if specifier in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        reader.sp()
        reader.open_paren()
        names = [_header_name(reader)]
        while not reader.take(b")"):
            reader.sp()
            names.append(_header_name(reader))
        fields = tuple(names)
    reader.expect(b"]", '"]"')
    return c.Section(part=tuple(parts), specifier=specifier, fields=fields)


def _header_name(reader: Reader) -> str:
    name = reader.astring("a header field name")
    # RFC 5322 §3.6.8: field names are printable US-ASCII except ":".
    if not name or any(not 0x21 <= b <= 0x7E or b == 0x3A for b in name):
        raise CommandError("invalid header field name")
    return name.decode("ascii").upper()


def _binary_section(reader: Reader) -> c.Section:
    """RFC 3516: section-binary = "[" [section-part] "]"."""
    parts, words = _section_parts(reader.run(_SECTION_CHARS).decode("ascii"))
    if words:
        raise CommandError("BINARY sections are part numbers only")
    reader.expect(b"]", '"]"')
    return c.Section(part=tuple(parts))


def _fetch_modifiers(args: _Args) -> tuple[int | None, bool]:
    reader = args.reader
    reader.open_paren()
    changed_since = None
    vanished = False
    while True:
        word = reader.keyword()
        if word == "CHANGEDSINCE":
            reader.sp()
            changed_since = reader.number64("a mod-sequence")
        elif word == "VANISHED":
            vanished = True
        else:
            raise CommandError(f"unknown FETCH modifier {word[:32]}")
        if reader.take(b")"):
            break
        reader.sp()
    if vanished:
        # RFC 7162 §3.2.6: VANISHED needs UID FETCH, CHANGEDSINCE and an enabled QRESYNC.
        if not (args.uid and changed_since is not None and args.context.qresync):
            raise CommandError("VANISHED needs UID FETCH, CHANGEDSINCE and ENABLE QRESYNC")
    return changed_since, vanished


# -- STORE, COPY, MOVE ----------------------------------------------------------------------


def _store(args: _Args) -> c.Command:
    reader = args.reader
    reader.sp()
    sequence = reader.sequence_set()
    reader.sp()
    unchanged_since = None
    if reader.take(b"("):
        if not reader.take_keyword("UNCHANGEDSINCE"):
            raise CommandError("unknown STORE modifier")
        reader.sp()
        unchanged_since = reader.number(MAX_NUMBER64, "a mod-sequence")
        reader.close_paren()
        reader.sp()
    match = _STORE_ITEM.match(reader.atom("+FLAGS, -FLAGS or FLAGS").upper())
    if match is None:
        raise CommandError("expected FLAGS, +FLAGS or -FLAGS")
    reader.sp()
    if reader.peek() == ord("("):
        flags = reader.flag_list()
    else:
        flag_items = [reader.flag()]
        while not reader.at_end():
            reader.sp()
            flag_items.append(reader.flag())
        flags = tuple(flag_items)
    if "\\Recent" in flags:
        raise CommandError("\\Recent cannot be stored")
    return c.Store(
        tag=args.tag,
        uid=args.uid,
        sequence=sequence,
        action=c.StoreAction(match.group(1)),
        flags=flags,
        silent=bool(match.group(2)),
        unchanged_since=unchanged_since,
    )


def _transfer(cls: type[c.Copy | c.Move]) -> Callable[[_Args], c.Command]:
    def rule(args: _Args) -> c.Command:
        args.reader.sp()
        sequence = args.reader.sequence_set()
        return cls(tag=args.tag, uid=args.uid, sequence=sequence, mailbox=args.mailbox())

    return rule


# -- QUOTA, ID, COMPRESS, SORT, THREAD ------------------------------------------------------


def _quota_root(args: _Args) -> str:
    args.reader.sp()
    return _utf8(args.reader.astring("a quota root"), "quota root")


def _getquota(args: _Args) -> c.Command:
    return c.GetQuota(tag=args.tag, root=_quota_root(args))


def _getquotaroot(args: _Args) -> c.Command:
    return c.GetQuotaRoot(tag=args.tag, mailbox=args.mailbox())


def _setquota(args: _Args) -> c.Command:
    """RFC 9208 §4.3: SETQUOTA quota-root SP "(" [resource SP number *(…)] ")"."""
    root = _quota_root(args)
    reader = args.reader
    reader.sp()
    reader.open_paren()
    limits: list[tuple[str, int]] = []
    while not reader.take(b")"):
        if limits:
            reader.sp()
        resource = reader.keyword()
        reader.sp()
        limits.append((resource, reader.number64("a quota limit")))
    return c.SetQuota(tag=args.tag, root=root, limits=tuple(limits))


def _id(args: _Args) -> c.Command:
    reader = args.reader
    reader.sp()
    if reader.take_keyword("NIL"):
        return c.Id(tag=args.tag, parameters=None)
    reader.open_paren()
    pairs: list[tuple[str, str | None]] = []
    while not reader.take(b")"):
        if pairs:
            reader.sp()
        if len(pairs) >= ID_MAX_PAIRS:
            raise CommandError(f"more than {ID_MAX_PAIRS} ID parameters")
        name = reader.string()
        reader.sp()
        value = reader.nstring()
        if len(name) > ID_MAX_FIELD or (value is not None and len(value) > ID_MAX_VALUE):
            raise CommandError("ID field or value too long (RFC 2971 §3.3)")
        pairs.append(
            (
                name.decode("utf-8", "replace"),
                None if value is None else value.decode("utf-8", "replace"),
            )
        )
    if not pairs:
        raise CommandError("empty ID parameter list (use NIL)")
    return c.Id(tag=args.tag, parameters=tuple(pairs))


def _compress(args: _Args) -> c.Command:
    args.reader.sp()
    return c.Compress(tag=args.tag, mechanism=args.reader.keyword())


def _sort(args: _Args) -> c.Command:
    reader = args.reader
    reader.sp()
    words = args.atom_list()
    criteria: list[c.SortCriterion] = []
    reverse = False
    for word in words:
        if word == "REVERSE" and not reverse:
            reverse = True
            continue
        if word not in SORT_KEYS:
            raise CommandError(f"unknown sort key {word[:32]}")
        criteria.append(c.SortCriterion(key=word, reverse=reverse))
        reverse = False
    if reverse or not criteria:
        raise CommandError("incomplete sort criteria")
    reader.sp()
    charset = _charset(reader)
    search = parse_search(
        reader, _charset_decoder(charset), max_depth=args.context.max_search_depth
    )
    return c.Sort(
        tag=args.tag, uid=args.uid, criteria=tuple(criteria), charset=charset, search=search
    )


def _thread(args: _Args) -> c.Command:
    reader = args.reader
    reader.sp()
    algorithm = reader.keyword()
    if algorithm not in THREAD_ALGORITHMS:
        raise CommandError(f"unknown thread algorithm {algorithm[:32]}")
    reader.sp()
    charset = _charset(reader)
    search = parse_search(
        reader, _charset_decoder(charset), max_depth=args.context.max_search_depth
    )
    return c.Thread(tag=args.tag, uid=args.uid, algorithm=algorithm, charset=charset, search=search)


_RULES: dict[str, Callable[[_Args], c.Command]] = {
    "CAPABILITY": _no_arguments(c.Capability),
    "NOOP": _no_arguments(c.Noop),
    "LOGOUT": _no_arguments(c.Logout),
    "STARTTLS": _no_arguments(c.StartTLS),
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "ENABLE": _enable,
    "SELECT": _select(read_only=False),
    "EXAMINE": _select(read_only=True),
    "CREATE": _create,
    "DELETE": _one_mailbox(c.Delete),
    "RENAME": _rename,
    "SUBSCRIBE": _one_mailbox(c.Subscribe),
    "UNSUBSCRIBE": _one_mailbox(c.Unsubscribe),
    "LIST": _list,
    "LSUB": _lsub,
    "NAMESPACE": _no_arguments(c.Namespace),
    "STATUS": _status,
    "APPEND": _append,
    "IDLE": _no_arguments(c.Idle),
    "CHECK": _no_arguments(c.Check),
    "CLOSE": _no_arguments(c.Close),
    "UNSELECT": _no_arguments(c.Unselect),
    "EXPUNGE": _expunge,
    "SEARCH": _search,
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _transfer(c.Copy),
    "MOVE": _transfer(c.Move),
    "GETQUOTA": _getquota,
    "GETQUOTAROOT": _getquotaroot,
    "SETQUOTA": _setquota,
    "ID": _id,
    "COMPRESS": _compress,
    "SORT": _sort,
    "THREAD": _thread,
}
_UID_RULES = {
    name: _RULES[name]
    for name in ("FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE", "SORT", "THREAD")
}
COMMAND_NAMES = frozenset(_RULES) | frozenset(f"UID {name}" for name in _UID_RULES)
