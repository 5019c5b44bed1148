"""Delivery Status Notifications (RFC 3464) in a multipart/report (RFC 6522) message.

When the queue gives up on a recipient (or has been retrying it for a long time) the envelope
sender is told, in a machine-readable report a mail client can show and a list manager can
parse. This module only builds that message from what the queue recorded: who failed, with
which status, at which remote MTA, and what it said. Sending it is the caller's business.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

# The returned original message is capped so that a bounce of a 50 MB message does not become
# a second 50 MB message; RFC 3461 §4.3 lets an MTA return only the headers instead.
MAX_RETURNED_MESSAGE = 10 * 1024 * 1024
# The header block alone is capped too: a message whose "headers" run for megabytes is not
# something a notification needs to carry back in full.
MAX_RETURNED_HEADERS = 256 * 1024
# RFC 5322 §2.1.1: lines SHOULD be at most 78 characters; report fields are folded there.
FOLD_WIDTH = 78
# A field value (a remote MTA's reply, an address) is bounded before it is written.
MAX_FIELD_VALUE = 2000

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEADER_END = re.compile(rb"\r?\n\r?\n")


class Action(enum.StrEnum):
    """RFC 3464 §2.3.3: what happened to one recipient."""

    FAILED = "failed"  # given up on; the message will not reach this recipient
    DELAYED = "delayed"  # still being retried; a later notice may follow
    DELIVERED = "delivered"  # delivered to the recipient's mailbox
    RELAYED = "relayed"  # handed to a next hop that does not return DSNs (RFC 3461 §4.1)
    EXPANDED = "expanded"  # delivered and forwarded to several further recipients


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """The per-recipient fields of RFC 3464 §2.3."""

    final_recipient: str  # the address the queue tried (§2.3.2)
    action: Action
    status: str  # RFC 3463 enhanced code, "5.1.1"
    original_recipient: str | None = None  # the ORCPT value "rfc822;addr" if given (§2.3.1)
    remote_mta: str | None = None  # the MX host name that answered (§2.3.5)
    diagnostic: str | None = None  # "smtp; 550 5.1.1 ..." or "X-Postvern; ..." (§2.3.6)
    last_attempt: float | None = None  # unix time (§2.3.7)
    will_retry_until: float | None = None  # unix time, delayed only (§2.3.9)


@dataclass(frozen=True, slots=True)
class OriginalMessage:
    """What the report is about: the queued message and its envelope."""

    sender: str  # the envelope sender the report goes to; never "" (no DSN for <>)
    message: bytes
    arrival: float  # unix time the queue accepted it (§2.2.5)
    queue_id: str
    envid: str | None = None  # RFC 3461 ENVID (§2.2.1 Original-Envelope-Id)
    ret: str | None = None  # RFC 3461 RET: "FULL" or "HDRS"; None means headers only
    smtputf8: bool = False  # an internationalised message (RFC 6531)


class DSNError(ValueError):
    """The report cannot be built (no recipients, or a null envelope sender)."""


def build_dsn(
    reporting_mta: str,
    original: OriginalMessage,
    recipients: Sequence[RecipientReport],
    *,
    now: float | None = None,
) -> bytes:
    """The complete notification message, CRLF line endings, ready to be queued from <>."""
    if not recipients:
        raise DSNError("a delivery status notification needs at least one recipient")
    if not original.sender:
        # RFC 3461 §6.2 / RFC 5321 §4.5.5: a message from <> must never cause a notification.
        raise DSNError("no notification is ever sent to the null reverse-path")
    now = time.time() if now is None else now
    utf8 = original.smtputf8 or not _all_ascii(original, recipients)
    boundary = _boundary(original.message)
    returned, returned_type = _returned_part(original, recipients, utf8)
    parts = [
        _part(
            "text/plain; charset=utf-8",
            _human_text(reporting_mta, original, recipients).encode(),
            description="Notification",
        ),
        _part(
            # RFC 6533 §6.1: reports naming UTF-8 addresses use the "global" type.
            "message/global-delivery-status" if utf8 else "message/delivery-status",
            _status_fields(reporting_mta, original, recipients).encode(),
            description="Delivery report",
        ),
        _part(returned_type, returned, description=_returned_description(returned_type)),
    ]
    header = _header(reporting_mta, original, recipients, boundary, now)
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part for part in parts)
    return header + b"\r\n" + body + b"--" + boundary.encode() + b"--\r\n"


# --- The message header ---------------------------------------------------------------------


_SUBJECTS = {
    Action.FAILED: "Undelivered Mail Returned to Sender",
    Action.DELAYED: "Delayed Mail (still being retried)",
    Action.RELAYED: "Successful Mail Delivery Report",
    Action.DELIVERED: "Successful Mail Delivery Report",
    Action.EXPANDED: "Successful Mail Delivery Report",
}


def _header(
    reporting_mta: str,
    original: OriginalMessage,
    recipients: Sequence[RecipientReport],
    boundary: str,
    now: float,
) -> bytes:
    fields = [
        ("From", f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
        ("To", f"<{_clean(original.sender)}>"),
        ("Subject", _SUBJECTS[_headline_action(recipients)]),
        ("Date", _date(now)),
        ("Message-ID", f"<{secrets.token_hex(12)}@{reporting_mta}>"),
        # RFC 3834 §5: an automatic response, so responders and vacation programs stay quiet.
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        (
            "Content-Type",
            f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ),
    ]
    return b"".join(_field(name, value).encode() for name, value in fields)


def _headline_action(recipients: Sequence[RecipientReport]) -> Action:
    """The subject names the worst news in the report."""
    actions = {r.action for r in recipients}
    for action in (Action.FAILED, Action.DELAYED):
        if action in actions:
            return action
    return next(iter(actions))


# --- The three parts ------------------------------------------------------------------------


def _part(content_type: str, content: bytes, *, description: str) -> bytes:
    encoding = "7bit" if content.isascii() else "8bit"
    head = (
        _field("Content-Type", content_type)
        + _field("Content-Description", description)
        + _field("Content-Transfer-Encoding", encoding)
    )
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return head.encode() + b"\r\n" + content


def _human_text(
    reporting_mta: str, original: OriginalMessage, recipients: Sequence[RecipientReport]
) -> str:
    action = _headline_action(recipients)
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if action is Action.FAILED:
        lines += [
            "Your message could not be delivered to one or more recipients.",
            "It has been returned below; the technical report follows.",
        ]
    elif action is Action.DELAYED:
        lines += [
            "Your message has not been delivered yet to one or more recipients.",
            "The mail system will keep trying; you do not need to send it again.",
        ]
    else:
        lines += ["Your message was passed on to the recipients' mail system."]
    lines.append("")
    for r in recipients:
        lines.append(f"<{_clean(r.final_recipient)}>: {r.action}, status {r.status}")
        if r.remote_mta:
            lines.append(f"    host {_clean(r.remote_mta)} said: {_clean(r.diagnostic or '')}")
        elif r.diagnostic:
            lines.append(f"    {_clean(r.diagnostic)}")
    lines.append("")
    return "\r\n".join(lines)


def _status_fields(
    reporting_mta: str, original: OriginalMessage, recipients: Sequence[RecipientReport]
) -> str:
    """The message/delivery-status body: per-message fields, then one block per recipient,
    blocks separated by blank lines (RFC 3464 §2.1)."""
    per_message = [("Reporting-MTA", f"dns; {reporting_mta}")]
    per_message.append(("X-Postvern-Queue-ID", original.queue_id))
    if original.envid:
        per_message.append(("Original-Envelope-Id", original.envid))
    per_message.append(("Arrival-Date", _date(original.arrival)))
    blocks = ["".join(_field(n, v) for n, v in per_message)]
    for r in recipients:
        fields: list[tuple[str, str]] = []
        if r.original_recipient:
            fields.append(("Original-Recipient", r.original_recipient))
        fields.append(("Final-Recipient", _typed_address(r.final_recipient)))
        fields.append(("Action", str(r.action)))
        fields.append(("Status", r.status))
        if r.remote_mta:
            fields.append(("Remote-MTA", f"dns; {r.remote_mta}"))
        if r.diagnostic:
            fields.append(("Diagnostic-Code", r.diagnostic))
        if r.last_attempt is not None:
            fields.append(("Last-Attempt-Date", _date(r.last_attempt)))
        if r.will_retry_until is not None and r.action is Action.DELAYED:
            fields.append(("Will-Retry-Until", _date(r.will_retry_until)))
        blocks.append("".join(_field(n, v) for n, v in fields))
    return "\r\n".join(blocks)


def _returned_part(
    original: OriginalMessage, recipients: Sequence[RecipientReport], utf8: bool
) -> tuple[bytes, str]:
    """RFC 3461 §4.3: the whole message for RET=FULL on a failure, else its header."""
    failed = any(r.action is Action.FAILED for r in recipients)
    full = (original.ret or "").upper() == "FULL" and failed
    if full and len(original.message) <= MAX_RETURNED_MESSAGE:
        # RFC 6532 §3.7: a message with UTF-8 headers travels as message/global.
        return original.message, "message/global" if utf8 else "message/rfc822"
    headers = header_block(original.message)[:MAX_RETURNED_HEADERS]
    return headers, "message/global-headers" if utf8 else "text/rfc822-headers"


def _returned_description(content_type: str) -> str:
    if content_type in ("message/rfc822", "message/global"):
        return "Undelivered Message"
    return "Message Headers"


def header_block(message: bytes) -> bytes:
    """The header section of a message, up to (not including) the blank line."""
    match = _HEADER_END.search(message)
    head = message[: match.start()] if match else message
    return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


# --- Field syntax ---------------------------------------------------------------------------


def _typed_address(address: str) -> str:
    """RFC 3464 §2.1.2 address-type; RFC 6533 §3 "utf-8" for internationalised ones."""
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {_clean(address)}"


def _field(name: str, value: str) -> str:
    """``Name: value`` folded at spaces near :data:`FOLD_WIDTH`, with CRLF."""
    words = _clean(value).split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(current) + 1 + len(word) > FOLD_WIDTH and current.strip() != f"{name}:":
            lines.append(current)
            current = " "
        current += (" " if current != " " else "") + word
    lines.append(current)
    return "\r\n".join(lines) + "\r\n"


def _clean(value: str) -> str:
    """No line breaks or controls can reach a header from a remote MTA's reply text."""
    return _CONTROL.sub(" ", value[:MAX_FIELD_VALUE])


def _date(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return email.utils.format_datetime(moment)


def _boundary(message: bytes) -> str:
    while True:
        boundary = "=_postvern_dsn_" + secrets.token_hex(12)
        if boundary.encode() not in message:
            return boundary


def _all_ascii(original: OriginalMessage, recipients: Sequence[RecipientReport]) -> bool:
    names = [original.sender] + [r.final_recipient for r in recipients]
    names += [r.original_recipient or "" for r in recipients]
    return all(n.isascii() for n in names)
