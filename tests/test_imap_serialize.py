"""Response serialization: every untagged data kind, status responses, codes and quoting."""

from datetime import datetime, timedelta, timezone

import pytest

from postvern.imap.grammar.commands import FetchItem, Section
from postvern.imap.sequence import SequenceSet
from postvern.imap.serialize import (
    CapabilityData,
    Code,
    Completion,
    Condition,
    Continuation,
    EnabledData,
    ESearchData,
    ExistsData,
    ExpungeData,
    FetchData,
    FlagsData,
    IdData,
    ListData,
    NamespaceData,
    QuotaData,
    QuotaRootData,
    RecentData,
    ResponseCode,
    SearchData,
    SortData,
    Status,
    StatusData,
    ThreadData,
    ThreadNode,
    VanishedData,
)
from postvern.imap.wire import Atom, Binary, WireContext, render
from postvern.mime.model import Address, BodyPart, Envelope

UTF8 = WireContext(utf8=True)


def test_tagged_completions_with_codes() -> None:
    assert Completion.ok("a1").to_bytes() == b"a1 OK completed\r\n"
    assert Completion.no("a2", "no such mailbox", ResponseCode(Code.TRYCREATE)).to_bytes() == (
        b"a2 NO [TRYCREATE] no such mailbox\r\n"
    )
    assert Completion.bad("a3", "").to_bytes() == b"a3 BAD invalid command\r\n"
    # RFC 4315 examples.
    assert Completion.ok(
        "A003", "APPEND completed", ResponseCode.appenduid(38505, [3955])
    ).to_bytes() == (b"A003 OK [APPENDUID 38505 3955] APPEND completed\r\n")
    code = ResponseCode.copyuid(38505, [304, 319, 320], [3956, 3957, 3958])
    assert Completion.ok("A004", "Done", code).to_bytes() == (
        b"A004 OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n"
    )
    # RFC 7162: MODIFIED with the numbers that failed UNCHANGEDSINCE.
    code = ResponseCode.modified([9, 7, 8, 12])
    assert Completion.ok("d105", "Conditional STORE failed", code).to_bytes() == (
        b"d105 OK [MODIFIED 7:9,12] Conditional STORE failed\r\n"
    )


@pytest.mark.parametrize(
    ("code", "wire"),
    [
        (ResponseCode(Code.ALERT), b"[ALERT]"),
        (ResponseCode.uidnext(4392), b"[UIDNEXT 4392]"),
        (ResponseCode.uidvalidity(3857529045), b"[UIDVALIDITY 3857529045]"),
        (ResponseCode.highest_modseq(715194045007), b"[HIGHESTMODSEQ 715194045007]"),
        (ResponseCode(Code.NOMODSEQ), b"[NOMODSEQ]"),
        (ResponseCode(Code.AUTHENTICATIONFAILED), b"[AUTHENTICATIONFAILED]"),
        (ResponseCode(Code.NONEXISTENT), b"[NONEXISTENT]"),
        (ResponseCode(Code.ALREADYEXISTS), b"[ALREADYEXISTS]"),
        (ResponseCode(Code.CANNOT), b"[CANNOT]"),
        (ResponseCode(Code.LIMIT), b"[LIMIT]"),
        (ResponseCode(Code.OVERQUOTA), b"[OVERQUOTA]"),
        (ResponseCode(Code.UNKNOWN_CTE), b"[UNKNOWN-CTE]"),
        (ResponseCode(Code.CLOSED), b"[CLOSED]"),
        (ResponseCode(Code.SERVERBUG), b"[SERVERBUG]"),
        (ResponseCode(Code.INUSE), b"[INUSE]"),
        (ResponseCode(Code.NOPERM), b"[NOPERM]"),
        (ResponseCode(Code.PRIVACYREQUIRED), b"[PRIVACYREQUIRED]"),
        (ResponseCode(Code.PARSE), b"[PARSE]"),
        (ResponseCode(Code.READ_ONLY), b"[READ-ONLY]"),
        (ResponseCode(Code.READ_WRITE), b"[READ-WRITE]"),
        (ResponseCode(Code.TOOBIG), b"[TOOBIG]"),
        (ResponseCode.badcharset(["US-ASCII", "UTF-8"]), b"[BADCHARSET (US-ASCII UTF-8)]"),
        (
            ResponseCode.permanent_flags(["\\Deleted", "\\Seen", "\\*"]),
            b"[PERMANENTFLAGS (\\Deleted \\Seen \\*)]",
        ),
        (ResponseCode.capability(["IMAP4rev2", "IDLE"]), b"[CAPABILITY IMAP4rev2 IDLE]"),
        (ResponseCode.from_pair(("TOOBIG", None)), b"[TOOBIG]"),
    ],
)
def test_response_codes(code: ResponseCode, wire: bytes) -> None:
    assert Condition(Status.OK, "x", code).to_bytes() == b"* OK " + wire + b" x\r\n"


def test_untagged_status_and_text_injection() -> None:
    assert Condition(Status.BYE, "shutting down").to_bytes() == b"* BYE shutting down\r\n"
    assert Condition(Status.PREAUTH, "hi").to_bytes() == b"* PREAUTH hi\r\n"
    # A CR or LF in human text must not let anyone start a new response line.
    injected = Completion.no("a", "bad\r\na OK fake\nmore").to_bytes()
    assert injected == b"a NO bad  a OK fake more\r\n"
    assert injected.count(b"\r\n") == 1


def test_continuations() -> None:
    assert Continuation("Ready for literal data").to_bytes() == b"+ Ready for literal data\r\n"
    assert Continuation().to_bytes() == b"+ \r\n"
    assert Continuation(challenge=b"\x00\xff").to_bytes() == b"+ AP8=\r\n"


def test_mailbox_state_data() -> None:
    assert ExistsData(23).to_bytes() == b"* 23 EXISTS\r\n"
    assert RecentData(5).to_bytes() == b"* 5 RECENT\r\n"
    assert ExpungeData(3).to_bytes() == b"* 3 EXPUNGE\r\n"
    assert FlagsData(["\\Answered", "\\Flagged", "$Forwarded"]).to_bytes() == (
        b"* FLAGS (\\Answered \\Flagged $Forwarded)\r\n"
    )
    assert VanishedData([41, 43, 44, 45, 116]).to_bytes() == b"* VANISHED 41,43:45,116\r\n"
    assert VanishedData(SequenceSet.parse("300:310,405"), earlier=True).to_bytes() == (
        b"* VANISHED (EARLIER) 300:310,405\r\n"
    )


def test_capability_and_enabled() -> None:
    assert CapabilityData(["IMAP4rev2", "AUTH=PLAIN"]).to_bytes() == (
        b"* CAPABILITY IMAP4rev2 AUTH=PLAIN\r\n"
    )
    assert EnabledData(["CONDSTORE"]).to_bytes() == b"* ENABLED CONDSTORE\r\n"
    assert EnabledData([]).to_bytes() == b"* ENABLED\r\n"


def test_list_and_lsub() -> None:
    assert ListData("INBOX", ["\\HasNoChildren"]).to_bytes() == (
        b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n'
    )
    assert (
        ListData("", ["\\Noselect"], delimiter="/").to_bytes() == b'* LIST (\\Noselect) "/" ""\r\n'
    )
    assert ListData("x", [], delimiter=None, lsub=True).to_bytes() == b'* LSUB () NIL "x"\r\n'
    # RFC 5258 CHILDINFO and RFC 5465 OLDNAME extended data.
    assert ListData("Foo", ["\\NonExistent"], childinfo=["SUBSCRIBED"]).to_bytes() == (
        b'* LIST (\\NonExistent) "/" "Foo" ("CHILDINFO" ("SUBSCRIBED"))\r\n'
    )
    assert ListData("New", [], old_name="Old").to_bytes() == (
        b'* LIST () "/" "New" ("OLDNAME" ("Old"))\r\n'
    )
    # RFC 3501 clients get modified UTF-7; IMAP4rev2/UTF8=ACCEPT ones get UTF-8.
    assert ListData("Entwürfe/&Co", ["\\Drafts"]).to_bytes() == (
        b'* LIST (\\Drafts) "/" "Entw&APw-rfe/&-Co"\r\n'
    )
    assert ListData("Entwürfe/&Co", ["\\Drafts"]).to_bytes(UTF8) == (
        b'* LIST (\\Drafts) "/" "Entw\xc3\xbcrfe/&Co"\r\n'
    )
    assert ListData('a"b\\c', []).to_bytes() == b'* LIST () "/" "a\\"b\\\\c"\r\n'


def test_status_data() -> None:
    data = StatusData("blurdybloop", [("MESSAGES", 231), ("UIDNEXT", 44292)])
    assert data.to_bytes() == b'* STATUS "blurdybloop" (MESSAGES 231 UIDNEXT 44292)\r\n'


def test_search_family() -> None:
    assert SearchData([2, 3, 6]).to_bytes() == b"* SEARCH 2 3 6\r\n"
    assert SearchData([]).to_bytes() == b"* SEARCH\r\n"
    assert SearchData([2, 5], modseq=917162500).to_bytes() == b"* SEARCH 2 5 (MODSEQ 917162500)\r\n"
    assert SortData([5, 3, 4, 1, 2]).to_bytes() == b"* SORT 5 3 4 1 2\r\n"
    # RFC 4731 / RFC 9051 §7.3.4 examples.
    assert (
        ESearchData("A282", min=2, count=3).to_bytes()
        == b'* ESEARCH (TAG "A282") MIN 2 COUNT 3\r\n'
    )
    assert (
        ESearchData("A283", all=[2, 10, 11]).to_bytes() == b'* ESEARCH (TAG "A283") ALL 2,10:11\r\n'
    )
    assert ESearchData("A284", uid=True, count=0, all=[]).to_bytes() == (
        b'* ESEARCH (TAG "A284") UID COUNT 0\r\n'
    )
    assert ESearchData("a", min=1, max=9, modseq=5).to_bytes() == (
        b'* ESEARCH (TAG "a") MIN 1 MAX 9 MODSEQ 5\r\n'
    )


def test_thread_data() -> None:
    # RFC 5256 §4 example: (2)(3 6 (4 23)(44 7 96)).
    threads = [
        ThreadNode(2),
        ThreadNode(
            3,
            [
                ThreadNode(
                    6,
                    [
                        ThreadNode(4, [ThreadNode(23)]),
                        ThreadNode(44, [ThreadNode(7, [ThreadNode(96)])]),
                    ],
                )
            ],
        ),
    ]
    assert ThreadData(threads).to_bytes() == b"* THREAD (2)(3 6 (4 23)(44 7 96))\r\n"
    # A missing parent: ((3)(5)).
    assert ThreadData([ThreadNode(None, [ThreadNode(3), ThreadNode(5)])]).to_bytes() == (
        b"* THREAD ((3)(5))\r\n"
    )
    assert ThreadData([]).to_bytes() == b"* THREAD\r\n"


def test_namespace_quota_id() -> None:
    assert NamespaceData().to_bytes() == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
    assert QuotaData("", [("STORAGE", 10, 512)]).to_bytes() == b'* QUOTA "" (STORAGE 10 512)\r\n'
    assert QuotaRootData("INBOX", [""]).to_bytes() == b'* QUOTAROOT "INBOX" ""\r\n'
    assert IdData([("name", "Postvern"), ("os", None)]).to_bytes() == (
        b'* ID ("name" "Postvern" "os" NIL)\r\n'
    )
    assert IdData(None).to_bytes() == b"* ID NIL\r\n"


def test_fetch_data_items() -> None:
    when = datetime(1996, 7, 17, 2, 44, 25, tzinfo=timezone(-timedelta(hours=7)))
    section = FetchItem(
        name="BODY",
        section=Section(specifier="HEADER.FIELDS", fields=("DATE",)),
        partial=(0, 10),
        peek=True,
    )
    data = FetchData(
        12,
        [
            ("FLAGS", ["\\Seen", "$Junk"]),
            ("INTERNALDATE", when),
            ("RFC822.SIZE", 44827),
            ("UID", 4827313),
            ("MODSEQ", 624140003),
            (section.response_name, b"Date: x\r\n"),
            ("BODY[1]", None),
            ("BINARY[2]", b"\x00\x01"),
            ("BINARY[3]", b"plain"),
            ("BINARY.SIZE[2]", 2),
        ],
    )
    assert data.to_bytes() == (
        b'* 12 FETCH (FLAGS (\\Seen $Junk) INTERNALDATE "17-Jul-1996 02:44:25 -0700" '
        b"RFC822.SIZE 44827 UID 4827313 MODSEQ (624140003) BODY[HEADER.FIELDS (DATE)]<0> "
        b'{9}\r\nDate: x\r\n BODY[1] NIL BINARY[2] ~{2}\r\n\x00\x01 BINARY[3] "plain" '
        b"BINARY.SIZE[2] 2)\r\n"
    )


def test_fetch_structures() -> None:
    envelope = Envelope(subject="hi", from_=[Address(None, None, "a", "b")])
    part = BodyPart(type="TEXT", subtype="PLAIN", size=3, lines=1)
    data = FetchData(1, [("ENVELOPE", envelope), ("BODY", part), ("BODYSTRUCTURE", part)])
    assert data.to_bytes() == (
        b'* 1 FETCH (ENVELOPE (NIL "hi" ((NIL NIL "a" "b")) ((NIL NIL "a" "b")) '
        b'((NIL NIL "a" "b")) NIL NIL NIL NIL NIL) '
        b'BODY ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 3 1) '
        b'BODYSTRUCTURE ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 3 1 NIL NIL NIL NIL))\r\n'
    )


@pytest.mark.parametrize(
    ("value", "wire", "wire_utf8"),
    [
        ("plain", b'"plain"', b'"plain"'),
        ("", b'""', b'""'),
        ('say "hi" \\o/', b'"say \\"hi\\" \\\\o/"', b'"say \\"hi\\" \\\\o/"'),
        ("a\r\nb", b"{4}\r\na\r\nb", b"{4}\r\na\r\nb"),
        ("tab\there", b"{8}\r\ntab\there", b"{8}\r\ntab\there"),
        ("é", b"{2}\r\n\xc3\xa9", b'"\xc3\xa9"'),
        (b"\xff\xfe", b"{2}\r\n\xff\xfe", b"{2}\r\n\xff\xfe"),  # not UTF-8: always a literal
        (None, b"NIL", b"NIL"),
        (0, b"0", b"0"),
        (Atom("\\Seen"), b"\\Seen", b"\\Seen"),
        (Binary(b"nul\x00"), b"~{4}\r\nnul\x00", b"~{4}\r\nnul\x00"),
        ([1, [None, "x"], []], b'(1 (NIL "x") ())', b'(1 (NIL "x") ())'),
        (
            datetime(2024, 3, 5, 6, 7, 8),
            b'"05-Mar-2024 06:07:08 +0000"',
            b'"05-Mar-2024 06:07:08 +0000"',
        ),
    ],
)
def test_quoting_rules(value: object, wire: bytes, wire_utf8: bytes) -> None:
    assert render(value) == wire
    assert render(value, UTF8) == wire_utf8


def test_booleans_have_no_wire_form() -> None:
    with pytest.raises(TypeError):
        render(True)
