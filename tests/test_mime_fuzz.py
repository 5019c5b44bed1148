"""Property tests: describe() never raises, and its offsets always hold together."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postvern.mime import body_text, headers_text, iter_leaves, section_bytes
from postvern.mime.model import BodyPart, body_from_json, body_to_json
from postvern.mime.parse import parse_message
from postvern.mime.section import binary_bytes

# Fragments that steer random input into the parser's interesting corners.
FRAGMENTS = [
    b"Content-Type: multipart/mixed; boundary=a\r\n",
    b"Content-Type: multipart/digest; boundary=b\r\n",
    b'Content-Type: multipart/alternative; boundary="a b"\r\n',
    b"Content-Type: message/rfc822\r\n",
    b"--a\r\nContent-Type: message/rfc822\r\n--a\r\n",
    b"Content-Type: message/global\n",
    b"Content-Type: text/plain; charset*0*=utf-8''%C3; charset*1=x\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\n",
    b"MIME-Version: 1.0\r\n",
    b'From: a@b, G: c@d;, "x" <e@f>\r\n',
    b"To: (\r\n",
    b"Subject: =?utf-8?q?x?=\r\n",
    b" folded\r\n",
    b"\r\n",
    b"\n",
    b"--a\r\n",
    b"--a--\r\n",
    b"--a b\n",
    b"--b\r\n",
    b"--",
    b"aGVsbG8=\r\n",
    b"=C3=A9=\r\n",
    b"\xff\xfe\x00",
    b"text line\r\n",
]

fragmented = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=20)), max_size=40
).map(b"".join)


def check(raw: bytes) -> None:
    _, body = parse_message(raw)
    paths = list(walk(body, (), len(raw)))
    assert body_from_json(body_to_json(body)) == body
    for path in paths[:50]:
        section_bytes(raw, body, ".".join(map(str, path)) + ".MIME")
        section_bytes(raw, body, ".".join(map(str, path)))
        try:
            binary_bytes(raw, body, path)
        except ValueError:
            pass
    section_bytes(raw, body, "HEADER.FIELDS (FROM TO)")
    body_text(raw, body, 1000)
    headers_text(raw, body)
    list(iter_leaves(raw, body, 1000))


def walk(part: BodyPart, path: tuple[int, ...], size: int):
    """Check every part's offsets and yield section paths for every part."""
    assert 0 <= part.header_start <= part.body_start <= part.end <= size
    assert part.size == part.end - part.body_start
    # The shapes RFC 9051 BODYSTRUCTURE needs: a message part always has an envelope and a
    # body, and lines are counted for exactly TEXT and message parts.
    is_message = part.type == "MESSAGE" and part.subtype in ("RFC822", "GLOBAL")
    assert (part.message_body is not None) == is_message
    assert (part.message_envelope is not None) == is_message
    assert (part.lines is not None) == (part.type == "TEXT" or is_message)
    assert part.type.isupper() or not part.type.isalpha()
    if path:
        yield path
    if part.is_multipart:
        assert part.parts, "IMAP needs at least one part in a multipart"
        previous_end = part.body_start
        for i, child in enumerate(part.parts, 1):
            assert part.body_start <= child.header_start and child.end <= part.end
            assert child.header_start >= previous_end
            previous_end = child.end
            yield from walk(child, (*path, i), size)
    elif part.message_body is not None:
        inner = part.message_body
        assert part.message_envelope is not None
        assert part.body_start <= inner.header_start and inner.end <= part.end
        inner_paths = walk(inner, (*path, 1) if not inner.is_multipart else path, size)
        yield from (p for p in inner_paths if p != path)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes(raw):
    check(raw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fragmented)
def test_fragmented_messages(raw):
    check(raw)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=300), st.sampled_from([b"\r\n", b"\n"]))
def test_deep_nesting_is_bounded(depth, eol):
    raw = b"".join(
        b"Content-Type: multipart/mixed; boundary=z%04d%s%s--z%04d%s" % (i, eol, eol, i, eol)
        for i in range(depth)
    )
    raw += b"Content-Type: message/rfc822" + eol + eol + b"Subject: x" + eol + eol + b"y"
    check(raw)
