"""The DKIM body canonicalisation fast path (emailauth.canon) against dkimpy, and the parsed
message that travels the inbound pipeline (emailauth.headers.ParsedMessage).

Every message of every conformance corpus the tests have (dkimpy's, Mail::DKIM's, the ARC
suite's) and random bodies full of the characters the rules change must canonicalise to
exactly dkimpy's bytes; a rewritten ParsedMessage must hold the fields a fresh parse finds.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator

import dkim as dkimpy
import yaml
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import CORPORA
from postvern.emailauth import canon, dkim
from postvern.emailauth.headers import ParsedMessage, parse_header_block


def corpus_messages() -> Iterator[tuple[str, bytes]]:
    auth = CORPORA / "auth"
    for path in sorted((auth / "dkim_mail_dkim" / "corpus").rglob("*")):
        if path.is_file():
            yield path.name, path.read_bytes()
    for path in sorted((auth / "dkim_dkimpy").rglob("*")):
        if path.is_file() and (path.suffix in (".msg", ".mbox") or ".message" in path.name):
            yield path.name, path.read_bytes()
    for suite in sorted((auth / "arc_test_suite" / "tests").glob("*.yml")):
        for doc in yaml.safe_load_all(suite.read_text()):
            for name, case in ((doc or {}).get("tests") or {}).items():
                if isinstance(case, dict) and isinstance(case.get("message"), str):
                    yield f"{suite.name}:{name}", case["message"].encode()


def dkimpy_body(message: bytes) -> bytes | None:
    try:
        return dkimpy.rfc822_parse(message)[1]
    except dkimpy.MessageFormatError:
        return None


def test_every_corpus_message_canonicalises_as_dkimpy_does() -> None:
    checked = 0
    for name, message in corpus_messages():
        body = dkimpy_body(message)
        if body is None:
            continue
        parsed = ParsedMessage(message)
        assert parsed.body == body, name
        assert parsed.canonical_body(b"simple") == Simple.canonicalize_body(body), name
        assert parsed.canonical_body(b"relaxed") == Relaxed.canonicalize_body(body), name
        checked += 1
    assert checked > 100


BODY_PIECES = st.lists(
    st.sampled_from([b"a", b"b c", b" ", b"\t", b"  ", b"\r\n", b"\n", b"\r", b"\r\r\n", b"x\t "]),
    max_size=40,
).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(BODY_PIECES)
def test_random_bodies_canonicalise_as_dkimpy_does(body: bytes) -> None:
    message = b"From: a@example.org\r\n\r\n" + body
    expected = dkimpy_body(message)
    assert expected is not None
    parsed = ParsedMessage(message)
    assert parsed.canonical_body(b"simple") == Simple.canonicalize_body(expected)
    assert parsed.canonical_body(b"relaxed") == Relaxed.canonicalize_body(expected)


def test_a_million_trailing_line_breaks_are_linear() -> None:
    body = b"text\r\n" + b"\r\n" * 1_000_000
    assert canon.relaxed(body) == b"text\r\n"
    assert canon.simple(b"\r\n" * 1_000_000) == b"\r\n"


def test_both_signatures_share_one_canonical_body_and_verify_with_dkimpy() -> None:
    rsa_key = dkim.generate_private_key("rsa-sha256")
    ed_key = dkim.generate_private_key("ed25519-sha256")
    message = (
        b"From: Ann <ann@example.org>\r\nTo: bob@example.net\r\nSubject: hi  there\r\n\r\n"
        b"Dear Bob,\t \r\n\r\nsee  you.\r\n\r\n\r\n"
    )
    parsed = ParsedMessage(message)
    ed = dkim.sign(parsed, "example.org", "e1", ed_key, "ed25519-sha256")
    rsa = dkim.sign(parsed, "example.org", "r1", rsa_key, "rsa-sha256")
    assert set(parsed._canonical) == {b"", b"relaxed"}  # one body, one canonical form
    signed = rsa + ed + message
    records = {
        b"e1._domainkey.example.org.": dkim.key_record(ed_key).encode(),
        b"r1._domainkey.example.org.": dkim.key_record(rsa_key).encode(),
    }

    def dns(name: bytes, timeout: float = 0) -> bytes:
        return records[name]

    for index in (0, 1):
        assert dkimpy.DKIM(signed).verify(idx=index, dnsfunc=dns), index
    # The body hash dkimpy's own canonicalisation gives.
    body = message.split(b"\r\n\r\n", 1)[1]
    expected = base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(body)).digest())
    assert b"bh=" + expected in rsa.replace(b"\r\n ", b"")


def test_a_rewritten_message_holds_the_fields_a_fresh_parse_finds() -> None:
    for name, message in corpus_messages():
        parsed = ParsedMessage(message)
        doomed = [f for f in parsed.block.fields if f.name.lower() in ("received", "subject")]
        added = b"Authentication-Results: mx.example.org; spf=pass\r\n X-Folded: no\r\n"
        rewritten = parsed.rewritten(prepend=added, remove=doomed)
        fresh = parse_header_block(rewritten.raw)
        assert rewritten.block.fields == fresh.fields, name
        assert rewritten.raw[rewritten.body_start :] == message[parsed.body_start :], name
