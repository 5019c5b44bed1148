"""The MIME corpora: every file describes, and descriptions match reference parsers.

Three references: Dovecot 2.3 (BODYSTRUCTURE, ENVELOPE, BODY[section] and BINARY answers
recorded by ``tests/data/mime/dovecot_oracle.py``), Apache James mime4j's expected parse
trees (``.xml``), and mailcore2's expected structures. Each known divergence is listed with
the reason it is deliberate; anything else that differs fails the test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data" / "mime"))

from mime_support import (
    CORPUS,
    compare_dovecot,
    compare_mailcore,
    compare_mime4j,
    corpus_files,
    crlf,
    mailcore_pairs,
    parse_xml,
    sha,
)

from postvern.mime.model import (
    body_from_json,
    body_to_json,
    envelope_from_json,
    envelope_to_json,
)
from postvern.mime.parse import parse_message

DOVECOT_EXPECTED = Path(__file__).parent / "data" / "mime" / "dovecot_expected.json"
MIME4J = CORPUS / "james-mime4j/core/src/test/resources"

# Deliberate differences, by file, with the reason IMAP semantics differ from the reference.
_ENCODED_RFC822 = (
    "message/rfc822 sent base64-encoded (forbidden by RFC 2046 §5.2.1): mime4j decodes and "
    "parses it; IMAP offsets cannot point into decoded data, so like Dovecot we describe it "
    "with an empty envelope and an empty body"
)
_HEADER_TO_EMPTY_LINE = (
    "a line without a colon inside the header: the reference ends the header there; like "
    "Dovecot we end a header only at the empty line (RFC 5322 §2.1)"
)
_LONG_BOUNDARY = (
    "boundary longer than RFC 2046's 70 characters: like Dovecot we compare its first 80 "
    "octets only, so a line that differs after them is a delimiter; mime4j compares it all"
)
_BASE64_TAIL = (
    "base64 ending in a 3-character group (garbage after the data): we decode the 2 octets "
    "it carries; mime4j drops the incomplete group"
)
_INVALID_TYPE = (
    'Content-Type without a subtype ("X-BE2", "x-sun-attachment"): RFC 2045 §5.2 says '
    "to read an invalid Content-Type as text/plain, which we do; the reference keeps the bad type"
)
_DIGEST_CHILD = (
    "a multipart/digest part with an empty MIME header is message/rfc822 (RFC 2046 §5.1.5) "
    "whose own header says text/richtext; mailcore2 flattens it to text/richtext"
)
_SAME_BOUNDARY = (
    "nested multiparts reuse one boundary: like Dovecot, a delimiter belongs to the innermost "
    "multipart using it (RFC 2046 §5.1.2 forbids the reuse, so readings differ)"
)
_MIME_VERSION = (
    "MIME-Version: RFC-XXXX: mailcore2 then ignores the multipart; we (and Dovecot) read the "
    "Content-Type whatever the MIME-Version value"
)
MIME4J_DIVERGENCES = {
    "mimetools-testmsgs/multi-2gifs-base64": _ENCODED_RFC822,
    "testmsgs/bad-newlines-multiple-parts-base64": _ENCODED_RFC822,
    "testmsgs/base64encoded-rfc822message": _ENCODED_RFC822,
    "testmsgs/base64encoded-rfc822message-nested": _ENCODED_RFC822,
    "testmsgs/malformedHeaderStartsBody-nocrlfcrlf": _HEADER_TO_EMPTY_LINE,
    "testmsgs/malformedHeaderStartsBody-noheader": _HEADER_TO_EMPTY_LINE,
    "testmsgs/very-long-boundary": _LONG_BOUNDARY,
    "testmsgs/very-very-long-boundary": _LONG_BOUNDARY,
}
# Only the *_decoded.xml tree differs for these (raw structure matches).
MIME4J_DECODED_DIVERGENCES = {
    "mimetools-testmsgs/frag": _BASE64_TAIL,
    "mimetools-testmsgs/multi-frag": _BASE64_TAIL,
}

_JWZ = "mailcore2/unittest/data/parser/input/mbox/"
MAILCORE_DIVERGENCES = {
    _JWZ + "jwz/1": _INVALID_TYPE,
    _JWZ + "jwz/29": _INVALID_TYPE,
    _JWZ + "jwz/134": _INVALID_TYPE,
    _JWZ + "jwz/135": _INVALID_TYPE,
    _JWZ + "jwz/5": _HEADER_TO_EMPTY_LINE,
    _JWZ + "jwz/116": _HEADER_TO_EMPTY_LINE,
    _JWZ + "jwz/117": _HEADER_TO_EMPTY_LINE,
    _JWZ + "jwz/40": _DIGEST_CHILD,
    _JWZ + "jwz/41": _MIME_VERSION,
    _JWZ + "simple/2": _SAME_BOUNDARY,
    _JWZ + "simple/3": _SAME_BOUNDARY,
}

_DOVECOT_INVALID_TYPE = (
    "invalid Content-Type (no subtype, or none at all after a broken line): Dovecot reports "
    'type "" or the bare word; RFC 2045 §5.2 says to read it as text/plain, which we do'
)
_EMPTY_PARAMETER = (
    '"multipart/mixed;; boundary=...": Dovecot stops reading parameters at the empty one '
    "and loses the boundary; we skip it, as mime4j does, and find the parts"
)
_UNQUOTED_TSPECIAL = (
    'unquoted boundary containing "=" (boundary=----=_Part...): Dovecot cuts the value at '
    '"=" (strict RFC 2045 token), turning the close delimiter into an extra empty part; we '
    'read to ";" or a blank, as the sender meant and as mail readers do'
)
_MESSAGE_GLOBAL = (
    "message/global: RFC 9051 body-type-msg describes it like message/rfc822 (envelope, "
    "body, lines); Dovecot 2.3 predates that and shows a basic part"
)
_EMPTY_DISPOSITION = (
    'empty or typeless Content-Disposition: Dovecot reports ("" NIL); we report NIL'
)
_BROKEN_COMMENT = (
    '"a@b (Name) (by way of ... (unterminated": we take the first comment as the name; '
    "Dovecot gives up on the name"
)
_ADDRESS_RECOVERY = (
    "after a syntax error in an address list Dovecot drops the rest of the list; we skip to "
    "the next comma and keep the following addresses"
)
_ENCODED_WORD_ATOM = (
    'an encoded word holding ":)" in a display name: Dovecot reads the colon as a group; '
    "we read the RFC 2047 encoded word as one word"
)
DOVECOT_DIVERGENCES = {
    "cpython_test_email/data/msg_14.txt": _DOVECOT_INVALID_TYPE,
    "flanker/tests/fixtures/messages/spam/broken-ctype.eml": _DOVECOT_INVALID_TYPE,
    "flanker/tests/fixtures/messages/torture.eml": _DOVECOT_INVALID_TYPE,
    "james-mime4j/core/src/test/resources/mimetools-testmsgs/multi-digest.msg": (
        _DOVECOT_INVALID_TYPE
    ),
    _JWZ + "jwz/1": _DOVECOT_INVALID_TYPE,
    _JWZ + "jwz/29": _DOVECOT_INVALID_TYPE,
    _JWZ + "jwz/134": _DOVECOT_INVALID_TYPE,
    _JWZ + "jwz/135": _DOVECOT_INVALID_TYPE,
    "james-mime4j/core/src/test/resources/mimetools-testmsgs/double-semicolon.msg": (
        _EMPTY_PARAMETER
    ),
    _JWZ + "jwz/22": _EMPTY_PARAMETER,
    "ruby-mail/spec/fixtures/emails/mime_emails/raw_email_with_binary_encoded.eml": (
        _UNQUOTED_TSPECIAL
    ),
    "ruby-mail/spec/fixtures/emails/mime_emails/raw_email_with_illegal_boundary.eml": (
        _UNQUOTED_TSPECIAL
    ),
    "ruby-mail/spec/fixtures/emails/plain_emails/raw_email_bad_time.eml": _UNQUOTED_TSPECIAL,
    "flanker/tests/fixtures/messages/enclosed-global.eml": _MESSAGE_GLOBAL,
    "ruby-mail/spec/fixtures/emails/error_emails/missing_content_disposition.eml": (
        _EMPTY_DISPOSITION
    ),
    "ruby-mail/spec/fixtures/emails/error_emails/multiple_invalid_content_dispositions.eml": (
        _EMPTY_DISPOSITION
    ),
    _JWZ + "jwz/52": _BROKEN_COMMENT,
    "ruby-mail/spec/fixtures/emails/plain_emails/raw_email_with_at_display_name.eml": (
        _ADDRESS_RECOVERY
    ),
    "mailcore2/unittest/data/parser/input/messages/headers.txt": _ENCODED_WORD_ATOM,
    "james-mime4j/core/src/test/resources/mimetools-testmsgs/multi-2gifs-base64.msg": (
        "HEADER.FIELDS of a base64-encoded message/rfc822 (see mime4j): " + _ENCODED_RFC822
    ),
}


def test_every_corpus_file_describes_and_round_trips():
    """Every file (messages and expected outputs alike): no exception, consistent offsets."""
    files = corpus_files()
    assert len(files) > 1000
    for path in files:
        raw = path.read_bytes()
        envelope, body = parse_message(raw)  # without describe()'s safety net
        assert envelope_from_json(envelope_to_json(envelope)) == envelope, path
        assert body_from_json(body_to_json(body)) == body, path
        _check_offsets(body, len(raw), path)


def _check_offsets(part, size: int, path: Path) -> None:
    assert 0 <= part.header_start <= part.body_start <= part.end <= size, path
    assert part.size == part.end - part.body_start, path
    is_message = part.type == "MESSAGE" and part.subtype in ("RFC822", "GLOBAL")
    assert (part.message_body is not None) == is_message, path
    assert (part.lines is not None) == (part.type == "TEXT" or is_message), path
    assert not part.is_multipart or part.parts, path
    for child in part.parts:
        assert part.body_start <= child.header_start and child.end <= part.end, path
        _check_offsets(child, size, path)
    if part.message_body is not None:
        inner = part.message_body
        assert part.body_start <= inner.header_start and inner.end <= part.end, path
        _check_offsets(inner, size, path)


def test_mime4j_expected_trees():
    """Structure, header fields, raw and decoded bodies against mime4j's expected trees."""
    matched, total, unexpected = 0, 0, {}
    for msg in sorted(MIME4J.glob("*/*.msg")):
        raw = msg.read_bytes()
        _, body = parse_message(raw)
        name = str(msg.relative_to(MIME4J).with_suffix(""))
        for suffix, decoded_dir in ((".xml", None), ("_decoded.xml", msg.parent)):
            total += 1
            tree = parse_xml(msg.with_name(msg.stem + suffix).read_bytes())
            problems = compare_mime4j(raw, body, tree, decoded_dir)
            known = name in MIME4J_DIVERGENCES or (
                decoded_dir is not None and name in MIME4J_DECODED_DIVERGENCES
            )
            if not problems:
                matched += 1
            elif not known:
                unexpected[name + suffix] = problems[:3]
    print(f"mime4j: {matched}/{total} expected trees match")
    assert not unexpected, unexpected
    expected_misses = 2 * len(MIME4J_DIVERGENCES) + len(MIME4J_DECODED_DIVERGENCES)
    assert total == 160 and matched == total - expected_misses


def test_mailcore2_expected_structures():
    matched, unexpected = 0, {}
    pairs = mailcore_pairs()
    for source, expected in pairs:
        raw = source.read_bytes()
        _, body = parse_message(raw)
        problems = compare_mailcore(raw, body, json.loads(expected.read_text()))
        name = str(source.relative_to(CORPUS))
        if not problems:
            matched += 1
        elif name not in MAILCORE_DIVERGENCES:
            unexpected[name] = problems[:3]
    print(f"mailcore2: {matched}/{len(pairs)} expected structures match")
    assert not unexpected, unexpected
    assert matched == len(pairs) - len(MAILCORE_DIVERGENCES)


@pytest.fixture(scope="module")
def dovecot_records() -> list[dict]:
    return json.loads(DOVECOT_EXPECTED.read_text())


def test_dovecot_conformance(dovecot_records):
    """BODYSTRUCTURE, ENVELOPE, BODY[section], BINARY[part] as Dovecot answers them."""
    matched, unexpected = 0, {}
    checked = {"BODYSTRUCTURE": 0, "ENVELOPE": 0, "BODY": 0, "BINARY": 0}
    for record in dovecot_records:
        raw = crlf((CORPUS / record["file"]).read_bytes())
        assert sha(raw)[:16] == record["sha256"], record["file"]
        problems = compare_dovecot(raw, record)
        checked["BODYSTRUCTURE"] += 1
        checked["ENVELOPE"] += 1
        checked["BODY"] += len(record["sections"])
        checked["BINARY"] += len(record["binary"])
        if not problems:
            matched += 1
        elif record["file"] not in DOVECOT_DIVERGENCES:
            unexpected[record["file"]] = problems[:5]
    print(f"dovecot: {matched}/{len(dovecot_records)} messages identical; checked {checked}")
    assert not unexpected, unexpected
    assert matched == len(dovecot_records) - len(DOVECOT_DIVERGENCES)
