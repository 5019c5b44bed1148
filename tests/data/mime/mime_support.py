"""Test support for the MIME tests: the corpus file list and a reader for IMAP response data.

Both the Dovecot oracle generator (``dovecot_oracle.py``) and the tests import this module, so
that the corpus is enumerated and IMAP data is read in one way only.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def _find_corpus() -> Path:
    """The MIME corpus: $POSTVERN_MIME_CORPUS, else the shared corpora the harness finds."""
    if os.environ.get("POSTVERN_MIME_CORPUS"):
        return Path(os.environ["POSTVERN_MIME_CORPUS"])
    from harness import CORPORA

    return CORPORA / "mime"


CORPUS = _find_corpus()

# Files in the corpus that are expected results or licences, not messages.
_NOT_MESSAGES = re.compile(
    r"(LICENSE|NOTICE|README|\.gitattributes|\.xml$|\.out$|_decoded_[0-9_]+\.(txt|bin)$"
    r"|mailcore2/unittest/data/parser/output/|mailcore2/unittest/data/summary/output/"
    r"|ARTISTIC-LICENSE)"
)


def corpus_files() -> list[Path]:
    """Every file under the corpus, sorted (messages and expected results alike)."""
    return sorted(p for p in CORPUS.rglob("*") if p.is_file())


def corpus_messages() -> list[Path]:
    """The files of the corpus that are messages (inputs), sorted."""
    return [p for p in corpus_files() if not _NOT_MESSAGES.search(str(p.relative_to(CORPUS)))]


def crlf(raw: bytes) -> bytes:
    """Normalize line ends to CRLF, the form IMAP servers count sizes in."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- IMAP response data (RFC 9051 §4): lists, quoted strings, literals, NIL, atoms ----------


class ImapSyntaxError(ValueError):
    pass


def parse_value(buf: bytes, pos: int) -> tuple[object, int]:
    """Read one IMAP value at ``pos``; return (value, next position).

    Lists become Python lists, strings and literals become bytes, NIL becomes None, numbers
    become int, and other atoms (``BODY[1.MIME]``, flags) become str.
    """
    while buf[pos : pos + 1] == b" ":
        pos += 1
    c = buf[pos : pos + 1]
    if c == b"(":
        items: list[object] = []
        pos += 1
        while True:
            while buf[pos : pos + 1] == b" ":
                pos += 1
            if buf[pos : pos + 1] == b")":
                return items, pos + 1
            if pos >= len(buf):
                raise ImapSyntaxError("unterminated list")
            value, pos = parse_value(buf, pos)
            items.append(value)
    if c == b'"':
        out = bytearray()
        pos += 1
        while True:
            ch = buf[pos : pos + 1]
            if not ch:
                raise ImapSyntaxError("unterminated string")
            if ch == b"\\":
                out += buf[pos + 1 : pos + 2]
                pos += 2
            elif ch == b'"':
                return bytes(out), pos + 1
            else:
                out += ch
                pos += 1
    if c == b"{" or buf[pos : pos + 2] == b"~{":
        start = buf.index(b"{", pos)
        close = buf.index(b"}", start)
        size = int(buf[start + 1 : close].rstrip(b"+"))
        data_start = close + 3  # "}\r\n"
        return buf[data_start : data_start + size], data_start + size
    end = pos
    depth = 0
    while end < len(buf):
        ch = buf[end : end + 1]
        if ch == b"[":
            depth += 1
        elif ch == b"]":
            depth -= 1
        elif depth == 0 and ch in (b" ", b")", b"\r", b"\n", b"("):
            break
        end += 1
    atom = buf[pos:end].decode("latin-1")
    if atom == "NIL":
        return None, end
    if atom.isdigit():
        return int(atom), end
    return atom, end


def fetch_items(buf: bytes) -> list[tuple[int, dict[str, object]]]:
    """Every ``* n FETCH (...)`` response in ``buf`` as (n, {item name: value}).

    Responses are walked in order, so literal data (which may quote IMAP) is never
    mistaken for a response; a response cut short by a server error is skipped.
    """
    out: list[tuple[int, dict[str, object]]] = []
    head = re.compile(rb"\* (\d+) FETCH ")
    pos = 0
    while pos < len(buf):
        m = head.match(buf, pos)
        if m is not None:
            try:
                items, end = parse_value(buf, m.end())
            except (ImapSyntaxError, IndexError, ValueError):
                items, end = None, m.end()
            if isinstance(items, list):
                pairs = {str(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}
                out.append((int(m.group(1)), pairs))
            pos = end
        nl = buf.find(b"\n", pos)
        if nl < 0:
            break
        pos = nl + 1
    return out


# --- comparing a description with what Dovecot said ------------------------------------------


def _addr_list(addrs: list) -> list | None:
    return [[a.name, a.adl, a.mailbox, a.host] for a in addrs] or None


def envelope_as_list(env) -> list:
    """Our Envelope in the shape of IMAP's ENVELOPE list (RFC 9051 §7.5.2)."""
    return [
        env.date,
        env.subject,
        _addr_list(env.from_),
        _addr_list(env.sender),
        _addr_list(env.reply_to),
        _addr_list(env.to),
        _addr_list(env.cc),
        _addr_list(env.bcc),
        env.in_reply_to,
        env.message_id,
    ]


def _params(params: list) -> list | None:
    return [x for kv in params for x in kv] or None


def body_as_list(part) -> list:
    """Our BodyPart in the shape of IMAP's extensible BODYSTRUCTURE list."""
    disp = [part.disposition[0], _params(part.disposition[1])] if part.disposition else None
    if part.is_multipart:
        return [
            *[body_as_list(c) for c in part.parts],
            part.subtype,
            _params(part.params),
            disp,
            part.language,
            part.location,
        ]
    out: list = [
        part.type,
        part.subtype,
        _params(part.params),
        part.id,
        part.description,
        part.encoding,
        part.size,
    ]
    if part.message_body is not None:
        out += [envelope_as_list(part.message_envelope), body_as_list(part.message_body)]
        out.append(part.lines)
    elif part.type == "TEXT":
        out.append(part.lines)
    return [*out, part.md5, disp, part.language, part.location]


def normalize(value: object) -> object:
    """Case- and whitespace-insensitive form for comparing with Dovecot's output.

    IMAP compares types, subtypes, encodings and parameter names without case; Dovecot
    collapses whitespace in the subject for display; 8-bit header octets that are not UTF-8
    are U+FFFD in our description (RFC 9051 strings are UTF-8).
    """
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return " ".join(value.split()).lower()
    return value


# --- james-mime4j expected parse trees (.xml) -------------------------------------------------

_XML_TAG = re.compile(rb"<(/?)([a-z-]+)((?:\s+[a-z]+=\"[^\"]*\")*)\s*(/?)>")
_XML_ENTITY = re.compile(rb"&(lt|gt|amp|quot|apos|#\d+|#x[0-9a-fA-F]+);")
_ENTITIES = {b"lt": b"<", b"gt": b">", b"amp": b"&", b"quot": b'"', b"apos": b"'"}


def _unescape(data: bytes) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        name = m.group(1)
        if name.startswith(b"#x"):
            return chr(int(name[2:], 16)).encode("utf-8")
        if name.startswith(b"#"):
            return chr(int(name[1:])).encode("utf-8")
        return _ENTITIES[name]

    return _XML_ENTITY.sub(one, data)


class XmlNode:
    """One element of a mime4j expected tree: tag, attributes, text and children."""

    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.children: list[XmlNode] = []
        self.text = b""

    def child(self, tag: str) -> XmlNode | None:
        return next((c for c in self.children if c.tag == tag), None)


def parse_xml(data: bytes) -> XmlNode:
    """Read a mime4j .xml tree; byte-exact text (the files hold raw 8-bit octets)."""
    root = XmlNode("#root", {})
    stack = [root]
    pos = 0
    for m in _XML_TAG.finditer(data):
        stack[-1].text += data[pos : m.start()]
        pos = m.end()
        closing, tag = m.group(1), m.group(2).decode()
        attrs = dict(re.findall(r'([a-z]+)="([^"]*)"', m.group(3).decode("latin-1")))
        if closing:
            node = stack.pop()
            # The writer puts a line break after every opening tag; it is not content.
            node.text = _unescape(node.text)
            for eol in (b"\r\n", b"\n"):
                if node.text.startswith(eol):
                    node.text = node.text[len(eol) :]
                    break
            continue
        node = XmlNode(tag, attrs)
        stack[-1].children.append(node)
        if not m.group(4):
            stack.append(node)
    return root.children[0]


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def our_fields(raw: bytes, part) -> list[bytes]:
    """The header fields of a part as written (folding kept, line end removed)."""
    from postvern.mime.headers import iter_fields

    out = []
    for f in iter_fields(raw, part.header_start, part.body_start):
        line = raw[f.start : f.end]
        out.append(line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n"))
    return out


def compare_mime4j(raw: bytes, body, tree: XmlNode, decoded_dir: Path | None) -> list[str]:
    """Differences between our description and a mime4j expected tree ([] when equal).

    Compares nesting and kind (message, multipart, leaf), every header field of every
    entity, leaf bodies byte for byte, preamble and epilogue, and (for ``*_decoded.xml``)
    the decoded leaf bodies against the files mime4j wrote.
    """
    problems: list[str] = []
    _compare_entity(raw, body, tree, "", problems, decoded_dir)
    return problems


def _compare_entity(raw, part, node: XmlNode, path: str, out: list[str], ddir) -> None:
    header = node.child("header")
    expected = [_lf(f.text) for f in header.children] if header else []
    ours = [_lf(f) for f in our_fields(raw, part)]
    if expected != ours:
        out.append(f"{path or 'top'}: header fields differ: {expected!r} vs {ours!r}"[:600])
    content = next((c for c in node.children if c.tag != "header"), None)
    if content is None:
        return
    if content.tag == "multipart":
        _compare_multipart(raw, part, content, path, out, ddir)
    elif content.tag == "message":
        if part.message_body is None:
            out.append(f"{path or 'top'}: expected message/rfc822, got {part.type}/{part.subtype}")
            return
        _compare_entity(raw, part.message_body, content, path + ".msg", out, ddir)
    else:
        if part.is_multipart or part.message_body is not None:
            out.append(f"{path or 'top'}: expected a leaf, got {part.type}/{part.subtype}")
            return
        body = raw[part.body_start : part.end]
        if content.tag == "body":
            if _lf(content.text) != _lf(body):
                out.append(f"{path or 'top'}: body differs ({len(content.text)} vs {len(body)})")
        elif ddir is not None:
            from postvern.mime.cte import decode_body

            want = (ddir / content.attrs["name"]).read_bytes()
            try:
                got = decode_body(body, part.encoding)
            except ValueError:
                got = body
            if _lf(want) != _lf(got):
                out.append(f"{path or 'top'}: decoded body differs ({len(want)} vs {len(got)})")


def _compare_multipart(raw, part, content: XmlNode, path: str, out: list[str], ddir) -> None:
    if not part.is_multipart:
        out.append(f"{path or 'top'}: expected multipart, got {part.type}/{part.subtype}")
        return
    xml_parts = [c for c in content.children if c.tag == "body-part"]
    ours = part.parts
    if not xml_parts and len(ours) == 1 and ours[0].end == ours[0].header_start:
        ours = []  # the empty text/plain IMAP needs in a multipart without parts
    if len(xml_parts) != len(ours):
        out.append(f"{path or 'top'}: {len(xml_parts)} parts expected, {len(ours)} found")
        return
    pre = content.child("preamble")
    if pre is not None and ours:
        first = ours[0].header_start
        line = raw.rfind(b"\n", part.body_start, max(first - 1, part.body_start))
        got = raw[part.body_start : max(line, part.body_start)]
        got = got[:-1] if got.endswith(b"\r") else got
        if _lf(pre.text) != _lf(got) and not (line < 0 and not pre.text):
            out.append(f"{path or 'top'}: preamble differs: {pre.text[:60]!r} vs {got[:60]!r}")
    for i, (x, p) in enumerate(zip(xml_parts, ours, strict=True), 1):
        _compare_entity(raw, p, x, f"{path}.{i}" if path else str(i), out, ddir)


def compare_dovecot(raw: bytes, record: dict) -> list[str]:
    """Differences between our description of ``raw`` and Dovecot's ``record``."""
    from postvern.mime.parse import parse_message
    from postvern.mime.section import binary_bytes, find_part, section_bytes

    env, body = parse_message(raw)
    problems = []
    want_body, _ = parse_value(record["bodystructure"].encode("utf-8", "surrogateescape"), 0)
    want_env, _ = parse_value(record["envelope"].encode("utf-8", "surrogateescape"), 0)
    if normalize(body_as_list(body)) != normalize(want_body):
        problems.append("BODYSTRUCTURE")
    if normalize(envelope_as_list(env)) != normalize(want_env):
        problems.append("ENVELOPE")
    empty = sha(b"")[:16]
    for spec, want in record["sections"].items():
        if want == "MISSING":
            continue  # Dovecot dropped the session (after a BINARY error) before answering
        got = section_bytes(raw, body, spec)
        # Dovecot answers a nonexistent part with "", and sends NUL octets as 0x80 since
        # IMAP literals may not hold NUL (RFC 9051 §4.3): both are the IMAP layer's job.
        got_s = empty if got is None else sha(got.replace(b"\0", b"\x80"))[:16]
        if got_s != want:
            problems.append(f"BODY[{spec}]")
    for spec, want in record["binary"].items():
        if want == "MISSING":
            continue
        part = find_part(body, tuple(int(n) for n in spec.split(".")))
        if part is not None and (part.is_multipart or part.is_message):
            # Dovecot re-encodes the parts inside a container as binary; we return the
            # container's octets as stored, its own transfer encoding being an identity.
            continue
        try:
            data = binary_bytes(raw, body, spec)
            got_s: str | None = empty if data is None else sha(data)[:16]
        except ValueError:
            got_s = "NO UNKNOWN-CTE"
        if want is not None and want.startswith("NO ") and got_s != "NO UNKNOWN-CTE":
            # Dovecot refuses broken base64/quoted-printable ([PARSE]) and encodings it
            # cannot name; we decode leniently (RFC 2045 §6.8: skip what is not base64)
            # and treat an unparseable encoding value as the 7BIT both of us report.
            continue
        if got_s != want:
            problems.append(f"BINARY[{spec}]")
    return problems


# --- mailcore2 expected structures (.json per message) ----------------------------------------


def compare_mailcore(raw: bytes, body, expected: dict) -> list[str]:
    """Differences between our tree and mailcore2's: part kinds, nesting, MIME types,
    charsets, file names and content ids ([] when equal)."""
    problems: list[str] = []
    _compare_mc(body, expected["mainPart"], "1", problems)
    return problems


def _compare_mc(part, node: dict, path: str, out: list[str]) -> None:
    from postvern.mime.params import param
    from postvern.mime.text import filename

    kind = node.get("partType", "")
    if kind == "message":
        if part.message_body is None:
            out.append(f"{path}: expected message, got {part.type}/{part.subtype}")
            return
        _compare_mc(part.message_body, node["mainPart"], path + ".msg", out)
        return
    if kind.startswith("multipart/"):
        # mailcore2 names only these subtypes and calls every other multipart "mixed".
        subtype = part.subtype.lower()
        if subtype not in ("alternative", "related", "signed"):
            subtype = "mixed"
        if not part.is_multipart or subtype != kind.split("/", 1)[1]:
            out.append(f"{path}: expected {kind}, got {part.type}/{part.subtype}")
            return
        items = node["parts"]["items"]
        parts = part.parts
        if not items and len(parts) == 1 and parts[0].end == parts[0].header_start:
            parts = []  # the empty text/plain IMAP needs in a multipart without parts
        if len(items) != len(parts):
            out.append(f"{path}: {len(items)} parts expected, {len(parts)} found")
            return
        for i, (child, item) in enumerate(zip(parts, items, strict=True), 1):
            _compare_mc(child, item, f"{path}.{i}", out)
        return
    mime = f"{part.type}/{part.subtype}".lower()
    if node.get("mimeType", "").lower() != mime:
        out.append(f"{path}: type {node.get('mimeType')} expected, {mime} found")
    want_charset = node.get("charset")
    if (
        want_charset is not None
        and (param(part.params, "charset") or "").lower() != want_charset.lower()
    ):
        out.append(
            f"{path}: charset {want_charset} expected, {param(part.params, 'charset')} found"
        )
    if node.get("filename") is not None and filename(part) != node["filename"]:
        out.append(f"{path}: filename {node['filename']!r} expected, {filename(part)!r} found")
    if node.get("contentID") is not None and (part.id or "").strip("<>") != node["contentID"]:
        out.append(f"{path}: content-id {node['contentID']!r} expected, {part.id!r} found")


def mailcore_pairs() -> list[tuple[Path, Path]]:
    """(input message, expected JSON) for every mailcore2 parser fixture."""
    base = CORPUS / "mailcore2/unittest/data/parser"
    pairs = []
    for expected in sorted((base / "output").rglob("*")):
        if expected.is_file():
            source = base / "input" / expected.relative_to(base / "output")
            if source.is_file():
                pairs.append((source, expected))
    return pairs
