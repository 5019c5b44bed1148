"""Address lists (RFC 5322 §3.4) parsed into IMAP address structures (RFC 9051 §7.5.2).

Each mailbox becomes (name adl mailbox host); a group is encoded in-band as a start
marker (NIL NIL group-name NIL), its members, and an end marker (NIL NIL NIL NIL). Broken
addresses are kept, not dropped, with the placeholders Dovecot uses for the missing
pieces, so that a client sees that something was there.
"""

from __future__ import annotations

import re

from .headers import wire_text
from .model import Address

# A header can name thousands of recipients; an envelope that big helps no client and
# costs memory in every cached BODYSTRUCTURE.
MAX_ADDRESSES = 1000

MISSING_MAILBOX = "MISSING_MAILBOX"
MISSING_DOMAIN = "MISSING_DOMAIN"
SYNTAX_ERROR = "SYNTAX_ERROR"

# RFC 5322 §3.2.3 atext plus "." (obs-phrase) and 8-bit octets (RFC 6532 UTF-8).
_ATOM = re.compile(rb"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\x80-\xff]+")
_BLANKS = re.compile(rb"[ \t\r\n]+")
# RFC 2047 encoded words are atoms even when their text holds specials (":)" and such).
_ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[BbQq]\?[^?\s]*\?=")

_Token = tuple[str, bytes]  # kind ("atom", "qs", "comment", "dlit", or the special itself)


def _tokens(value: bytes) -> list[_Token]:
    out: list[_Token] = []
    pos, n = 0, len(value)
    while pos < n:
        c = value[pos : pos + 1]
        if c in b" \t\r\n":
            pos = _BLANKS.match(value, pos).end()  # type: ignore[union-attr]
        elif c == b'"':
            text, pos = _delimited(value, pos + 1, b'"')
            out.append(("qs", text))
        elif c == b"(":
            text, pos = _comment(value, pos)
            out.append(("comment", text))
        elif c == b"[":
            text, pos = _delimited(value, pos + 1, b"]")
            out.append(("dlit", b"[" + text + b"]"))
        elif c in b"<>@,;:":
            out.append((c.decode(), c))
            pos += 1
        else:
            m = _ENCODED_WORD.match(value, pos) or _ATOM.match(value, pos)
            if m is None:  # a stray special ("\", ")"): skip it
                pos += 1
                continue
            out.append(("atom", m.group()))
            pos = m.end()
    return out


def _delimited(value: bytes, pos: int, close: bytes) -> tuple[bytes, int]:
    out = bytearray()
    n = len(value)
    while pos < n:
        c = value[pos : pos + 1]
        if c == b"\\" and pos + 1 < n:
            out += value[pos + 1 : pos + 2]
            pos += 2
        elif c == close:
            return bytes(out), pos + 1
        else:
            out += c
            pos += 1
    return bytes(out), pos


def _comment(value: bytes, pos: int) -> tuple[bytes, int]:
    depth, start, n = 0, pos + 1, len(value)
    while pos < n:
        c = value[pos]
        if c == 0x5C:
            pos += 2
            continue
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return value[start:pos].strip(), pos + 1
        pos += 1
    return value[start:].strip(), n


def _phrase(words: list[_Token]) -> str | None:
    text = b" ".join(w for kind, w in words if kind in ("atom", "qs", "dlit"))
    text = _BLANKS.sub(b" ", text).strip()
    return wire_text(text) if text else None


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.toks = tokens
        self.i = 0
        self.out: list[Address] = []
        self.domain_comments: list[bytes] = []

    def peek(self) -> str | None:
        return self.toks[self.i][0] if self.i < len(self.toks) else None

    def run(self) -> list[Address]:
        empty = True  # nothing but comments since the last comma
        while self.i < len(self.toks) and len(self.out) < MAX_ADDRESSES:
            kind = self.peek()
            if kind == ",":
                if empty:
                    # An empty list element (", a@b") is kept as a broken address, as in
                    # Dovecot, rather than silently dropped.
                    self.out.append(Address(None, None, MISSING_MAILBOX, MISSING_DOMAIN))
                self.i += 1
                empty = True
            elif kind in (";", ">", "comment"):
                self.i += 1
            else:
                self.address(in_group=False)
                empty = False
        return self.out[:MAX_ADDRESSES]

    def words(self) -> tuple[list[_Token], list[bytes]]:
        """Read a phrase: words up to a special; comments are set aside."""
        words: list[_Token] = []
        comments: list[bytes] = []
        while (kind := self.peek()) in ("atom", "qs", "comment", "dlit"):
            tok = self.toks[self.i]
            if kind == "comment":
                comments.append(tok[1])
            else:
                words.append(tok)
            self.i += 1
        return words, comments

    def address(self, in_group: bool) -> None:
        words, comments = self.words()
        kind = self.peek()
        if kind == ":" and not in_group:
            self.i += 1
            self.group(_phrase(words) or "")
        elif kind == "<":
            self.i += 1
            self.angle(_phrase(words))
        elif kind == "@" and len(words) <= 1:
            self.i += 1
            self.addr_spec(words, comments)
        elif words:
            # A bare word is a local part without a domain ("From: nsb (Name)"); several
            # words are a name without an address ("Big Bug bb@bug.com" included).
            if len(words) == 1 and words[0][0] == "atom":
                name = _comment_name(comments)
                self.out.append(Address(name, None, wire_text(words[0][1]), MISSING_DOMAIN))
            else:
                self.out.append(Address(_phrase(words), None, MISSING_MAILBOX, MISSING_DOMAIN))
            self.skip_to_separator()
        elif kind is not None and kind not in (",", ";"):
            self.i += 1  # a stray special such as ":" inside a group

    def group(self, name: str) -> None:
        self.out.append(Address(None, None, name, None))
        while self.i < len(self.toks) and len(self.out) < MAX_ADDRESSES:
            kind = self.peek()
            if kind == ";":
                self.i += 1
                break
            if kind == ",":
                self.i += 1
                continue
            self.address(in_group=True)
        self.out.append(Address(None, None, None, None))

    def angle(self, name: str | None) -> None:
        route = self.route()
        local, _ = self.words()
        mailbox = _local_part(local[:1])
        host: str | None = None
        if len(local) > 1:
            host = SYNTAX_ERROR  # "<jane at example.com>": words where "@" belongs
        elif self.peek() == "@":
            self.i += 1
            host = self.domain()
        if self.peek() == ">":
            self.i += 1
        elif host is None or self.i < len(self.toks):
            host = SYNTAX_ERROR
        self.out.append(Address(name, route, mailbox or MISSING_MAILBOX, host or MISSING_DOMAIN))
        self.skip_to_separator()

    def route(self) -> str | None:
        """An obsolete source route ``@a,@b:`` (RFC 5322 §4.4) before the address."""
        if self.peek() != "@":
            return None
        start = self.i
        hops: list[str] = []
        while self.peek() == "@":
            self.i += 1
            hops.append("@" + self.domain())
            while self.peek() == ",":
                self.i += 1
        if self.peek() != ":":
            self.i = start
            return None
        self.i += 1
        return ",".join(hops)

    def addr_spec(self, local: list[_Token], comments: list[bytes]) -> None:
        host = self.domain()
        _, after = self.words()
        # "a@b (Name)": with no display name, a comment names the mailbox, as in Dovecot.
        name = _comment_name([*self.domain_comments, *after, *comments])
        mailbox = _local_part(local)
        self.out.append(Address(name, None, mailbox or MISSING_MAILBOX, host or MISSING_DOMAIN))
        self.skip_to_separator()

    def domain(self) -> str:
        """A domain; blanks may surround its dots (RFC 5322 §4.4 obs-domain)."""
        parts: list[bytes] = []
        self.domain_comments = []
        while (kind := self.peek()) in ("atom", "dlit", "comment"):
            text = self.toks[self.i][1]
            if kind == "comment":
                self.domain_comments.append(text)
            elif parts and not parts[-1].endswith(b".") and not text.startswith(b"."):
                break  # "a@b.com c@d.com": the next word is not part of this domain
            else:
                parts.append(text)
            self.i += 1
        return wire_text(b"".join(parts))

    def skip_to_separator(self) -> None:
        """Drop what follows a complete address up to the next comma (e.g. "a@b@c")."""
        while self.i < len(self.toks) and self.peek() not in (",", ";"):
            self.i += 1


def _comment_name(comments: list[bytes]) -> str | None:
    """The first non-empty comment, which names a mailbox written without a display name."""
    for comment in comments:
        text = _BLANKS.sub(b" ", comment).strip()
        if text:
            return wire_text(text)
    return None


def _local_part(words: list[_Token]) -> str | None:
    text = b"".join(w for kind, w in words if kind in ("atom", "qs"))
    return wire_text(text) if text else None


def parse_addresses(value: bytes) -> list[Address]:
    """Parse an (unfolded) address-list header value; never raises."""
    return _Parser(_tokens(value)).run()
