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
import itertools
import re
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
# A returned header block (text/rfc822-headers) beyond this is not a header block.
MAX_HEADER_BLOCK = 64 * 1024
# Header fields kept for the header rules (postvern.filters.headers). A long Received chain
# has a few dozen; past this the rest are not read.
MAX_FIELDS = 200

_TEXT_TYPES = ("text/plain", "text/html")
# RFC 6522 §3: the optional third part of a multipart/report carries the message that
# caused the report, whole (message/rfc822, RFC 6533's message/global) or its header only.
_RETURNED_MESSAGE_TYPES = ("message/rfc822", "message/global")
_RETURNED_HEADER_TYPES = ("text/rfc822-headers", "message/global-headers")
# Bounces come from the null reverse-path and, by a convention older than RFC 3464, name
# MAILER-DAEMON (or the postmaster) in From (RFC 5321 §4.5.5 and §4.5.1).
_BOUNCE_SENDERS = frozenset({"mailer-daemon", "postmaster"})
# A header block quoted in a plain bounce: a field of the returned message's header,
# (folded lines,) then another field.
# RFC 3463 §2: class.subject.detail, as bounces state it ("5.1.1", qmail's "(#5.1.1)").
_STATUS_CODE = re.compile(r"(?<![\d.])[245]\.\d{1,3}\.\d{1,3}(?![\d.])")
_EMBEDDED_HEADER = re.compile(
    r"(?im)^(?:return-path|received|from|to|date|subject|message-id|delivered-to):[^\n]*\n"
    r"(?:[ \t][^\n]*\n){0,20}[a-z0-9-]{1,40}:"
)
# RFC 2047 §2 encoded words, with the white space between adjacent ones (§6.2: it is
# not part of the text).
_ENCODED_WORDS = re.compile(r"=\?[^?\s]{1,40}\?[bBqQ]\?[^?\s]*\?=(?:\s+(?==\?))?")
# Declared charsets are read as the superset every mail client uses for them (WHATWG
# Encoding Standard): mail labelled with the old name routinely uses the extra characters,
# and a failed decode would turn the whole text into Latin-1 noise.
# An octet compat32 kept as a surrogate escape (PEP 383).
_SURROGATE = re.compile("[\udc80-\udcff]")
_CHARSET_SUPERSETS = {
    "ascii": "cp1252",
    "iso8859-1": "cp1252",
    "euc_kr": "cp949",  # also what "ks_c_5601-1987" resolves to
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "shift_jis": "cp932",
    "big5": "big5hkscs",
    "tis-620": "cp874",
    "iso8859-11": "cp874",
}
# Labels that Python's codec registry does not know but mail software writes.
_CHARSET_ALIASES = {
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "x-euc-jp": "euc_jp",
    "x-gbk": "gb18030",
    "x-windows-949": "cp949",
    "windows-874": "cp874",
    "x-mac-cyrillic": "mac_cyrillic",
    "x-mac-roman": "mac_roman",
}


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
    from_field: str = ""  # the From field as written (unfolded, bounded), to judge its form
    reply_to_addr: str = ""
    header_names: frozenset[str] = frozenset()  # lower-cased names of top-level fields
    charsets: frozenset[str] = frozenset()
    text: str = ""
    html: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    # The top-level fields in order, (lower-cased name, value as written, bounded), for
    # the header rules; the first MAX_FIELDS only.
    fields: tuple[tuple[str, str], ...] = ()
    # Content types of the leaf parts, in order (at most MAX_PARTS).
    leaf_types: tuple[str, ...] = ()
    # A text part sent as base64 although its text is plain ASCII (SpamAssassin's
    # MIME_BASE64_TEXT): mail software uses base64 for text only when it must.
    ascii_text_in_base64: bool = False
    truncated: bool = False  # a limit above cut something off
    defective: bool = False  # the parser recorded defects or failed outright
    # A mail system's report about another message: the report-type of a multipart/report
    # (RFC 6522: bounces, read receipts, abuse reports), lower-cased, or "bounce" for a
    # bounce in the older plain form; "" for other mail. *returned* is the message it
    # returns, whole or its header only (None when it returns none).
    report_type: str = ""
    returned: Extracted | None = None

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
    try:
        _read_report(msg, out)
        if not out.report_type and out.from_addr.partition("@")[0] in _BOUNCE_SENDERS:
            _read_plain_bounce(msg, out)
    except Exception:
        out.defective = True
    return out


def _read_report(msg: Message, out: Extracted) -> None:
    """The returned message of a multipart/report (RFC 6522 §3), read like a message."""
    if msg.get_content_type() != "multipart/report":
        return
    out.report_type = str(msg.get_param("report-type", "") or "").lower()[:64]
    payload = msg.get_payload()
    parts = [p for p in payload[1:] if isinstance(p, Message)] if isinstance(payload, list) else []
    for part in parts:
        ctype = part.get_content_type()
        if ctype not in _RETURNED_MESSAGE_TYPES and ctype not in _RETURNED_HEADER_TYPES:
            continue
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            returned = inner[0]  # the parser read a message/* part as a message
        else:
            data = part.get_payload(decode=True)
            block = data[:MAX_HEADER_BLOCK] if isinstance(data, bytes) else b""
            returned = email.message_from_bytes(block, policy=compat32)
        out.returned = Extracted()
        _read_headers(returned, out.returned)
        if ctype in _RETURNED_MESSAGE_TYPES:
            _read_parts(returned, out.returned)
        return


def _read_plain_bounce(msg: Message, out: Extracted) -> None:
    """The copy of the returned message in a bounce older than RFC 3464: an attached
    message/rfc822 part, or the header block quoted in the text after the MTA's note
    (qmail's "--- Below this line is a copy of the message.", Exim's "------ This is a
    copy of the message, including all the headers. ------", sendmail's "----- Original
    message follows -----"). A note without a copy is a bounce when it states an RFC 3463
    status code ("5.1.1"); a message from the postmaster with neither is ordinary mail."""
    for part in itertools.islice(msg.walk(), MAX_PARTS):
        inner = part.get_payload() if part.get_content_type() in _RETURNED_MESSAGE_TYPES else None
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            out.report_type, out.returned = "bounce", Extracted()
            _read_headers(inner[0], out.returned)
            _read_parts(inner[0], out.returned)
            return
    copy = _EMBEDDED_HEADER.search(out.text)
    if copy is None:
        if _STATUS_CODE.search(out.text):
            out.report_type = "bounce"
        return
    returned = email.message_from_string(out.text[copy.start() :], policy=compat32)
    out.report_type, out.returned = "bounce", Extracted()
    _read_headers(returned, out.returned)
    _read_parts(returned, out.returned)


def _read_headers(msg: Message, out: Extracted) -> None:
    items = msg.items()[:MAX_FIELDS]
    out.fields = tuple((k.lower(), _header_str(v)) for k, v in items)
    out.header_names = frozenset(k.lower() for k in msg.keys())
    out.subject = decode_header_value(msg.get("Subject"))
    from_field = _header_str(msg.get("From"))
    out.from_field = from_field
    name, addr = email.utils.parseaddr(from_field)
    out.from_name = decode_header_value(name).strip().strip('"').strip()
    out.from_addr = _clean_addr(addr)
    out.reply_to_addr = _clean_addr(email.utils.parseaddr(_header_str(msg.get("Reply-To")))[1])
    out.defective = bool(msg.defects)


def _read_parts(msg: Message, out: Extracted) -> None:
    texts: list[str] = []
    htmls: list[str] = []
    charsets: set[str] = set()
    kept = 0
    leaf_types: list[str] = []
    for count, part in enumerate(msg.walk()):
        if count >= MAX_PARTS:
            out.truncated = True
            break
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        leaf_types.append(ctype)
        filename = _filename(part)
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if ctype in _TEXT_TYPES and not filename and not _is_attachment(part):
            if data and data.isascii() and _is_base64(part):
                out.ascii_text_in_base64 = True
            charset = _charset(part)
            charsets.add(charset)
            # Lines end in CRLF on the wire (RFC 5322 §2.1) and in LF in most stored
            # mail: one form, so that no reading depends on how a message was kept.
            text = _decode(_cut(data), charset).replace("\r\n", "\n")
            (htmls if ctype == "text/html" or _is_markup(text) else texts).append(text)
            continue
        if kept + len(data) > MAX_ATTACHMENT_BYTES:
            out.truncated = True
            continue
        kept += len(data)
        out.attachments.append(Attachment(filename, ctype, data))
    out.charsets = frozenset(charsets)
    out.leaf_types = tuple(leaf_types)
    out.text, cut_text = _bounded("\n".join(texts))
    out.html, cut_html = _bounded("\n".join(htmls))
    out.truncated = out.truncated or cut_text or cut_html


def decode_header_value(value: object) -> str:
    """Decode RFC 2047 encoded words; undecodable parts are kept as they came."""
    text = _header_str(value)
    if "=?" not in text:
        return text
    if not text.isascii():
        # Raw UTF-8 beside encoded words (RFC 6532 mail from careless software): decode
        # each word on its own, the stdlib would re-read the UTF-8 as escapes.
        return _ENCODED_WORDS.sub(lambda m: decode_header_value(m.group(0).strip()), text)
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
        # compat32 wraps a field with raw 8-bit octets in a Header of charset unknown-8bit,
        # whose str() replaces every octet with U+FFFD: read the octets back instead.
        return _raw_header_text(value)[:MAX_HEADER_CHARS]
    text = str(value)[:MAX_HEADER_CHARS]
    # (Most fields are ASCII: checked first, the character scan is the exception.)
    if not text.isascii() and _SURROGATE.search(text):
        return _header_octets(text.encode("ascii", "surrogateescape"))
    return text


def _raw_header_text(header: email.header.Header) -> str:
    pieces = []
    for chunk, charset in email.header.decode_header(header):
        if isinstance(chunk, bytes):
            chunk = chunk[: 4 * MAX_HEADER_CHARS]
            if charset and charset != "unknown-8bit":
                pieces.append(_decode(chunk, str(charset)))
            else:
                pieces.append(_header_octets(chunk))
        else:
            pieces.append(chunk)
    return "".join(pieces)


def _header_octets(raw: bytes) -> str:
    # RFC 6532 allows UTF-8 in headers; anything else was never valid, latin-1 keeps it.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


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


def _is_base64(part: Message) -> bool:
    encoding = part.get("Content-Transfer-Encoding", "")
    return isinstance(encoding, str) and encoding.strip().lower() == "base64"


def _charset(part: Message) -> str:
    try:
        return codec_name(part.get_content_charset() or "us-ascii")
    except (ValueError, TypeError):
        return "unknown"


def codec_name(label: str) -> str:
    """The Python codec that decodes text labelled *label*: "unknown" when there is none."""
    label = label.strip().lower()
    try:
        name = codecs.lookup(_CHARSET_ALIASES.get(label, label)).name
    except (LookupError, ValueError):
        return "unknown"
    return _CHARSET_SUPERSETS.get(name, name)


def _decode(data: bytes, charset: str) -> str:
    # Declared charsets lie (or are absent) often enough that UTF-8 is tried when the
    # declared one fails; Latin-1 then decodes anything. Undeclared, ASCII- and
    # Latin-1-labelled 8-bit text is tried as UTF-8 first: such labels are often defaults
    # of software that wrote UTF-8 (RFC 6532 mail is UTF-8 throughout).
    codec = codec_name(charset)
    if codec in ("unknown", "cp1252"):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            codec = "cp1252"
    try:
        return data.decode(codec)
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
