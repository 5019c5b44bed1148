"""Authentication-Results (RFC 8601): how this server tells a reader what it verified.

One field, named by our authserv-id, lists the SPF, DKIM, DomainKeys, DMARC and ARC results
(DomainKeys for the reader only: DMARC does not use it). Fields that arrive claiming our
authserv-id are forgeries and are removed before delivery (§5), so the only such field a
mailbox ever holds is ours. The small RFC 8601 tokenizer here (authserv-id,
resinfo list) also lets ARC sealing copy our results verbatim.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from postvern.emailauth.headers import Field, ParsedMessage, remove_fields

if TYPE_CHECKING:
    from postvern.emailauth import arc, dkim, dmarc, domainkeys, spf

FIELD_NAME = "Authentication-Results"
# RFC 5322 §2.1.1: lines SHOULD stay within 78 characters; we fold at spaces to keep to it.
MAX_LINE_LENGTH = 78
# Free text we put in a comment is cut here; it explains, it is not a log.
MAX_COMMENT_LENGTH = 120
# RFC 2045 §5.1 tspecials: a value containing one of these (or space, or control characters)
# must be a quoted-string (RFC 8601 §2.2 "value").
_TSPECIALS = set('()<>@,;:\\"/[]?=')


def comment(text: str) -> str:
    """A comment (RFC 5322 §3.2.2): printable ASCII only, parentheses and backslashes quoted."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_COMMENT_LENGTH])
    return "(" + re.sub(r"([()\\])", r"\\\1", cleaned) + ")"


def value(text: str) -> str:
    """A token if it can be one, else a quoted-string (RFC 8601 §2.2, RFC 2045 §5.1)."""
    printable = "".join(c if " " <= c <= "~" else "?" for c in text)
    if printable and not any(c in _TSPECIALS or c == " " for c in printable):
        return printable
    return '"' + re.sub(r'(["\\])', r"\\\1", printable) + '"'


def domain_value(domain: str) -> str:
    """A domain as ASCII (A-labels), as a pvalue may hold it."""
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        ascii_domain = domain.encode("ascii", "replace").decode("ascii")
    return value(ascii_domain.lower())


def address_value(address: str) -> str:
    """local-part@domain when the local-part is a plain dot-atom, else "@domain"."""
    local, _, domain = address.rpartition("@")
    domain = domain_value(domain)
    if local and re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+", local):
        return local + "@" + domain.strip('"')
    return "@" + domain.strip('"') if not domain.startswith('"') else domain


def fold(name: str, parts: list[str]) -> bytes:
    """``name: parts[0];`` then one part per line, folded at spaces (RFC 5322 §2.2.3)."""
    head, rest = parts[0], parts[1:]
    lines = [f"{name}: {head}" + (";" if rest else "")]
    for index, part in enumerate(rest):
        words = (part + (";" if index < len(rest) - 1 else "")).split(" ")
        line = "\t" + words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) > MAX_LINE_LENGTH:
                lines.append(line)
                line = "\t" + word
            else:
                line += " " + word
        lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def format_field(authserv_id: str, resinfos: Iterable[str]) -> bytes:
    """The whole field; with no results it says ``none`` (RFC 8601 §2.2)."""
    return fold(FIELD_NAME, [value(authserv_id), *(list(resinfos) or ["none"])])


def _resinfo(method: str, result: str, note: str, properties: list[tuple[str, str]]) -> str:
    words = [f"{method}={result}"]
    if note:
        words.append(comment(note))
    words.extend(f"{name}={text}" for name, text in properties if text and text != '""')
    return " ".join(words)


def spf_resinfo(result: spf.Result) -> str:
    """RFC 8601 §2.7.2: smtp.mailfrom or smtp.helo, whichever identity was checked."""
    if result.identity == "helo":
        prop = ("smtp.helo", domain_value(result.domain))
    else:
        prop = ("smtp.mailfrom", address_value(result.sender))
    return _resinfo("spf", result.status, result.reason, [prop])


def dkim_resinfo(result: dkim.Result) -> str:
    """RFC 8601 §2.7.1 and RFC 6008: header.d, header.s, header.i, header.a, header.b."""
    properties = [
        ("header.d", domain_value(result.domain) if result.domain else ""),
        ("header.s", value(result.selector) if result.selector else ""),
        ("header.i", address_value(result.identity) if "@" in result.identity else ""),
        ("header.a", value(result.algorithm) if result.algorithm else ""),
        ("header.b", value(result.header_b) if result.header_b else ""),
    ]
    return _resinfo("dkim", result.status, result.reason, properties)


def domainkeys_resinfo(result: domainkeys.Result) -> str:
    """RFC 8601 §2.7.1: header.d, and header.sender or header.from (the address checked)."""
    note = result.reason + ("; testing key, t=y" if result.testing else "")
    sender = address_value(result.sender) if "@" in result.sender else ""
    properties = [
        ("header.d", domain_value(result.domain) if result.domain else ""),
        (f"header.{result.sender_field or 'from'}", sender),
    ]
    return _resinfo("domainkeys", result.status, note, properties)


def dmarc_resinfo(result: dmarc.Result, override: str | None = None) -> str:
    """RFC 7489 §11.2: header.from; the policy and disposition go in the comment.

    ``override`` names a local policy that set the requested disposition aside (RFC 7489
    §7.2.1 "PolicyOverride": here, a trusted ARC chain), so the reader sees why a failing
    message was delivered anyway.
    """
    note = result.reason
    if result.record is not None:
        policy = f"p={result.record.policy or 'none'}"
        if result.record.subdomain_policy:
            policy += f" sp={result.record.subdomain_policy}"
        disposition = "none" if override else str(result.disposition)
        note = f"{policy} dis={disposition}; {note}"
        if override:
            note += f"; policy override: {override}"
    from_domain = domain_value(result.from_domain) if result.from_domain else ""
    return _resinfo("dmarc", result.status, note, [("header.from", from_domain)])


def arc_resinfo(result: arc.Result, client_ip: str) -> str:
    """RFC 8617 §10.1: header.oldest-pass and smtp.remote-ip."""
    note = result.reason
    if result.sealers:
        note = f"{result.instances} sets, newest sealed by {result.newest_sealer}; {note}"
    oldest = str(result.oldest_pass) if result.oldest_pass is not None else ""
    properties = [("header.oldest-pass", oldest), ("smtp.remote-ip", value(client_ip))]
    if result.status == "none":
        properties = []
    return _resinfo("arc", result.status, note, properties)


# -- reading fields (RFC 8601 §2.2 grammar, as much as removal and ARC need) -------------------


def _skip_cfws(text: str, i: int) -> int:
    """Skip whitespace and (nested) comments starting at ``i``."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in " \t\r\n":
            break
        i += 1
    return i


def authserv_id_of(field_value: str) -> str | None:
    """The authserv-id a field claims (a token or a quoted-string), or None if unreadable."""
    i = _skip_cfws(field_value, 0)
    if field_value[i : i + 1] == '"':
        match = re.match(r'"((?:[^"\\]|\\.)*)"', field_value[i:])
        return re.sub(r"\\(.)", r"\1", match.group(1)) if match else None
    match = re.match(r"[^\s;()\"]+", field_value[i:])
    return match.group(0) if match else None


def split_resinfos(field_value: str) -> tuple[str | None, list[str]]:
    """(authserv-id, resinfo texts) of one field; ";" inside quotes or comments is kept."""
    pieces: list[str] = []
    current: list[str] = []
    depth, quoted, escaped = 0, False, False
    for c in field_value:
        if escaped:
            escaped = False
        elif c == "\\" and (quoted or depth):
            escaped = True
        elif c == '"' and not depth:
            quoted = not quoted
        elif c == "(" and not quoted:
            depth += 1
        elif c == ")" and not quoted and depth:
            depth -= 1
        elif c == ";" and not quoted and not depth:
            pieces.append("".join(current))
            current = []
            continue
        current.append(c)
    pieces.append("".join(current))
    normalised = [" ".join(p.split()) for p in pieces]
    authserv = authserv_id_of(normalised[0]) if normalised else None
    return authserv, [p for p in normalised[1:] if p and p.lower() != "none"]


def our_resinfos(message: bytes | ParsedMessage, authserv_id: str) -> list[str]:
    """Every result in the message's A-R fields that carry our authserv-id, in order."""
    results: list[str] = []
    for f in ParsedMessage.of(message).block.get_all(FIELD_NAME):
        claimed, resinfos = split_resinfos(f.text())
        if claimed is not None and claimed.lower() == authserv_id.lower():
            results.extend(resinfos)
    return results


def remove_claiming(message: bytes, authserv_id: str) -> bytes:
    """Drop incoming Authentication-Results fields that claim our authserv-id (RFC 8601 §5).

    ARC-Authentication-Results fields are kept: ARC seals cover them (RFC 8617 §4.1.1).
    """
    return remove_fields(message, claiming(ParsedMessage(message), authserv_id))


def claiming(parsed: ParsedMessage, authserv_id: str) -> list[Field]:
    """The Authentication-Results fields ``remove_claiming`` drops."""
    doomed = []
    for f in parsed.block.get_all(FIELD_NAME):
        claimed = authserv_id_of(f.text())
        # An unreadable authserv-id cannot be shown not to be ours: remove it as well.
        if claimed is None or claimed.lower() == authserv_id.lower():
            doomed.append(f)
    return doomed
