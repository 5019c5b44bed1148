"""What the filters read from a message: subject, sender, text, HTML and attachments.

The filters need decoded words and files, not the MIME tree IMAP describes, so this is the
one module that parses a message for them (stdlib ``email``, ``compat32`` policy). Bad input
never raises out of :func:`extract`: a message too broken to parse yields what was readable.
"""

from __future__ import annotations

import codecs
import email
import email.header
import email.utils
from dataclasses import dataclass, field
from email.message import Message
from email.policy import compat32

# A message with more MIME parts than this is either a torture test or an attack on the
# parser; the filters read the first parts and record that the rest was skipped.
MAX_PARTS = 256
# Text beyond this adds scoring cost but no spam signal: the first screens decide.
MAX_TEXT_CHARS = 256 * 1024
# Decoded attachment bytes kept for inspection. The SMTP size limit (50 MiB) bounds the
# message; base64 decodes to 3/4 of that, so this keeps every attachment of a legal message.
MAX_ATTACHMENT_BYTES = 48 * 1024 * 1024
# Header values longer than this are truncated before decoding (RFC 5322 §2.1.1 allows 998
# octets per line, folded headers may be longer, none is useful past this).
MAX_HEADER_CHARS = 4096

_TEXT_TYPES = ("text/plain", "text/html")


@dataclass(frozen=True, slots=True)
class Attachment:
    """One non-text part (or a text part with a file name), decoded."""

    filename: str
    content_type: str
    data: bytes


@dataclass(slots=True)
class Extracted:
    """The readable parts of a message. Strings are decoded Unicode."""

    subject: str = ""
    from_name: str = ""
    from_addr: str = ""  # lower-cased addr-spec, "" when absent or unparsable
    reply_to_addr: str = ""
    header_names: frozenset[str] = frozenset()  # lower-cased names of top-level fields
    charsets: frozenset[str] = frozenset()
    text: str = ""
    html: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    truncated: bool = False  # a limit above cut something off
    defective: bool = False  # the parser recorded defects or failed outright

    @property
    def from_domain(self) -> str:
        return self.from_addr.rpartition("@")[2]


def extract(raw: bytes) -> Extracted:
    """Parse *raw* (an RFC 5322 message) into its readable parts; never raises."""
    try:
        msg = email.message_from_bytes(raw, policy=compat32)
    except Exception:  # the stdlib parser is lenient, but a guard costs nothing
        return Extracted(text=raw[:MAX_TEXT_CHARS].decode("latin-1"), defective=True)
    out = Extracted()
    try:
        _read_headers(msg, out)
    except Exception:
        out.defective = True
    try:
        _read_parts(msg, out)
    except Exception:
        out.defective = True
    return out


def _read_headers(msg: Message, out: Extracted) -> None:
    out.header_names = frozenset(k.lower() for k in msg.keys())
    out.subject = decode_header_value(msg.get("Subject"))
    name, addr = email.utils.parseaddr(_header_str(msg.get("From")))
    out.from_name = decode_header_value(name).strip().strip('"').strip()
    out.from_addr = _clean_addr(addr)
    out.reply_to_addr = _clean_addr(email.utils.parseaddr(_header_str(msg.get("Reply-To")))[1])
    out.defective = bool(msg.defects)


def _read_parts(msg: Message, out: Extracted) -> None:
    texts: list[str] = []
    htmls: list[str] = []
    charsets: set[str] = set()
    kept = 0
    for count, part in enumerate(msg.walk()):
        if count >= MAX_PARTS:
            out.truncated = True
            break
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        filename = _filename(part)
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if ctype in _TEXT_TYPES and not filename and not _is_attachment(part):
            charset = _charset(part)
            charsets.add(charset)
            text = _decode(_cut(data), charset)
            (htmls if ctype == "text/html" or _is_markup(text) else texts).append(text)
            continue
        if kept + len(data) > MAX_ATTACHMENT_BYTES:
            out.truncated = True
            continue
        kept += len(data)
        out.attachments.append(Attachment(filename, ctype, data))
    out.charsets = frozenset(charsets)
    out.text, cut_text = _bounded("\n".join(texts))
    out.html, cut_html = _bounded("\n".join(htmls))
    out.truncated = out.truncated or cut_text or cut_html


def decode_header_value(value: object) -> str:
    """Decode RFC 2047 encoded words; undecodable parts are kept as they came."""
    text = _header_str(value)
    if "=?" not in text:
        return text
    try:
        pieces = []
        for chunk, charset in email.header.decode_header(text):
            if isinstance(chunk, bytes):
                pieces.append(_decode(chunk, charset or "ascii"))
            else:
                pieces.append(chunk)
        return "".join(pieces)
    except Exception:
        return text


def _header_str(value: object) -> str:
    """A header as str: compat32 keeps raw 8-bit octets as surrogate escapes."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):
        text = str(value)
    else:
        text = str(value)
    text = text[:MAX_HEADER_CHARS]
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        raw = text.encode("ascii", "surrogateescape")
        # RFC 6532 allows UTF-8 in headers; anything else was never valid, latin-1 keeps it.
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return text


def _clean_addr(addr: str) -> str:
    addr = addr.strip().lower()
    return addr if addr.count("@") == 1 and " " not in addr else ""


def _filename(part: Message) -> str:
    try:
        name = part.get_filename()
    except Exception:
        return ""
    return decode_header_value(name)[:255] if name else ""


def _is_attachment(part: Message) -> bool:
    disposition = part.get("Content-Disposition", "")
    return isinstance(disposition, str) and disposition.strip().lower().startswith("attachment")


def _charset(part: Message) -> str:
    try:
        charset = part.get_content_charset() or "us-ascii"
        return codecs.lookup(charset).name
    except (LookupError, ValueError, TypeError):
        return "unknown"


def _decode(data: bytes, charset: str) -> str:
    # Declared charsets lie (or are absent) often enough that UTF-8 is tried when the
    # declared one fails; latin-1 then decodes anything.
    if charset in ("unknown", "ascii", "us-ascii"):
        charset = "utf-8"
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def _is_markup(text: str) -> bool:
    """A text/plain part that is an HTML document (mislabelled): read it as HTML."""
    head = text[:512].lstrip().lower()
    return head.startswith(("<!doctype html", "<html"))


def _cut(data: bytes) -> bytes:
    """At most the bytes needed for MAX_TEXT_CHARS, not splitting a UTF-8 sequence."""
    limit = MAX_TEXT_CHARS * 4  # UTF-8 uses at most four octets per character
    if len(data) <= limit:
        return data
    end = limit
    while end > limit - 4 and 0x80 <= data[end] < 0xC0:
        end -= 1
    return data[:end]


def _bounded(text: str) -> tuple[str, bool]:
    if len(text) > MAX_TEXT_CHARS:
        return text[:MAX_TEXT_CHARS], True
    return text, False
