"""Points a third-party IMAP compliance suite found (issue #14) and NUL bytes in messages
(issue #12), each against the real server on loopback with a raw client or imaplib."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from test_imap_session import ALICE, Env, Wire, in_thread, make_env, message


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path):
        yield e


def search_numbers(lines: list[bytes]) -> list[int]:
    (line,) = [line for line in lines if line.startswith(b"* SEARCH")]
    return [int(n) for n in line.split()[2:]]


# -- 1. SEARCH TEXT and BODY match substrings (RFC 9051 §6.4.4) ------------------------------


async def test_search_text_and_body_match_substrings(env: Env) -> None:
    await env.deliver(ALICE, message("keyboard rows", "asdfghjkl\r\nqwertyuiop zxcvbnm"))
    await env.deliver(ALICE, message("other", "Nothing like it; see Kl\u00e4rung."))

    def session() -> dict[str, list[int]]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        out = {
            name: search_numbers(wire.ok(f"SEARCH {query}"))
            for name, query in {
                "text": "TEXT sdfghjk",
                "body": 'BODY "GHJKL QWERT"',  # case folded, across the line break
                "header": "TEXT eyboa",
                "body_not_header": "BODY eyboa",
                "two_chars": "BODY kl",  # too short for the index: scanned
                "one_char": "TEXT z",
                "empty": 'BODY ""',
            }.items()
        }
        wire.close()
        return out

    out = await in_thread(session)
    assert out["text"] == [1]
    assert out["body"] == [1]
    assert out["header"] == [1]
    assert out["body_not_header"] == []
    assert out["two_chars"] == [1, 2]
    assert out["one_char"] == [1]
    assert out["empty"] == [1, 2]


# -- 2. SORT by CC and by base subject (RFC 5256 §2.1, §3) -----------------------------------

# (Subject as sent, its base subject worked out by hand from RFC 5256 §2.1's steps.)
SUBJECTS = [
    ("Re: [list] Re: hello", "hello"),
    ("[list] hello", "hello"),
    ("[list]", "[list]"),  # step 4: removing the blob would leave nothing
    ("[a][b]", "[b]"),
    ("Re: Fwd: RE: FW: zebra (fwd) (fwd)", "zebra"),  # step 2 repeated, step 3 repeated
    ("Re[2]: apple", "apple"),  # subj-refwd may hold a blob before its colon
    ("Re :apple", "apple"),
    ("[fwd: banana split]", "banana split"),  # step 6
    ("Re: [fwd: Re: banana split]", "banana split"),
    ("[fwd: [fwd: cherry]]", "cherry"),  # step 6, then again from step 2
    ("Fwd: [list] [fwd: cherry] (fwd)", "cherry"),
    ("=?utf-8?q?Re=3A_caf=C3=A9?=", "caf\u00e9"),  # step 1: encoded words decoded first
    ("Re:   date \t   palm  ", "date palm"),  # step 1: white space collapsed
    ("Rex: apple", "Rex: apple"),  # not a leader
    ("Fwd apple", "Fwd apple"),
    ("re: re:", ""),
    ("(fwd)", ""),
    ("date (fwd) palm", "date (fwd) palm"),  # "(fwd)" is only a trailer at the end
    ("HELLO(FWD)", "HELLO"),
    ("[fwd: elder] extra", "extra"),  # not a wrapper: it is a blob (step 4)
    ("[fwd: Re: [list] elder]", "elder"),
    ("_underscore", "_underscore"),  # i;ascii-casemap: "_" sorts after the letters
    ("[x] [y] re: fig", "fig"),
    ("fwd:fw:re:fig", "fig"),
    ("Apple", "Apple"),  # ties with "apple": the sequence number decides
]


async def test_sort_subject_uses_the_base_subject(env: Env) -> None:
    for subject, _ in SUBJECTS:
        await env.deliver(ALICE, message(subject))

    def session() -> list[bytes]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        lines = wire.ok("SORT (SUBJECT) UTF-8 ALL")
        wire.close()
        return lines

    (line,) = await in_thread(session)
    # i;ascii-casemap (RFC 4790 §9.2): UTF-8 octets, ASCII letters upper-cased; ties in
    # sequence order (RFC 5256 §3).
    expected = sorted(
        range(1, len(SUBJECTS) + 1), key=lambda n: (SUBJECTS[n - 1][1].encode().upper(), n)
    )
    assert line == b"* SORT " + " ".join(map(str, expected)).encode() + b"\r\n"


async def test_sort_cc_uses_the_first_cc_mailbox(env: Env) -> None:
    ccs = [
        "Zed <bob@example.test>",  # bob: the display name does not count
        None,  # no Cc: the empty string, first
        "alice@example.test, aaron@example.test",  # the first address only
        "Carol <CAROL@example.test>",  # case-insensitive: carol
        "a_b@example.test",  # "_" sorts after the letters: after "ab" and "alice"
        "ab@example.test",
        "bob@other.test",  # ties with 1: sequence order
        "friends: zoe@example.test;",  # a group: its name is the first addr-mailbox
    ]
    for n, cc in enumerate(ccs):
        await env.deliver(ALICE, message(f"cc {n}", extra=f"Cc: {cc}\r\n" if cc else ""))

    def session() -> list[bytes]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        out = wire.ok("SORT (CC) UTF-8 ALL") + wire.ok("SORT (REVERSE CC) UTF-8 ALL")
        wire.close()
        return out

    forward, reverse = await in_thread(session)
    assert forward == b"* SORT 2 6 3 5 1 7 4 8\r\n"
    assert reverse == b"* SORT 8 4 1 7 5 3 6 2\r\n"


# -- 3. LIST-EXTENDED (RFC 5258) and LSUB (RFC 3501 §6.3.9) ----------------------------------

DEFAULT_FOLDERS = {"INBOX", "Drafts", "Sent", "Archive", "Junk", "Trash"}
_LIST_LINE = re.compile(rb'\* (LIST|LSUB) \(([^)]*)\) "/" "?([^"\r]*?)"?( \(.*\))?\r\n')
_CHILDREN = {"\\HasChildren", "\\HasNoChildren"}

Listed = tuple[str, frozenset[str], str]


def listed(lines: list[bytes], *, children: bool = False) -> list[Listed]:
    """(name, attributes, extended data) of each LIST/LSUB line, the default folders left
    out; \\HasChildren/\\HasNoChildren left out unless the example asked for CHILDREN."""
    out = []
    for line in lines:
        m = _LIST_LINE.fullmatch(line)
        assert m is not None, line
        name = m.group(3).decode()
        if name in DEFAULT_FOLDERS:
            continue
        attributes = frozenset(m.group(2).decode().split())
        if not children:
            attributes -= _CHILDREN
        out.append((name, attributes, (m.group(4) or b"").decode().strip()))
    return out


def row(name: str, *attributes: str, extra: str = "") -> Listed:
    return (name, frozenset(attributes), extra)


CHILDINFO = '("CHILDINFO" ("SUBSCRIBED"))'
FRUIT = ["Fruit", "Fruit/Apple", "Fruit/Banana"]
FOO2 = ["foo2", "foo2/bar1", "foo2/bar2"]


def setup_folders(wire: Wire, names: list[str], subscribed: list[str], gone: list[str]) -> None:
    """Create ``names`` and ``gone``, subscribe exactly ``subscribed``, then delete ``gone``
    (deepest first): their subscriptions outlive them."""
    for name in names + gone:
        wire.ok(f'CREATE "{name}"')
    for name in names + gone:
        wire.ok(f'{"SUBSCRIBE" if name in subscribed else "UNSUBSCRIBE"} "{name}"')
    for name in sorted(gone, key=len, reverse=True):
        wire.ok(f'DELETE "{name}"')


async def test_rfc5258_section5_examples(env: Env) -> None:
    def session() -> dict[str, list[bytes]]:
        wire = env.wire()
        out: dict[str, list[bytes]] = {}
        setup_folders(
            wire,
            [*FRUIT, "Tofu", "Vegetable", "Vegetable/Broccoli", "Vegetable/Corn"],
            ["Fruit/Banana", "Fruit/Peach", "Vegetable", "Vegetable/Broccoli"],
            ["Fruit/Peach"],
        )
        out["2"] = wire.ok('LIST (SUBSCRIBED) "" "*"')
        out["3"] = wire.ok('LIST () "" "%" RETURN (CHILDREN)')
        out["6"] = wire.ok('LIST "" "*" RETURN (SUBSCRIBED)')
        out["7"] = wire.ok('LIST "" ("INBOX" "Vegetable" "Fruit/%")')
        out["both"] = wire.ok('LIST "" "*" RETURN (CHILDREN SUBSCRIBED)')
        for name in ("Fruit/Banana", "Vegetable", "Vegetable/Broccoli"):
            wire.ok(f'UNSUBSCRIBE "{name}"')
        out["unsubscribe_gone"] = wire.ok('UNSUBSCRIBE "Fruit/Peach"')
        out["after"] = wire.ok('LIST (SUBSCRIBED) "" "*"')
        # Example 8: a hierarchy of its own.
        setup_folders(wire, ["Foo", "Foo/Bar", "Foo/Baz", "Moo"], ["Foo/Baz"], [])
        out["8a"] = wire.ok('LIST "" "*"')
        out["8b"] = wire.ok('LIST "" "%" RETURN (CHILDREN)')
        out["8c"] = wire.ok('LIST (SUBSCRIBED) "" "*"')
        out["8d"] = wire.ok('LIST (SUBSCRIBED) "" "%"')
        out["8e"] = wire.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
        wire.ok('SUBSCRIBE "Foo"')
        out["8f"] = wire.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
        wire.ok('UNSUBSCRIBE "Foo"')
        wire.ok('UNSUBSCRIBE "Foo/Baz"')
        setup_folders(wire, [], ["Xyzzy/Plugh"], ["Xyzzy", "Xyzzy/Plugh"])
        out["8g"] = wire.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
        wire.ok('UNSUBSCRIBE "Xyzzy/Plugh"')
        out["8h"] = wire.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
        wire.ok('SUBSCRIBE "Foo"')
        wire.ok('SUBSCRIBE "Moo"')
        out["8i"] = wire.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)')
        wire.close()
        return out

    out = await in_thread(session)
    assert listed(out["2"]) == [
        row("Fruit/Banana", "\\Subscribed"),
        row("Fruit/Peach", "\\Subscribed", "\\NonExistent"),
        row("Vegetable", "\\Subscribed"),
        row("Vegetable/Broccoli", "\\Subscribed"),
    ]
    assert listed(out["3"], children=True) == [
        row("Fruit", "\\HasChildren"),
        row("Tofu", "\\HasNoChildren"),
        row("Vegetable", "\\HasChildren"),
    ]
    assert listed(out["6"]) == [
        row("Fruit"),
        row("Fruit/Apple"),
        row("Fruit/Banana", "\\Subscribed"),
        row("Tofu"),
        row("Vegetable", "\\Subscribed"),
        row("Vegetable/Broccoli", "\\Subscribed"),
        row("Vegetable/Corn"),
    ]
    assert listed(out["7"]) == [row("Fruit/Apple"), row("Fruit/Banana"), row("Vegetable")]
    # RETURN (CHILDREN SUBSCRIBED): both kinds of attribute on every line.
    both = listed(out["both"], children=True)
    assert len(both) == 7 and all(len(attrs & _CHILDREN) == 1 for _, attrs, _ in both)
    assert {name for name, attrs, _ in both if "\\Subscribed" in attrs} == {
        "Fruit/Banana",
        "Vegetable",
        "Vegetable/Broccoli",
    }
    assert listed(out["after"]) == []  # the vanished name could be unsubscribed
    assert listed(out["8a"]) == [row("Foo"), row("Foo/Bar"), row("Foo/Baz"), row("Fruit")] + [
        row(name) for name in ("Fruit/Apple", "Fruit/Banana", "Moo", "Tofu", "Vegetable")
    ] + [row("Vegetable/Broccoli"), row("Vegetable/Corn")]
    assert listed(out["8b"], children=True)[:2] == [
        row("Foo", "\\HasChildren"),
        row("Fruit", "\\HasChildren"),
    ]
    assert row("Moo", "\\HasNoChildren") in listed(out["8b"], children=True)
    assert listed(out["8c"]) == [row("Foo/Baz", "\\Subscribed")]
    assert listed(out["8d"]) == []
    assert listed(out["8e"]) == [row("Foo", extra=CHILDINFO)]
    assert listed(out["8f"]) == [row("Foo", "\\Subscribed", extra=CHILDINFO)]
    assert listed(out["8g"]) == [row("Xyzzy", "\\NonExistent", extra=CHILDINFO)]
    assert listed(out["8h"]) == []
    assert listed(out["8i"], children=True) == [
        row("Foo", "\\Subscribed", "\\HasChildren"),
        row("Moo", "\\Subscribed", "\\HasNoChildren"),
    ]


async def test_rfc5258_example9_recursivematch_with_a_pattern(env: Env) -> None:
    def session() -> list[bytes]:
        wire = env.wire()
        subscribed = ["foo2/bar1", "foo2/bar2", "baz2/bar2", "baz2/bar22", "baz2/bar222"]
        subscribed += ["eps2", "eps2/mamba", "qux2/bar2"]
        setup_folders(
            wire,
            [*FOO2, "baz2", "baz2/bar2", "baz2/bar22", "baz2/bar222", "eps2", "eps2/mamba"],
            subscribed,
            ["qux2", "qux2/bar2"],
        )
        lines = wire.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "*2"')
        wire.close()
        return lines

    # foo2 is returned for foo2/bar1, which "*2" does not reach; baz2 is not: each of its
    # subscribed children is returned on its own line (RFC 5258 §3.5's SHOULD NOT).
    assert listed(await in_thread(session)) == [
        row("baz2/bar2", "\\Subscribed"),
        row("baz2/bar22", "\\Subscribed"),
        row("baz2/bar222", "\\Subscribed"),
        row("eps2", "\\Subscribed", extra=CHILDINFO),
        row("foo2", extra=CHILDINFO),
        row("foo2/bar2", "\\Subscribed"),
        row("qux2/bar2", "\\Subscribed", "\\NonExistent"),
    ]


async def test_lsub_percent_returns_an_unsubscribed_parent_as_noselect(env: Env) -> None:
    def session() -> dict[str, list[bytes]]:
        wire = env.wire()
        setup_folders(
            wire, ["foo", "foo/bar", "news"], ["foo/bar", "gone/away"], ["gone", "gone/away"]
        )
        out = {"percent": wire.ok('LSUB "" "%"'), "star": wire.ok('LSUB "" "*"')}
        wire.close()
        return out

    out = await in_thread(session)
    # RFC 3501 §6.3.9: foo is not subscribed but foo/bar is, and "%" stops at foo.
    assert listed(out["percent"]) == [row("foo", "\\Noselect"), row("gone", "\\Noselect")]
    assert listed(out["star"]) == [row("foo/bar"), row("gone/away", "\\Noselect")]


# -- 4. Empty parts (RFC 9051 §6.4.5, RFC 3516) -----------------------------------------------

EMPTY_PART = (
    b"From: Dave <dave@example.test>\r\nSubject: empty part\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"\r\n--XX\r\nContent-Type: text/plain\r\n\r\nsecond\r\n--XX--\r\n"
)
EMPTY_BODY = b"From: Dave <dave@example.test>\r\nSubject: empty body\r\n\r\n"


async def test_empty_parts_are_empty_strings_and_missing_parts_nil(env: Env) -> None:
    await env.deliver(ALICE, EMPTY_PART)
    await env.deliver(ALICE, EMPTY_BODY)

    def session() -> dict[str, list[bytes]]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        fetch = "BODY.PEEK[1] BINARY.PEEK[1] BINARY.SIZE[1] BODY.PEEK[TEXT] BODY.PEEK[3]"
        out = {"part": wire.ok(f"FETCH 1 ({fetch})"), "body": wire.ok(f"FETCH 2 ({fetch})")}
        wire.close()
        return out

    out = await in_thread(session)
    assert out["part"][0].startswith(
        b'* 1 FETCH (BODY[1] "" BINARY[1] "" BINARY.SIZE[1] 0 BODY[TEXT] {'
    )
    assert out["part"][0].endswith(b" BODY[3] NIL)\r\n")
    assert out["body"] == [
        b'* 2 FETCH (BODY[1] "" BINARY[1] "" BINARY.SIZE[1] 0 BODY[TEXT] "" BODY[3] NIL)\r\n'
    ]


# -- 5. NUL in a message (issue #12; RFC 9051 §4.3, RFC 3516) --------------------------------

WITH_NUL = (
    b"From: Mallory <mallory@example.test>\r\nTo: alice@example.test\r\nSubject: nul\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"visible part\x00hidden tail marmalade\r\n"
)


def literals(line: bytes) -> list[tuple[bytes, bytes]]:
    """(marker, octets) of every literal in a response line read by Wire.line."""
    out = []
    for m in re.finditer(rb"(~?)\{(\d+)\}\r\n", line):
        out.append((m.group(1), line[m.end() : m.end() + int(m.group(2))]))
    return out


async def test_nul_is_never_sent_in_a_plain_literal(env: Env) -> None:
    def session() -> dict[str, object]:
        wire = env.wire()
        wire.send(b"A1 APPEND INBOX ~{%d}\r\n" % len(WITH_NUL) + WITH_NUL + b"\r\n")
        appended = wire.until(b"A1")[1]
        wire.ok("SELECT INBOX")
        out: dict[str, object] = {"appended": appended}
        for item in ("BODY.PEEK[]", "BODY.PEEK[TEXT]", "BODY.PEEK[1]", "RFC822", "RFC822.TEXT"):
            out[item] = wire.ok(f"FETCH 1 ({item} RFC822.SIZE BODYSTRUCTURE)")[0]
        out["binary"] = wire.ok("FETCH 1 (BINARY.PEEK[] BINARY.SIZE[1])")[0]
        out["search"] = wire.ok("SEARCH BODY marmalade")
        out["search_text"] = wire.ok("SEARCH TEXT tail")
        wire.close()
        client = env.client()
        client.select("INBOX")
        _, data = client.fetch("1", "(BODY.PEEK[])")
        client.logout()
        out["imaplib"] = data[0][1]  # type: ignore[index]
        return out

    out = await in_thread(session)
    assert out["appended"].startswith(b"A1 OK")  # type: ignore[union-attr]
    sent = WITH_NUL.replace(b"\x00", b"\x80")
    for item in ("BODY.PEEK[]", "RFC822"):
        ((marker, data),) = literals(out[item])  # type: ignore[arg-type]
        assert marker == b"" and data == sent
        assert b"RFC822.SIZE %d " % len(WITH_NUL) in out[item]  # type: ignore[operator]
    for item in ("BODY.PEEK[TEXT]", "BODY.PEEK[1]", "RFC822.TEXT"):
        ((marker, data),) = literals(out[item])  # type: ignore[arg-type]
        assert marker == b"" and data == b"visible part\x80hidden tail marmalade\r\n"
        # BODYSTRUCTURE's size of the text is the size of what is sent.
        assert b' "8BIT" %d ' % len(data) in out[item]  # type: ignore[operator]
    # BINARY[] keeps the stored octets exactly, in a literal8.
    ((marker, data),) = literals(out["binary"])  # type: ignore[arg-type]
    assert marker == b"~" and data == WITH_NUL
    assert b"BINARY.SIZE[1] 36" in out["binary"]  # type: ignore[operator]
    assert out["search"] == [b"* SEARCH 1\r\n"]
    assert out["search_text"] == [b"* SEARCH 1\r\n"]
    assert out["imaplib"] == sent
