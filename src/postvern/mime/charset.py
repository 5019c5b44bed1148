"""Decoding bytes in a charset named by a message, which may be any string at all.

MIME (RFC 2046 §4.1.2) lets a sender name any charset, and real mail names unknown,
misspelt and hostile ones. Decoding here never raises, and undecodable bytes become
U+FFFD. Absent, unknown and "US-ASCII" charsets are guessed: UTF-8 when the bytes are
valid UTF-8, windows-1252 otherwise.
"""

from __future__ import annotations

import codecs
from functools import lru_cache

# Names are sender-chosen; beyond this length a name is not a charset (the longest IANA
# name is 45 characters) and looking it up would only cost time.
MAX_CHARSET_NAME = 64

# Labels that real mail uses but Python's codec registry does not know, or knows under a
# meaning that differs from what mail clients do (WHATWG Encoding Standard: ISO-8859-1 is
# decoded as windows-1252 by every browser and most mail readers).
_ALIASES = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "x-user-defined": "cp1252",
    "unknown-8bit": "cp1252",
    "x-unknown": "cp1252",
    "ks_c_5601-1987": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "x-sjis": "shift_jis",
    "utf8": "utf-8",
    "unicode-1-1-utf-7": "utf-7",
    "x-mac-roman": "mac_roman",
}

# Labels that promise plain ASCII, which in practice hides undeclared 8-bit text: such bytes
# are tried as UTF-8 first, then as windows-1252, as mail readers do.
_GUESS = "guess"
_GUESSED_LABELS = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968", "646", "us"})


@lru_cache(maxsize=256)
def codec_name(charset: str | None) -> str:
    """The Python codec to decode ``charset`` with; a guess when absent, unknown or unusable."""
    if not charset or len(charset) > MAX_CHARSET_NAME:
        return _GUESS
    label = charset.strip().strip("\"'").lower()
    if label in _GUESSED_LABELS:
        return _GUESS
    label = _ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except Exception:
        return _GUESS
    # Codecs that are not text encodings ("rot13", "zlib", "base64") are never applied,
    # whatever a header says.
    if not getattr(info, "_is_text_encoding", True):
        return _GUESS
    return info.name


def decode(data: bytes, charset: str | None) -> str:
    """Decode ``data`` as ``charset``, replacing what does not decode; never raises."""
    name = codec_name(charset)
    if name == _GUESS:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("cp1252", "replace")
    try:
        return data.decode(name, "replace")
    except Exception:
        return data.decode("utf-8", "replace")
