"""Trace header fields added at delivery (RFC 5321 §4.4, RFC 9228 Delivered-To).

They are prepended, newest first, as every MTA on the path does; nothing already in the
message is reordered or rewritten, so DKIM signatures over it stay valid.
"""

from __future__ import annotations

import email.utils
import secrets

from postvern.emailauth.headers import parse_header_block, remove_fields

# 48 random bits: ids of entries in the queue at one time never meet in practice, and if
# two did, the second enqueue would fail and its sender retry (no mail is mixed up).
QUEUE_ID_BYTES = 6


def new_queue_id() -> str:
    """A short random id naming one transaction: in its reply (``250 OK queued as``), its
    Received header, the logs, and its outbound queue entry (``postvern queue show``)."""
    return secrets.token_hex(QUEUE_ID_BYTES).upper()


def received(
    *,
    helo: str,
    client_ip: str | None,
    client_name: str | None,
    by: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls: str | None,
) -> bytes:
    """``Received: from helo (name [ip]) by host (Postvern) with ESMTPS id X for <r>; date``.

    The TLS version and cipher are shown the way Postfix shows them, so a reader (and a
    filter) can tell which hops were encrypted.
    """
    if client_ip is None:
        # Submission: the user's own address stays private, as privacy-first providers do.
        lines = [f"Received: from {_clean(helo) or 'unknown'}"]
    else:
        origin = f"[{client_ip}]" if client_name is None else f"{client_name} [{client_ip}]"
        lines = [f"Received: from {_clean(helo) or 'unknown'} ({origin})"]
    if tls:
        version, _, cipher = tls.partition(" ")
        lines.append(f"\t(using {version} with cipher {cipher})" if cipher else f"\t(using {tls})")
    lines.append(f"\tby {by} (Postvern) with {protocol} id {queue_id}")
    tail = f"\tfor <{_clean(recipient)}>;" if recipient else "\t;"
    lines.append(f"{tail} {email.utils.formatdate(localtime=True)}")
    return ("\r\n".join(lines) + "\r\n").encode()


def return_path(mail_from: str) -> bytes:
    return f"Return-Path: <{_clean(mail_from)}>\r\n".encode()


def delivered_to(address: str) -> bytes:
    return f"Delivered-To: {_clean(address)}\r\n".encode()


def _clean(value: str | None) -> str:
    """No CR, LF or control characters from a peer can reach a header we write."""
    if not value:
        return ""
    return "".join(c for c in value if c.isprintable() and c not in "\r\n")[:255]


def without_fields(raw: bytes, name: str) -> bytes:
    """The message minus every header field called ``name``; all else byte for byte."""
    return remove_fields(raw, parse_header_block(raw).get_all(name))
