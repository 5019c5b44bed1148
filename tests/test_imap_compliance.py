"""Points a third-party IMAP compliance suite found (issue #14) and NUL bytes in messages
(issue #12), each against the real server on loopback with a raw client or imaplib."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from test_imap_session import ALICE, Env, in_thread, make_env, message


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
