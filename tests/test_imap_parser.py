"""IMAP command framing and grammar: every command, literals, limits and malformed input."""

from __future__ import annotations

import base64
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postvern.imap.grammar import commands as c
from postvern.imap.grammar.lexer import CommandError, Literal, RawCommand
from postvern.imap.grammar.parse import (
    GrammarContext,
    UndecodableName,
    decode_mailbox,
    parse_command,
    split_head,
)
from postvern.imap.parser import (
    LITERAL_MINUS_MAX,
    NEED_DATA,
    CommandFramer,
    FramingError,
    FramingLimits,
    LiteralAnnounced,
    NonSyncLiterals,
)
from postvern.imap.search import (
    All,
    And,
    DateTest,
    FlagTest,
    HeaderContains,
    ModSeqTest,
    Not,
    Or,
    SearchTooDeep,
    SequenceTest,
    SizeTest,
    TextContains,
)
from postvern.imap.sequence import STAR, SequenceSet, SequenceSetError, format_numbers

REV1 = GrammarContext()
UTF8 = GrammarContext(utf8_names=True)
QRESYNC = GrammarContext(qresync=True)


def frame_all(data: bytes, framer: CommandFramer | None = None) -> list[object]:
    """Feed ``data``, accepting every literal; return the framed commands and errors."""
    framer = framer or CommandFramer()
    framer.authenticated = True
    framer.receive(data)
    out: list[object] = []
    while (event := framer.next_event()) is not NEED_DATA:
        if isinstance(event, LiteralAnnounced):
            framer.accept_literal()
        else:
            out.append(event)
    return out


def parse(data: bytes, context: GrammarContext = REV1) -> c.Command:
    [raw] = frame_all(data + b"\r\n")
    assert isinstance(raw, RawCommand)
    return parse_command(raw, context)


def refused(data: bytes, context: GrammarContext = REV1) -> CommandError:
    with pytest.raises(CommandError) as info:
        parse(data, context)
    return info.value


# -- sequence sets --------------------------------------------------------------------------


def test_sequence_set_forms() -> None:
    s = SequenceSet.parse("2,4:7,9,12:*")
    assert s.ranges == ((2, 2), (4, 7), (9, 9), (12, STAR))
    assert s.resolve(15) == [(2, 2), (4, 7), (9, 9), (12, 15)]
    assert str(s) == "2,4:7,9,12:*"
    # RFC 9051 §9: a range may be written high to low; "*" is the largest number in use.
    assert SequenceSet.parse("7:4").resolve(10) == [(4, 7)]
    assert SequenceSet.parse("*:4").resolve(3) == [(3, 4)]
    assert list(SequenceSet.parse("3,1:2,2").numbers(10)) == [1, 2, 3]
    assert SequenceSet.parse("$").saved
    assert SequenceSet.parse("1,$").resolve(5, saved=[4]) == [(1, 1), (4, 4)]
    assert SequenceSet.parse("1:4294967295").resolve(7) == [(1, 4294967295)]


@pytest.mark.parametrize("text", ["", "0", "1:0", "4294967296", "1,,2", "a", "1:2:3", "01", "-1"])
def test_bad_sequence_sets(text: str) -> None:
    with pytest.raises(SequenceSetError):
        SequenceSet.parse(text)


def test_format_numbers_keeps_order_unless_sorted() -> None:
    assert format_numbers([304, 319, 320]) == "304,319:320"
    assert format_numbers([5, 3, 4]) == "5,3:4"
    assert format_numbers([5, 3, 4, 4], sort=True) == "3:5"
    assert format_numbers([]) == ""


# -- framing --------------------------------------------------------------------------------


def test_simple_lines_and_bare_lf() -> None:
    out = frame_all(b"a1 NOOP\r\na2 CAPABILITY\na3 LOGOUT\r\n")
    assert [r.lines for r in out if isinstance(r, RawCommand)] == [
        [b"a1 NOOP"],
        [b"a2 CAPABILITY"],
        [b"a3 LOGOUT"],
    ]


def test_command_split_across_reads() -> None:
    framer = CommandFramer()
    for byte in b"a1 LOGIN {3}\r\n":
        framer.receive(bytes([byte]))
        event = framer.next_event()
    assert isinstance(event, LiteralAnnounced)
    assert (event.size, event.synchronizing, event.binary) == (3, True, False)
    framer.accept_literal()
    for byte in b"bob pw\r\n":
        assert framer.next_event() is NEED_DATA
        framer.receive(bytes([byte]))
    raw = framer.next_event()
    assert isinstance(raw, RawCommand)
    assert raw.lines == [b"a1 LOGIN {3}", b" pw"]
    assert raw.literals == [Literal(b"bob")]


def test_all_literal_kinds() -> None:
    framer = CommandFramer()
    framer.authenticated = True
    framer.receive(b"a APPEND x {2}\r\nab ~{3}\r\na\x00b {1+}\r\nc ~{0+}\r\n\r\n")
    kinds = []
    while (event := framer.next_event()) is not NEED_DATA:
        if isinstance(event, LiteralAnnounced):
            kinds.append((event.size, event.synchronizing, event.binary))
            framer.accept_literal()
        else:
            raw = event
    assert kinds == [(2, True, False), (3, True, True), (1, False, False), (0, False, True)]
    assert isinstance(raw, RawCommand)
    assert [lit.data for lit in raw.literals] == [b"ab", b"a\x00b", b"c", b""]
    assert [lit.binary for lit in raw.literals] == [False, True, False, True]


def test_literal_limit_before_and_after_authentication() -> None:
    framer = CommandFramer(FramingLimits(literal=1000, literal_unauthenticated=10))
    framer.receive(b"a LOGIN {11}\r\n")
    error = framer.next_event()
    assert isinstance(error, FramingError)
    assert (error.status, error.code) == ("NO", ("TOOBIG", None))
    framer.authenticated = True
    framer.receive(b"a LOGIN {11}\r\n")
    assert isinstance(framer.next_event(), LiteralAnnounced)


@pytest.mark.parametrize(
    "marker", [b"{4294967295}", b"{9223372036854775807}", b"{99999999999999999999999}"]
)
def test_absurd_synchronizing_literals_refused_cleanly(marker: bytes) -> None:
    framer = CommandFramer()
    framer.authenticated = True
    framer.receive(b"a1 APPEND INBOX " + marker + b"\r\na2 NOOP\r\n")
    error = framer.next_event()
    assert isinstance(error, FramingError) and not error.fatal
    assert error.head.startswith(b"a1 ")
    assert isinstance(framer.next_event(), RawCommand)  # still in step
    assert framer.buffered == 0


def test_absurd_non_synchronizing_literal_is_fatal() -> None:
    framer = CommandFramer()
    framer.receive(b"a1 LOGIN {99999999999999999999999+}\r\nxxxx")
    error = framer.next_event()
    assert isinstance(error, FramingError) and error.fatal
    framer.receive(b"a2 NOOP\r\n")
    assert framer.next_event() is NEED_DATA


def test_non_synchronizing_literal_over_limit_is_skipped_without_buffering() -> None:
    framer = CommandFramer(FramingLimits(literal_unauthenticated=100))
    framer.receive(b"a1 LOGIN {5000000+}\r\n")
    assert framer.next_event() is NEED_DATA
    chunk = b"x" * 65536
    sent = 0
    while sent + len(chunk) <= 5_000_000:
        framer.receive(chunk)
        sent += len(chunk)
        assert framer.next_event() is NEED_DATA
        assert framer.buffered == 0
    framer.receive(b"x" * (5_000_000 - sent) + b" more {3+}\r\nabc\r\na2 NOOP\r\n")
    error = framer.next_event()
    assert isinstance(error, FramingError)
    assert (error.status, error.code) == ("BAD", ("TOOBIG", None))
    assert error.head.startswith(b"a1 LOGIN")
    raw = framer.next_event()
    assert isinstance(raw, RawCommand) and raw.lines == [b"a2 NOOP"]


def test_literal_minus_caps_non_synchronizing_literals() -> None:
    framer = CommandFramer(non_sync=NonSyncLiterals.LITERAL_MINUS)
    framer.authenticated = True
    framer.receive(b"a APPEND x {%d+}\r\n" % LITERAL_MINUS_MAX)
    assert isinstance(framer.next_event(), LiteralAnnounced)
    framer = CommandFramer(non_sync=NonSyncLiterals.LITERAL_MINUS)
    framer.authenticated = True
    framer.receive(b"a APPEND x {%d+}\r\n" % (LITERAL_MINUS_MAX + 1) + b"y" * 4097 + b"\r\n")
    error = framer.next_event()
    assert isinstance(error, FramingError) and error.status == "BAD"
    assert framer.buffered == 0


def test_non_synchronizing_literals_refused_without_extension() -> None:
    framer = CommandFramer(non_sync=NonSyncLiterals.REFUSED)
    framer.receive(b"a LOGIN {3+}\r\nbob pw\r\nb NOOP\r\n")
    assert isinstance(framer.next_event(), FramingError)
    assert isinstance(framer.next_event(), RawCommand)


def test_rejected_literal_decisions() -> None:
    framer = CommandFramer()
    framer.receive(b"a FOO {3}\r\nb NOOP\r\n")
    assert isinstance(framer.next_event(), LiteralAnnounced)
    framer.reject_literal("unknown command")
    error = framer.next_event()
    assert isinstance(error, FramingError) and error.text == "unknown command"
    # The client never sent the synchronizing literal: the next line is a new command.
    raw = framer.next_event()
    assert isinstance(raw, RawCommand) and raw.lines == [b"b NOOP"]


def test_two_hundred_megabyte_line_keeps_memory_bounded() -> None:
    limits = FramingLimits()
    framer = CommandFramer(limits)
    chunk = b"A" * (1 << 20)
    framer.receive(b"t1 SEARCH TEXT ")
    peak = 0
    for _ in range(200):
        framer.receive(chunk)
        assert framer.next_event() is NEED_DATA
        peak = max(peak, framer.buffered)
    assert peak <= limits.line + len(chunk) + 64
    assert framer.buffered == 0
    framer.receive(b"\r\nt2 NOOP\r\n")
    error = framer.next_event()
    assert isinstance(error, FramingError) and error.text == "command line too long"
    assert split_head(error.head).tag == "t1"
    raw = framer.next_event()
    assert isinstance(raw, RawCommand) and raw.lines == [b"t2 NOOP"]


def test_overlong_line_ending_in_literal_skips_the_literal_too() -> None:
    framer = CommandFramer(FramingLimits(line=100))
    framer.receive(b"t1 LOGIN " + b"x" * 200 + b" {5+}\r\nhello\r\nt2 NOOP\r\n")
    assert isinstance(framer.next_event(), FramingError)
    raw = framer.next_event()
    assert isinstance(raw, RawCommand) and raw.lines == [b"t2 NOOP"]


def test_line_limit_counts_every_line_of_a_command() -> None:
    framer = CommandFramer(FramingLimits(line=50))
    framer.authenticated = True
    framer.receive(b"t1 LOGIN {1}\r\n")
    assert isinstance(framer.next_event(), LiteralAnnounced)
    framer.accept_literal()
    framer.receive(b"a " + b"p" * 60 + b"\r\n")
    assert isinstance(framer.next_event(), FramingError)


def test_too_many_literals() -> None:
    framer = CommandFramer(FramingLimits(literals_per_command=2))
    framer.authenticated = True
    framer.receive(b"a APPEND x {1+}\r\na {1+}\r\nb {1+}\r\nc\r\nb NOOP\r\n")
    events = []
    while (event := framer.next_event()) is not NEED_DATA:
        if isinstance(event, LiteralAnnounced):
            framer.accept_literal()
        else:
            events.append(event)
    assert isinstance(events[0], FramingError) and "too many" in events[0].text
    assert isinstance(events[1], RawCommand)


def test_plain_lines_mode_ignores_literal_markers() -> None:
    framer = CommandFramer()
    framer.plain_lines = True
    framer.receive(b"abc{5}\r\n")
    raw = framer.next_event()
    assert isinstance(raw, RawCommand) and raw.lines == [b"abc{5}"]


def test_take_unprocessed() -> None:
    framer = CommandFramer()
    framer.receive(b"a STARTTLS\r\nb LOGIN x y\r\n")
    assert isinstance(framer.next_event(), RawCommand)
    assert framer.take_unprocessed() == b"b LOGIN x y\r\n"
    assert framer.next_event() is NEED_DATA


# -- any state and not authenticated --------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "cls"),
    [
        (b"a CAPABILITY", c.Capability),
        (b"a noop", c.Noop),
        (b"a LOGOUT", c.Logout),
        (b"a STARTTLS", c.StartTLS),
        (b"a CHECK", c.Check),
        (b"a CLOSE", c.Close),
        (b"a UNSELECT", c.Unselect),
        (b"a IDLE", c.Idle),
        (b"a NAMESPACE", c.Namespace),
        (b"a EXPUNGE", c.Expunge),
    ],
)
def test_commands_without_arguments(line: bytes, cls: type) -> None:
    command = parse(line)
    assert type(command) is cls and command.tag == "a"
    assert isinstance(refused(line + b" extra"), CommandError)


def test_login_forms() -> None:
    # RFC 9051 §6.2.3 example.
    login = parse(b"a001 LOGIN SMITH SESAME")
    assert login == c.Login(tag="a001", username="SMITH", password="SESAME")
    assert "SESAME" not in repr(login)
    assert parse(b'a LOGIN "fred \\"x\\"" {5}\r\np w\xc3\xa9') == c.Login(
        tag="a", username='fred "x"', password="p wé"
    )
    assert "missing" in refused(b"a LOGIN fred").text
    refused(b"a LOGIN fred pass extra")
    refused(b'a LOGIN "unterminated pass')


def test_authenticate_forms() -> None:
    command = parse(b"A001 AUTHENTICATE plain")
    assert command == c.Authenticate(tag="A001", mechanism="PLAIN")
    ir = base64.b64encode(b"\x00test\x00test")
    command = parse(b"A001 AUTHENTICATE PLAIN " + ir)
    assert isinstance(command, c.Authenticate) and command.initial_response == b"\x00test\x00test"
    assert parse(b"A AUTHENTICATE PLAIN =").initial_response == b""  # type: ignore[attr-defined]
    refused(b"A AUTHENTICATE PLAIN !!!")
    refused(b"A AUTHENTICATE PLAIN abc")  # not a multiple of 4


def test_id_forms() -> None:
    # RFC 2971 §3.1 example.
    command = parse(
        b'a023 ID ("name" "sodr" "version" "19.34" "vendor" "Pink Floyd Music Limited")'
    )
    assert command == c.Id(
        tag="a023",
        parameters=(
            ("name", "sodr"),
            ("version", "19.34"),
            ("vendor", "Pink Floyd Music Limited"),
        ),
    )
    assert parse(b"a ID NIL") == c.Id(tag="a", parameters=None)
    assert parse(b'a ID ("os" NIL)') == c.Id(tag="a", parameters=(("os", None),))
    refused(b"a ID ()")
    refused(b'a ID ("' + b"x" * 31 + b'" "v")')
    refused(b"a ID (" + b" ".join(b'"k%d" "v"' % i for i in range(31)) + b")")


# -- authenticated state --------------------------------------------------------------------


def test_enable() -> None:
    assert parse(b"t1 ENABLE CONDSTORE X-GOOD-IDEA") == c.Enable(
        tag="t1", capabilities=("CONDSTORE", "X-GOOD-IDEA")
    )
    refused(b"t1 ENABLE")


def test_select_and_examine() -> None:
    assert parse(b"A142 SELECT INBOX") == c.Select(tag="A142", mailbox="INBOX")
    examine = parse(b"A932 EXAMINE blurdybloop")
    assert examine == c.Select(tag="A932", mailbox="blurdybloop", read_only=True)
    assert examine.name == "EXAMINE"
    assert parse(b"a select inbox (condstore)") == c.Select(
        tag="a", mailbox="INBOX", condstore=True
    )
    refused(b"a SELECT INBOX (FOO)")
    refused(b"a SELECT INBOX (CONDSTORE")


def test_select_qresync() -> None:
    # RFC 7162 §3.2.5 examples.
    command = parse(
        b"A03 SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))", QRESYNC
    )
    assert isinstance(command, c.Select) and command.qresync is not None
    assert command.qresync.uidvalidity == 67890007
    assert command.qresync.modseq == 20050715194045000
    assert str(command.qresync.known_uids) == "41,43:211,214:541"
    command = parse(
        b"B04 SELECT INBOX (QRESYNC (67890007 90060115194045000 1:29997 "
        b"(5000,7500,9000,9990:9999 15000,22500,27000,29970,29973,29976,29979)))",
        QRESYNC,
    )
    assert isinstance(command, c.Select) and command.qresync is not None
    assert str(command.qresync.known_sequences) == "5000,7500,9000,9990:9999"
    assert str(command.qresync.known_sequence_uids).startswith("15000,22500")
    command = parse(b"a SELECT INBOX (QRESYNC (1 2 (1:2 3:4)))", QRESYNC)
    assert command.qresync.known_uids is None  # type: ignore[attr-defined]
    assert "ENABLE QRESYNC" in refused(b"a SELECT INBOX (QRESYNC (1 2))").text
    refused(b"a SELECT INBOX (QRESYNC (0 2))", QRESYNC)
    refused(b"a SELECT INBOX (QRESYNC (1))", QRESYNC)


def test_mailbox_commands() -> None:
    assert parse(b"A003 CREATE owatagusiam/") == c.Create(tag="A003", mailbox="owatagusiam/")
    assert parse(b'a CREATE "Sent Mail" (USE (\\Sent))') == c.Create(
        tag="a", mailbox="Sent Mail", special_use=("\\Sent",)
    )
    refused(b"a CREATE x (USE (Sent))")
    refused(b"a CREATE x (FOO (\\Sent))")
    assert parse(b"A683 DELETE blurdybloop") == c.Delete(tag="A683", mailbox="blurdybloop")
    assert parse(b"A683 RENAME blurdybloop sarasoop") == c.Rename(
        tag="A683", mailbox="blurdybloop", new_name="sarasoop"
    )
    assert parse(b"A002 SUBSCRIBE #news.comp.mail.mime") == c.Subscribe(
        tag="A002", mailbox="#news.comp.mail.mime"
    )
    assert parse(b"A002 UNSUBSCRIBE inbox") == c.Unsubscribe(tag="A002", mailbox="INBOX")
    refused(b"A683 RENAME blurdybloop")


def test_inbox_is_case_insensitive() -> None:
    assert decode_mailbox(b"inbox", False) == "INBOX"
    assert decode_mailbox(b"InBoX/Sub", False) == "INBOX/Sub"
    assert decode_mailbox(b"inboxes", False) == "inboxes"
    assert decode_mailbox(b"inbox", False, inbox=False) == "inbox"


def test_mailbox_name_encodings() -> None:
    assert parse(b"a SELECT Entw&APw-rfe") == c.Select(tag="a", mailbox="Entwürfe")
    # Valid syntax, malformed spelling: the command goes on and the executor says NO.
    undecodable = parse(b"a SELECT &AGE-").mailbox  # type: ignore[attr-defined]
    assert isinstance(undecodable, UndecodableName)
    assert "modified UTF-7" in undecodable.reason
    assert refused(b'a LIST "" &AGE-*').status == "NO"
    assert "8-bit" in refused(b'a SELECT "Entw\xc3\xbcrfe"').text
    assert "8-bit" in refused(b"a SELECT Entw\xc3\xbcrfe").text
    # IMAP4rev2 / UTF8=ACCEPT: the name is UTF-8 and "&" means itself.
    assert parse(b'a SELECT "Entw\xc3\xbcrfe"', UTF8) == c.Select(tag="a", mailbox="Entwürfe")
    assert parse(b"a SELECT Entw&APw-rfe", UTF8) == c.Select(tag="a", mailbox="Entw&APw-rfe")
    refused(b'a SELECT "\xff"', UTF8)
    assert isinstance(parse(b"a SELECT {3}\r\na\x01b").mailbox, UndecodableName)  # type: ignore[attr-defined]


def test_list_forms() -> None:
    # RFC 9051 §6.3.9 examples.
    assert parse(b'A101 LIST "" ""') == c.List(tag="A101", reference="", patterns=("",))
    assert parse(b'A102 LIST #news.comp.mail.misc ""') == c.List(
        tag="A102", reference="#news.comp.mail.misc", patterns=("",)
    )
    assert parse(b"A202 LIST ~/Mail/ %") == c.List(tag="A202", reference="~/Mail/", patterns=("%",))
    assert parse(b'A682 LIST "" *').patterns == ("*",)  # type: ignore[attr-defined]
    # RFC 5258 / RFC 5819 / RFC 6154.
    command = parse(b'A02 LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)')
    assert command == c.List(
        tag="A02",
        reference="",
        patterns=("%",),
        selection=frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}),
        return_children=True,
        extended=True,
    )
    command = parse(
        b'A01 LIST "" ("INBOX" "Drafts" "%/x") '
        b"RETURN (STATUS (MESSAGES UNSEEN) SPECIAL-USE SUBSCRIBED)"
    )
    assert isinstance(command, c.List)
    assert command.patterns == ("INBOX", "Drafts", "%/x")
    assert command.return_status == ("MESSAGES", "UNSEEN")
    assert command.return_special_use and command.return_subscribed and command.extended
    assert parse(b'a LIST () "" %') == c.List(tag="a", reference="", patterns=("%",), extended=True)
    assert parse(b'a LIST (SPECIAL-USE) "" *').selection == {"SPECIAL-USE"}  # type: ignore[attr-defined]
    refused(b'a LIST (RECURSIVEMATCH) "" %')
    refused(b'a LIST (RECURSIVEMATCH REMOTE) "" %')
    refused(b'a LIST (BOGUS) "" %')
    refused(b'a LIST "" % RETURN (BOGUS)')
    refused(b'a LIST "" % EXTRA (CHILDREN)')
    refused(b'a LIST ""')
    refused(b'a LIST "" ("a" "b"')


def test_lsub_namespace_status() -> None:
    assert parse(b'A002 LSUB "#news." "comp.mail.*"') == c.Lsub(
        tag="A002", reference="#news.", pattern="comp.mail.*"
    )
    assert parse(b"A042 STATUS blurdybloop (UIDNEXT MESSAGES)") == c.Status(
        tag="A042", mailbox="blurdybloop", items=("UIDNEXT", "MESSAGES")
    )
    items = b"MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE HIGHESTMODSEQ RECENT APPENDLIMIT"
    assert len(parse(b"a STATUS x (" + items + b")").items) == 9  # type: ignore[attr-defined]
    refused(b"a STATUS x ()")
    refused(b"a STATUS x (BOGUS)")
    refused(b"a STATUS x MESSAGES")


def test_append_forms() -> None:
    message = b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\nSubject: hi\r\n\r\nHello\r\n"
    command = parse(b"A003 APPEND saved-messages (\\Seen) {%d}\r\n" % len(message) + message)
    assert command == c.Append(
        tag="A003",
        mailbox="saved-messages",
        messages=(c.AppendMessage(data=message, flags=("\\Seen",)),),
    )
    command = parse(b'a APPEND x (\\seen $Junk) " 7-Feb-1994 21:52:25 -0800" {1}\r\nm')
    assert isinstance(command, c.Append)
    [msg] = command.messages
    assert msg.flags == ("\\Seen", "$Junk")
    assert msg.internal_date == datetime(
        1994, 2, 7, 21, 52, 25, tzinfo=timezone(-timedelta(hours=8))
    )
    # RFC 3516 literal8 (BINARY) and RFC 3502 MULTIAPPEND.
    command = parse(b'a APPEND x ~{3}\r\na\x00b {1+}\r\nc "01-Jan-2020 00:00:00 +0000" {1}\r\nd')
    assert isinstance(command, c.Append)
    assert [(m.data, m.binary) for m in command.messages] == [
        (b"a\x00b", True),
        (b"c", False),
        (b"d", False),
    ]
    # RFC 6855 UTF8 data extension.
    command = parse(b"a APPEND x UTF8 (~{2}\r\nhi)")
    assert command.messages[0].utf8 and command.messages[0].binary  # type: ignore[attr-defined]
    refused(b"a APPEND x UTF8 ({2}\r\nhi)")
    refused(b"a APPEND x (\\Recent) {1}\r\nm")
    refused(b'a APPEND x "32-Jan-2020 00:00:00 +0000" {1}\r\nm')
    refused(b'a APPEND x "01-Jan-2020 00:00:00 +0000"')
    refused(b"a APPEND x")
    refused(b"a APPEND x hello")


def test_quota_compress_idle() -> None:
    assert parse(b'G GETQUOTA ""') == c.GetQuota(tag="G", root="")
    assert parse(b"G GETQUOTAROOT INBOX") == c.GetQuotaRoot(tag="G", mailbox="INBOX")
    assert parse(b'S SETQUOTA "" (STORAGE 512 MESSAGE 1000)') == c.SetQuota(
        tag="S", root="", limits=(("STORAGE", 512), ("MESSAGE", 1000))
    )
    refused(b'S SETQUOTA "" (STORAGE)')
    assert parse(b"a COMPRESS DEFLATE") == c.Compress(tag="a", mechanism="DEFLATE")
    refused(b"a COMPRESS")


# -- selected state -------------------------------------------------------------------------


def test_uid_expunge_and_copy_move() -> None:
    assert parse(b"A003 UID EXPUNGE 3000:3002") == c.Expunge(
        tag="A003", uids=SequenceSet.parse("3000:3002")
    )
    assert parse(b"A003 UID EXPUNGE 1").name == "UID EXPUNGE"
    assert parse(b"A003 COPY 2:4 MEETING") == c.Copy(
        tag="A003", sequence=SequenceSet.parse("2:4"), mailbox="MEETING"
    )
    move = parse(b"a UID MOVE 42:69 foo")
    assert move == c.Move(tag="a", uid=True, sequence=SequenceSet.parse("42:69"), mailbox="foo")
    assert move.name == "UID MOVE"
    assert parse(b"a MOVE $ Trash").sequence.saved  # type: ignore[attr-defined]
    refused(b"a COPY 0 x")
    refused(b"a COPY 1:x y")
    refused(b"a UID FROB 1")
    refused(b"a UID")


def test_store_forms() -> None:
    assert parse(b"A003 STORE 2:4 +FLAGS (\\Deleted)") == c.Store(
        tag="A003",
        sequence=SequenceSet.parse("2:4"),
        action=c.StoreAction.ADD,
        flags=("\\Deleted",),
    )
    command = parse(b"a103 UID STORE 6,4,8 (UNCHANGEDSINCE 12121230045) +FLAGS.SILENT (\\Deleted)")
    assert command == c.Store(
        tag="a103",
        uid=True,
        sequence=SequenceSet.parse("6,4,8"),
        action=c.StoreAction.ADD,
        flags=("\\Deleted",),
        silent=True,
        unchanged_since=12121230045,
    )
    command = parse(b"a STORE 1 -flags \\seen $Label1")
    assert command.action is c.StoreAction.REMOVE  # type: ignore[attr-defined]
    assert command.flags == ("\\Seen", "$Label1")  # type: ignore[attr-defined]
    assert parse(b"a STORE 1 FLAGS ()").flags == ()  # type: ignore[attr-defined]
    refused(b"a STORE 1 +FLAGS (\\Recent)")
    refused(b"a STORE 1 *FLAGS (\\Seen)")
    refused(b"a STORE 1 +FLAGS")
    refused(b"a STORE 1 (UNCHANGEDSINCE) +FLAGS (x)")
    refused(b"a STORE 1 +FLAGS (\\Seen")


def test_fetch_macros_and_items() -> None:
    assert [i.name for i in parse(b"a FETCH 1 ALL").items] == [  # type: ignore[attr-defined]
        "FLAGS",
        "INTERNALDATE",
        "RFC822.SIZE",
        "ENVELOPE",
    ]
    assert len(parse(b"a FETCH 1 FAST").items) == 3  # type: ignore[attr-defined]
    assert parse(b"a FETCH 1 FULL").items[-1].name == "BODY"  # type: ignore[attr-defined]
    refused(b"a FETCH 1 (ALL)")
    names = (
        b"FLAGS ENVELOPE INTERNALDATE RFC822 RFC822.HEADER RFC822.TEXT RFC822.SIZE BODY "
        b"BODYSTRUCTURE UID MODSEQ"
    )
    command = parse(b"a FETCH 1:* (" + names + b")")
    assert [i.name for i in command.items] == names.decode().split()  # type: ignore[attr-defined]


def test_fetch_sections() -> None:
    # RFC 9051 §6.4.5 example.
    command = parse(b"A654 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])")
    assert isinstance(command, c.Fetch)
    item = command.items[1]
    assert item == c.FetchItem(
        name="BODY", section=c.Section(specifier="HEADER.FIELDS", fields=("DATE", "FROM"))
    )
    assert item.response_name == "BODY[HEADER.FIELDS (DATE FROM)]"
    assert item.sets_seen
    command = parse(
        b"a FETCH 1 (BODY.PEEK[1.2.HEADER.FIELDS.NOT (X-A)]<0.100> BODY[] BODY[TEXT] "
        b"BODY[3.MIME] BODY[2.1]<10.5> BINARY.PEEK[1]<0.10> BINARY[] BINARY.SIZE[1.2])"
    )
    assert isinstance(command, c.Fetch)
    got = [(i.response_name, i.peek, i.partial) for i in command.items]
    assert got == [
        ("BODY[1.2.HEADER.FIELDS.NOT (X-A)]<0>", True, (0, 100)),
        ("BODY[]", False, None),
        ("BODY[TEXT]", False, None),
        ("BODY[3.MIME]", False, None),
        ("BODY[2.1]<10>", False, (10, 5)),
        ("BINARY[1]<0>", True, (0, 10)),
        ("BINARY[]", False, None),
        ("BINARY.SIZE[1.2]", False, None),
    ]
    assert not command.items[0].sets_seen and command.items[1].sets_seen
    for bad in (
        b"a FETCH 1 BODY[MIME]",
        b"a FETCH 1 BODY[FOO]",
        b"a FETCH 1 BODY[1.]",
        b"a FETCH 1 BODY[0]",
        b"a FETCH 1 BODY.PEEK",
        b"a FETCH 1 BINARY[HEADER]",
        b"a FETCH 1 BINARY.SIZE[1]<0.1>",
        b"a FETCH 1 BODY[]<0.0>",
        b"a FETCH 1 BODY[HEADER.FIELDS]",
        b"a FETCH 1 BODY[HEADER.FIELDS ()]",
        b"a FETCH 1 BODY[1",
        b"a FETCH 1 RFC822.FOO",
        b"a FETCH 1 (FLAGS",
        b"a FETCH 1 FLAGS)",
        b"a FETCH 1",
        b"a FETCH (FLAGS)",
    ):
        refused(bad)


def test_fetch_modifiers_and_implicit_items() -> None:
    command = parse(b"A999 UID FETCH 4827313:4828442 FLAGS")
    assert [i.name for i in command.items] == ["FLAGS", "UID"]  # type: ignore[attr-defined]
    command = parse(b"s100 UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)", QRESYNC)
    assert isinstance(command, c.Fetch)
    assert command.changed_since == 12345 and command.vanished
    assert [i.name for i in command.items] == ["FLAGS", "UID", "MODSEQ"]
    refused(b"s UID FETCH 1 FLAGS (CHANGEDSINCE 1 VANISHED)")  # QRESYNC not enabled
    refused(b"s FETCH 1 FLAGS (CHANGEDSINCE 1 VANISHED)", QRESYNC)  # not UID FETCH
    refused(b"s UID FETCH 1 FLAGS (VANISHED)", QRESYNC)
    refused(b"s FETCH 1 FLAGS (FOO)")


def test_search_rfc_examples() -> None:
    command = parse(b'A282 SEARCH RETURN (MIN COUNT) FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"')
    assert command == c.Search(
        tag="A282",
        return_options=("MIN", "COUNT"),
        criteria=And(
            (
                FlagTest("\\Flagged"),
                DateTest("SINCE", date(1994, 2, 1)),
                Not(HeaderContains("FROM", "Smith")),
            )
        ),
    )
    assert parse(b"A283 SEARCH RETURN () FLAGGED").return_options == ("ALL",)  # type: ignore[attr-defined]
    assert parse(b'A284 SEARCH TEXT "string not in mailbox"').criteria == TextContains(  # type: ignore[attr-defined]
        "string not in mailbox", headers=True
    )
    command = parse(
        b"A285 SEARCH CHARSET UTF-8 TEXT {12}\r\n\xd0\xbe\xd1\x82\xd0\xbf\xd1\x83\xd1\x81\xd0\xba"
    )
    assert isinstance(command, c.Search) and command.charset == "UTF-8"
    assert command.criteria == TextContains("отпуск", headers=True)
    error = refused(b'A286 SEARCH CHARSET INVALID TEXT "Whatever"')
    assert error.status == "NO" and error.code == ("BADCHARSET", "(US-ASCII UTF-8)")
    refused(b"a SEARCH CHARSET US-ASCII TEXT {2}\r\n\xc3\xa9")


def test_every_search_key() -> None:
    text = (
        b"ALL ANSWERED BCC a BEFORE 1-Feb-1994 BODY b CC c DELETED DRAFT FLAGGED FROM d "
        b'HEADER X-Spam "" KEYWORD $Junk LARGER 100 NEW NOT SEEN OLD ON "2-Mar-2000" '
        b"OR RECENT UNSEEN SEEN SENTBEFORE 1-Jan-2000 SENTON 1-Jan-2000 SENTSINCE 1-Jan-2000 "
        b"SINCE 1-Jan-2000 SMALLER 5 SUBJECT e TEXT f TO g UID 1:* UNANSWERED UNDELETED "
        b"UNDRAFT UNFLAGGED UNKEYWORD foo UNSEEN 1,3:5 $ (DELETED SEEN) OLDER 60 YOUNGER 30 "
        b"MODSEQ 5"
    )
    command = parse(b"a SEARCH " + text)
    assert isinstance(command, c.Search)
    keys = command.criteria.keys  # type: ignore[union-attr]
    assert len(keys) == 40
    assert keys[0] == All()
    assert HeaderContains("X-SPAM", "") in keys
    assert SizeTest(100, larger=True) in keys
    assert And((FlagTest("\\Recent"), FlagTest("\\Seen", False))) in keys  # NEW
    assert FlagTest("\\Recent", False) in keys  # OLD
    assert Or(FlagTest("\\Recent"), FlagTest("\\Seen", False)) in keys
    assert DateTest("ON", date(2000, 1, 1), sent=True) in keys
    assert SequenceTest(SequenceSet.parse("1:*"), uid=True) in keys
    assert SequenceTest(SequenceSet.parse("$")) in keys
    assert ModSeqTest(5) in keys
    command = parse(b'a SEARCH MODSEQ "/flags/\\\\draft" all 620162338')
    assert command.criteria == ModSeqTest(620162338, "/flags/\\draft", "all")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "line",
    [
        b"a SEARCH",
        b"a SEARCH FOO",
        b"a SEARCH (SEEN",
        b"a SEARCH SEEN)",
        b"a SEARCH ()",
        b"a SEARCH OR SEEN",
        b"a SEARCH NOT",
        b"a SEARCH SINCE 31-Feb-2000",
        b"a SEARCH SINCE yesterday",
        b"a SEARCH LARGER x",
        b"a SEARCH KEYWORD",
        b"a SEARCH HEADER x",
        b"a SEARCH RETURN (BOGUS) ALL",
        b"a SEARCH CHARSET",
        b"a SEARCH OLDER 0",
        b'a SEARCH MODSEQ "/x" all 1',
        b'a SEARCH MODSEQ "/flags/x" none 1',
        b"a SEARCH  ALL",
        b"a SEARCH ALL ",
        b"a SEARCH SUBJECT \xe9t\xe9",
    ],
)
def test_malformed_search(line: bytes) -> None:
    refused(line)


def test_search_depth_is_bounded() -> None:
    context = GrammarContext(max_search_depth=32)
    assert parse(b"a SEARCH " + b"NOT " * 31 + b"ALL", context)
    with pytest.raises(SearchTooDeep):
        parse(b"a SEARCH " + b"NOT " * 32 + b"ALL", context)
    with pytest.raises(SearchTooDeep):
        parse(b"a SEARCH " + b"(" * 40 + b"ALL" + b")" * 40, context)
    with pytest.raises(SearchTooDeep):
        parse(b"a SEARCH " + b"OR ALL " * 40 + b"ALL", context)
    # Far deeper than Python's recursion limit: refused at the limit, not by a RecursionError.
    with pytest.raises(SearchTooDeep):
        parse(b"a SEARCH " + b"(" * 20000 + b"ALL" + b")" * 20000, context)


def test_sort_and_thread() -> None:
    # RFC 5256 §5 examples.
    command = parse(b"A282 SORT (SUBJECT) UTF-8 SINCE 1-Feb-1994")
    assert command == c.Sort(
        tag="A282",
        criteria=(c.SortCriterion(key="SUBJECT"),),
        charset="UTF-8",
        search=DateTest("SINCE", date(1994, 2, 1)),
    )
    command = parse(b"A283 UID SORT (SUBJECT REVERSE DATE) UTF-8 ALL")
    assert command.criteria == (  # type: ignore[attr-defined]
        c.SortCriterion(key="SUBJECT"),
        c.SortCriterion(key="DATE", reverse=True),
    )
    assert command.name == "UID SORT"
    refused(b"a SORT (SUBJECT REVERSE) UTF-8 ALL")
    refused(b"a SORT () UTF-8 ALL")
    refused(b"a SORT (BOGUS) UTF-8 ALL")
    refused(b"a SORT (DATE) ALL")  # the charset is mandatory
    command = parse(b"A283 THREAD ORDEREDSUBJECT UTF-8 SINCE 5-MAR-2000")
    assert command == c.Thread(
        tag="A283",
        algorithm="ORDEREDSUBJECT",
        charset="UTF-8",
        search=DateTest("SINCE", date(2000, 3, 5)),
    )
    assert parse(b"A284 UID THREAD REFERENCES US-ASCII ALL").uid  # type: ignore[attr-defined]
    refused(b"a THREAD BOGUS UTF-8 ALL")


# -- malformed input in general -------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"a",
        b"a ",
        b"+ NOOP",
        b"a\xff NOOP",
        b"a FROBNICATE",
        b"a NO\xc3\xa9OP",
        b"a LOGIN \xff\xfe pw",
        b"a SELECT (INBOX",
        b"a SELECT INBOX)",
        b'a SELECT "IN\\BOX"',
        b"a FETCH 1 (FLAGS ((BODY)",
        b"a  NOOP",
        b"a FETCH 1:2:3 FLAGS",
        b"a STATUS INBOX (MESSAGES",
        b"a LIST {3}",
    ],
)
def test_malformed_commands_are_command_errors(line: bytes) -> None:
    with pytest.raises(CommandError):
        parse_command(RawCommand([line]), REV1)


def test_split_head() -> None:
    assert split_head(b"a1 uid fetch 1 FLAGS").name == "UID FETCH"
    assert split_head(b"a1 LOGIN {3}").name == "LOGIN"
    assert split_head(b"a1").tag == "a1" and split_head(b"a1").name is None
    assert split_head(b"+x NOOP").tag is None
    assert split_head(b"a{1} NOOP").tag is None


_TOKENS = st.sampled_from(
    [
        b"a1",
        b" ",
        b"(",
        b")",
        b'"',
        b"\\",
        b"{3}",
        b"~{2}",
        b"*",
        b"1:*",
        b"$",
        b"UID",
        b"FETCH",
        b"SEARCH",
        b"STORE",
        b"LIST",
        b"APPEND",
        b"SELECT",
        b"NOT",
        b"OR",
        b"BODY[",
        b"]",
        b"<0.1>",
        b"FLAGS",
        b"\\Seen",
        b"\xc3\xa9",
        b"\x00",
        b"&AGE-",
        b"INBOX",
        b"RETURN",
        b"CHARSET",
        b"UTF-8",
        b"1-Feb-1994",
        b"QRESYNC",
        b"12",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_TOKENS, max_size=30), st.lists(st.binary(max_size=5), max_size=3), st.booleans())
def test_grammar_never_raises_anything_but_command_error(
    tokens: list[bytes], literals: list[bytes], utf8: bool
) -> None:
    raw = RawCommand(
        [b"t " + b"".join(tokens)] + [b""] * len(literals), [Literal(d) for d in literals]
    )
    context = GrammarContext(utf8_names=utf8, qresync=True, max_search_depth=4)
    try:
        command = parse_command(raw, context)
    except CommandError as error:
        assert error.text and error.status in ("BAD", "NO")
    else:
        assert command.tag == "t"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_framer_never_raises_on_arbitrary_bytes(data: bytes, step: int) -> None:
    framer = CommandFramer(FramingLimits(line=64, literal=32, literal_unauthenticated=8))
    for i in range(0, len(data), step):
        framer.receive(data[i : i + step])
        while (event := framer.next_event()) is not NEED_DATA:
            if isinstance(event, LiteralAnnounced):
                framer.accept_literal()
            assert framer.buffered <= 64 + 32 + step + 2
