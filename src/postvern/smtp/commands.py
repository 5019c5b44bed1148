"""Argument syntax of SMTP commands (RFC 5321 §4.1) and of the ESMTP parameters Postvern knows.

Each function takes the argument text of one command and returns typed values, or raises
:class:`CommandError` carrying the reply that RFC 5321 or the extension's RFC names for the
mistake. Whether a command is allowed *now* is the protocol core's business; this module
only says what a command means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postvern.smtp import replies
from postvern.smtp.address import (
    Address,
    AddressError,
    NonASCIIAddressError,
    parse_address_literal,
    parse_domain,
    parse_forward_path,
    parse_reverse_path,
    split_path,
)
from postvern.smtp.replies import Reply

MAX_SIZE_DIGITS = 20  # RFC 1870 §4: size-value = 1*20DIGIT
MAX_BDAT_DIGITS = 20  # RFC 3030 §3: chunk-size = 1*DIGIT; 20 digits exceed any real chunk
MAX_ENVID = 100  # RFC 3461 §4.4: ENVID is at most 100 characters
MAX_ORCPT = 500  # RFC 3461 §4.2: ORCPT is at most 500 characters
MAX_MECHANISM = 20  # RFC 4422 §3.1: a SASL mechanism name has 1 to 20 characters

# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); esmtp-value = 1*(%d33-60 / %d62-126),
# widened to UTF-8 by RFC 6531 §3.3 (checked against SMTPUTF8 after the whole list is read).
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u00a0-\U0010ffff]+")
# RFC 3461 §4: xchar is "!".."~" except "+" and "="; hexchar is "+" and two upper-case digits.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_MECHANISM = re.compile(rf"[A-Z0-9_-]{{1,{MAX_MECHANISM}}}")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


class CommandError(Exception):
    """A command argument is malformed; ``reply`` says so to the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Features:
    """What this client may use: EHLO (not HELO) was given, and which extensions were offered."""

    esmtp: bool = True
    smtputf8: bool = True
    dsn: bool = False
    auth: bool = False


@dataclass(frozen=True, slots=True)
class MailParams:
    """The MAIL FROM parameters, decoded.

    ``size`` is the client's estimate (RFC 1870); ``body`` is "7BIT" or "8BITMIME" (RFC 6152);
    ``smtputf8`` marks an internationalised transaction (RFC 6531); ``auth`` is the decoded
    AUTH= mailbox or "<>" (RFC 4954 §5); ``ret`` and ``envid`` are the DSN ones (RFC 3461).
    """

    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    auth: str | None = None
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True, slots=True)
class RcptParams:
    """The RCPT TO parameters of RFC 3461: NOTIFY conditions and the original recipient."""

    notify: frozenset[str] | None = None
    orcpt: str | None = None


def split_command(line: str) -> tuple[str, str]:
    """Split a command line into its upper-cased verb and the argument text."""
    verb, _, argument = line.partition(" ")
    return verb.upper(), argument


def parse_helo(argument: str) -> str:
    """EHLO/HELO argument: Domain or address-literal (RFC 5321 §4.1.1.1).

    Underscores are tolerated because many Windows hosts have them in their names, and the
    HELO name is information for the Received header and policy, not a route.
    """
    name = argument.strip(" ")
    if not name:
        raise CommandError(replies.argument_error("EHLO/HELO requires a domain name"))
    try:
        if name.startswith("["):
            parse_address_literal(name)
        elif name.isascii():
            parse_domain(name.replace("_", "-"))
        else:
            raise AddressError("non-ASCII EHLO name")
    except AddressError:
        raise CommandError(replies.argument_error("Invalid EHLO/HELO domain name")) from None
    return name


def parse_mail(argument: str, features: Features) -> tuple[Address | None, MailParams]:
    """``MAIL FROM:<reverse-path> [SP Mail-parameters]`` (RFC 5321 §4.1.1.2)."""
    if argument[:5].upper() != "FROM:":
        raise CommandError(replies.bad_sender_syntax("Syntax: MAIL FROM:<address> [parameters]"))
    # The RFC has no space after the colon, but widely used clients send one.
    try:
        inside, tail = split_path(argument[5:].lstrip(" "))
    except AddressError as e:
        raise CommandError(replies.bad_sender_syntax(str(e))) from None
    params = _mail_params(_split_params(tail, features), features)
    try:
        return parse_reverse_path(inside, utf8=params.smtputf8), params
    except NonASCIIAddressError:
        raise CommandError(replies.non_ascii_address()) from None
    except AddressError as e:
        raise CommandError(replies.bad_sender_syntax(str(e))) from None


def parse_rcpt(argument: str, features: Features, *, smtputf8: bool) -> tuple[Address, RcptParams]:
    """``RCPT TO:<forward-path> [SP Rcpt-parameters]`` (RFC 5321 §4.1.1.3).

    ``smtputf8`` is whether this transaction's MAIL carried SMTPUTF8 (RFC 6531 §3.4).
    """
    if argument[:3].upper() != "TO:":
        raise CommandError(replies.bad_recipient_syntax("Syntax: RCPT TO:<address> [parameters]"))
    try:
        inside, tail = split_path(argument[3:].lstrip(" "))
    except AddressError as e:
        raise CommandError(replies.bad_recipient_syntax(str(e))) from None
    params = _rcpt_params(_split_params(tail, features), features)
    try:
        return parse_forward_path(inside, utf8=smtputf8), params
    except NonASCIIAddressError:
        raise CommandError(replies.non_ascii_address()) from None
    except AddressError as e:
        raise CommandError(replies.bad_recipient_syntax(str(e))) from None


def parse_bdat(argument: str) -> tuple[int, bool]:
    """``BDAT chunk-size [SP "LAST"]`` (RFC 3030 §3): the size and whether it is the last."""
    parts = argument.split(" ")
    size = parts[0]
    if not (size.isascii() and size.isdigit() and len(size) <= MAX_BDAT_DIGITS):
        raise CommandError(replies.argument_error("Syntax: BDAT chunk-size [LAST]"))
    if len(parts) == 1:
        return int(size), False
    if len(parts) == 2 and parts[1].upper() == "LAST":
        return int(size), True
    raise CommandError(replies.argument_error("Syntax: BDAT chunk-size [LAST]"))


def parse_auth(argument: str) -> tuple[str, str | None]:
    """``AUTH mechanism [SP initial-response]`` (RFC 4954 §4): the upper-cased name and the
    still-encoded initial response."""
    parts = argument.split(" ")
    mechanism = parts[0].upper()
    if not _MECHANISM.fullmatch(mechanism) or len(parts) > 2:
        raise CommandError(replies.argument_error("Syntax: AUTH mechanism [initial-response]"))
    return mechanism, parts[1] if len(parts) == 2 else None


def decode_xtext(text: str) -> str:
    """Decode RFC 3461 §4 xtext ("+2B" for "+"); raise CommandError if malformed."""
    if not _XTEXT.fullmatch(text):
        raise CommandError(replies.argument_error("Malformed xtext parameter value"))
    return _HEXCHAR.sub(lambda m: chr(int(m[1], 16)), text)


def _split_params(tail: str, features: Features) -> list[tuple[str, str | None]]:
    """esmtp-param *(SP esmtp-param) after the path; keywords upper-cased, no duplicates."""
    if tail == "":
        return []
    if not tail.startswith(" "):
        raise CommandError(replies.argument_error("Expected a space after the address"))
    if not features.esmtp:
        # Parameters are service extensions, and HELO negotiated none (RFC 5321 §4.1.1.11).
        raise CommandError(replies.unknown_parameter("Parameters require EHLO"))
    params: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for item in tail.split(" "):
        if not item:
            continue
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.fullmatch(keyword) or (equals and not _VALUE.fullmatch(value)):
            raise CommandError(replies.argument_error("Malformed parameter"))
        keyword = keyword.upper()
        if keyword in seen:
            raise CommandError(replies.argument_error(f"Duplicate {keyword} parameter"))
        seen.add(keyword)
        params.append((keyword, value if equals else None))
    if "SMTPUTF8" not in seen and not all(v is None or v.isascii() for _, v in params):
        raise CommandError(replies.argument_error("Non-ASCII parameter value"))
    return params


def _mail_params(params: list[tuple[str, str | None]], features: Features) -> MailParams:
    fields: dict[str, object] = {}
    for keyword, value in params:
        if keyword == "SIZE":
            fields["size"] = _size_value(value)
        elif keyword == "BODY":
            fields["body"] = _body_value(value)
        elif keyword == "SMTPUTF8" and features.smtputf8:
            _no_value(keyword, value)
            fields["smtputf8"] = True
        elif keyword == "AUTH" and features.auth:
            fields["auth"] = "<>" if value == "<>" else decode_xtext(_need_value(keyword, value))
        elif keyword == "RET" and features.dsn:
            fields["ret"] = _choice(keyword, value, {"FULL", "HDRS"})
        elif keyword == "ENVID" and features.dsn:
            envid = decode_xtext(_need_value(keyword, value))
            if len(envid) > MAX_ENVID:
                raise CommandError(replies.argument_error("ENVID too long"))
            fields["envid"] = envid
        else:
            raise CommandError(replies.unknown_parameter(f"{keyword} parameter not supported"))
    return MailParams(**fields)  # type: ignore[arg-type]


def _rcpt_params(params: list[tuple[str, str | None]], features: Features) -> RcptParams:
    notify: frozenset[str] | None = None
    orcpt: str | None = None
    for keyword, value in params:
        if keyword == "NOTIFY" and features.dsn:
            notify = _notify_value(_need_value(keyword, value))
        elif keyword == "ORCPT" and features.dsn:
            orcpt = _orcpt_value(_need_value(keyword, value))
        else:
            raise CommandError(replies.unknown_parameter(f"{keyword} parameter not supported"))
    return RcptParams(notify=notify, orcpt=orcpt)


def _size_value(value: str | None) -> int:
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > MAX_SIZE_DIGITS:
        raise CommandError(replies.argument_error("Syntax: SIZE=<number of octets>"))
    return int(value)


def _body_value(value: str | None) -> str:
    # RFC 6152 BODY=8BITMIME; BINARYMIME (RFC 3030 §3) is not offered, so not accepted.
    body = (value or "").upper()
    if body not in ("7BIT", "8BITMIME"):
        raise CommandError(replies.argument_error("BODY must be 7BIT or 8BITMIME"))
    return body


def _notify_value(value: str) -> frozenset[str]:
    # RFC 3461 §4.1: NEVER alone, or a comma list of SUCCESS, FAILURE, DELAY.
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return frozenset(items)
    if len(set(items)) != len(items) or not set(items) <= _NOTIFY_VALUES:
        raise CommandError(replies.argument_error("Invalid NOTIFY value"))
    return frozenset(items)


def _orcpt_value(value: str) -> str:
    # RFC 3461 §4.2: ORCPT=addr-type ";" xtext.
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or len(value) > MAX_ORCPT:
        raise CommandError(replies.argument_error("Invalid ORCPT value"))
    return f"{addr_type};{decode_xtext(encoded)}"


def _choice(keyword: str, value: str | None, allowed: set[str]) -> str:
    choice = (value or "").upper()
    if choice not in allowed:
        raise CommandError(replies.argument_error(f"Invalid {keyword} value"))
    return choice


def _need_value(keyword: str, value: str | None) -> str:
    if value is None:
        raise CommandError(replies.argument_error(f"{keyword} requires a value"))
    return value


def _no_value(keyword: str, value: str | None) -> None:
    if value is not None:
        raise CommandError(replies.argument_error(f"{keyword} takes no value"))
