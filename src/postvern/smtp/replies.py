"""SMTP replies (RFC 5321 §4.2) carrying enhanced status codes (RFC 2034, RFC 3463).

A :class:`Reply` is what the server says: a three-digit code, the enhanced status code that
RFC 2034 puts before the text of every final reply, and one or more lines of text. The
functions below are the replies Postvern gives, each with the codes its RFC names, so that
the protocol core and the handlers never spell a code twice.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass

# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including the code and CRLF.
# Longer text (an echoed address, a handler's explanation) is cut rather than sent.
MAX_REPLY_LINE = 512

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# Reply text is US-ASCII without controls (RFC 5321 §4.2 textstring); anything else is
# replaced so that a handler echoing client input can never inject a line break.
_UNSAFE_TEXT = re.compile(r"[^\x20-\x7e\t]")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply, possibly multi-line.

    ``status`` is the RFC 3463 enhanced code ("2.1.0"); it is ``None`` only where RFC 2034
    leaves it out: intermediate 3xx replies, the 220 greeting and the EHLO response.
    ``text`` is one line or a tuple of lines.
    """

    code: int
    status: str | None
    text: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        # These are programming errors in the server, never the client's input.
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code {self.code} out of range")
        if self.status is not None:
            if not _STATUS.fullmatch(self.status):
                raise ValueError(f"malformed enhanced status code {self.status!r}")
            if self.status[0] != str(self.code)[0]:
                raise ValueError(f"enhanced status {self.status} does not match {self.code}")

    @property
    def lines(self) -> tuple[str, ...]:
        if isinstance(self.text, str):
            return (self.text,)
        return self.text or ("",)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def to_bytes(self) -> bytes:
        """The reply on the wire: ``250-...`` continuation lines, then ``250 ...``."""
        lines = self.lines
        out = []
        for i, text in enumerate(lines):
            separator = " " if i == len(lines) - 1 else "-"
            prefix = f"{self.code}{separator}"
            if self.status is not None:
                prefix += self.status + " "
            room = MAX_REPLY_LINE - len(prefix) - 2
            out.append(prefix + _UNSAFE_TEXT.sub("?", text)[:room] + "\r\n")
        return "".join(out).encode("ascii")

    def __str__(self) -> str:
        return self.to_bytes().decode("ascii").rstrip("\r\n")


# --- Connection and greeting (RFC 5321 §3.1, §4.1.1.1) ------------------------------------


def greeting(hostname: str) -> Reply:
    # "ESMTP" in the greeting tells old clients that EHLO is worth trying.
    return Reply(220, None, f"{hostname} ESMTP Postvern")


def session_refused(hostname: str, text: str = "No SMTP service here") -> Reply:
    """554 greeting: RFC 5321 §3.1 then answers 503 to everything until QUIT."""
    return Reply(554, "5.3.2", f"{hostname} {text}")


def ehlo(hostname: str, client: str, extensions: Sequence[str]) -> Reply:
    return Reply(250, None, (f"{hostname} Hello {client}", *extensions))


def helo(hostname: str) -> Reply:
    return Reply(250, None, hostname)


def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection")


# --- Plain acknowledgements -----------------------------------------------------------------


def ok(text: str = "OK") -> Reply:
    return Reply(250, "2.0.0", text)


def sender_ok() -> Reply:
    return Reply(250, "2.1.0", "Sender OK")


def recipient_ok() -> Reply:
    return Reply(250, "2.1.5", "Recipient OK")


def start_data() -> Reply:
    return Reply(354, None, "End data with <CR><LF>.<CR><LF>")


def chunk_received(size: int) -> Reply:
    # RFC 3030 §2: every BDAT chunk but the last is answered once its octets are in.
    return Reply(250, "2.0.0", f"{size} octets received")


def message_accepted(queue_id: str = "") -> Reply:
    return Reply(250, "2.0.0", f"OK queued as {queue_id}" if queue_id else "OK")


def cannot_vrfy() -> Reply:
    # RFC 5321 §3.5.3: 252 when the server will not say whether a mailbox exists.
    return Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")


def help_text() -> Reply:
    return Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT (RFC 5321)")


# --- Syntax and sequence (RFC 5321 §4.2.2, RFC 3463 X.5.x) ---------------------------------


def unrecognized_command() -> Reply:
    return Reply(500, "5.5.2", "Command unrecognized")


def syntax_error(text: str = "Syntax error") -> Reply:
    return Reply(500, "5.5.2", text)


def line_too_long() -> Reply:
    # RFC 5321 §4.5.3.1.4 suggests "500 Line too long".
    return Reply(500, "5.5.2", "Line too long")


def bare_newline_in_command() -> Reply:
    return Reply(500, "5.5.2", "Bare CR or LF in command; lines end with CRLF")


def argument_error(text: str = "Syntax error in parameters or arguments") -> Reply:
    return Reply(501, "5.5.4", text)


def bad_sender_syntax(text: str = "Bad sender address syntax") -> Reply:
    return Reply(501, "5.1.7", text)


def bad_recipient_syntax(text: str = "Bad recipient address syntax") -> Reply:
    return Reply(501, "5.1.3", text)


def not_implemented(text: str = "Command not implemented") -> Reply:
    return Reply(502, "5.5.1", text)


def bad_sequence(text: str = "Bad sequence of commands") -> Reply:
    return Reply(503, "5.5.1", text)


def unknown_parameter(text: str = "Parameter not recognized or not implemented") -> Reply:
    # RFC 5321 §4.1.1.11: 555 for MAIL/RCPT parameters the server does not know.
    return Reply(555, "5.5.4", text)


def non_ascii_address() -> Reply:
    # RFC 6531 §3.5 with RFC 5248: X.6.7 when UTF-8 arrives without the SMTPUTF8 parameter.
    return Reply(553, "5.6.7", "Non-ASCII addresses require the SMTPUTF8 parameter")


def no_valid_recipients() -> Reply:
    # RFC 5321 §3.3: DATA after MAIL whose RCPTs all failed may get 554 "no valid recipients".
    return Reply(554, "5.5.1", "No valid recipients")


# --- Limits (RFC 1870, RFC 5321 §4.5.3.1) ---------------------------------------------------


def message_too_big(limit: int) -> Reply:
    # RFC 1870 §6.1 and RFC 3463 X.3.4 "message too big for system".
    return Reply(552, "5.3.4", f"Message size exceeds fixed maximum message size ({limit})")


def too_many_recipients() -> Reply:
    # RFC 5321 §4.5.3.1.10: 452 (not 552) so the client sends the rest in another transaction.
    return Reply(452, "4.5.3", "Too many recipients")


def message_line_too_long() -> Reply:
    return Reply(554, "5.6.0", "Message text line too long")


def bare_newline_in_data() -> Reply:
    # Like Postfix smtpd_forbid_bare_newline=reject: a lone CR or LF is how SMTP smuggling
    # hides a second end-of-data marker from one server and shows it to another.
    return Reply(550, "5.5.2", "Message contains bare CR or LF; lines must end with CRLF")


def too_many_errors() -> Reply:
    return Reply(421, "4.7.0", "Too many errors, closing connection")


def improper_pipelining(command: str) -> Reply:
    # RFC 2920 §3.1: after DATA the client waits for the reply. Text sent behind a refused
    # DATA would be read as commands, so the connection ends (like Postfix's
    # smtpd_forbid_unauth_pipelining); 421 because the recipients' own replies stand and
    # a greylisted one must be retried (RFC 5321 §3.8: 421 closes).
    return Reply(421, "4.5.0", f"Data sent before the reply to {command}, closing connection")


def too_many_connections() -> Reply:
    return Reply(421, "4.7.0", "Too many connections, try again later")


def idle_timeout() -> Reply:
    return Reply(421, "4.4.2", "Timeout exceeded, closing connection")


def session_time_exceeded() -> Reply:
    return Reply(421, "4.4.2", "Session time limit exceeded, closing connection")


def shutting_down() -> Reply:
    return Reply(421, "4.3.2", "Service shutting down, try again later")


def service_unavailable() -> Reply:
    return Reply(421, "4.3.0", "Service temporarily unavailable, closing connection")


def local_error() -> Reply:
    # RFC 5321 §4.2.2 451: what a client sees when a handler fails; it will retry.
    return Reply(451, "4.3.0", "Local error in processing, try again later")


# --- STARTTLS (RFC 3207) --------------------------------------------------------------------


def ready_to_start_tls() -> Reply:
    return Reply(220, "2.0.0", "Ready to start TLS")


def tls_not_available() -> Reply:
    return Reply(454, "4.7.0", "TLS not available due to temporary reason")


def tls_required() -> Reply:
    # RFC 3207 §4: a server that requires TLS answers other commands with 530.
    return Reply(530, "5.7.0", "Must issue a STARTTLS command first")


# --- AUTH (RFC 4954 §4, §6) -----------------------------------------------------------------


def auth_challenge(challenge: bytes) -> Reply:
    """334 with the base64 challenge as its whole text (RFC 4954 §4)."""
    return Reply(334, None, base64.b64encode(challenge).decode("ascii"))


def auth_succeeded() -> Reply:
    return Reply(235, "2.7.0", "Authentication successful")


def auth_failed() -> Reply:
    return Reply(535, "5.7.8", "Authentication credentials invalid")


def app_password_required() -> Reply:
    # The account has two-factor authentication on: only an app password opens it here
    # (RFC 4954 §6: 535 5.7.8 for credentials that are not accepted).
    return Reply(
        535,
        "5.7.8",
        "Authentication credentials invalid; two-factor authentication is on: use an app password",
    )


def auth_temporary_failure() -> Reply:
    return Reply(454, "4.7.0", "Temporary authentication failure")


def auth_cancelled() -> Reply:
    # RFC 4954 §4: a "*" response cancels the exchange and MUST get a 501.
    return Reply(501, "5.7.0", "Authentication cancelled")


def auth_malformed() -> Reply:
    return Reply(501, "5.5.2", "Cannot decode authentication response")


def auth_line_too_long() -> Reply:
    return Reply(500, "5.5.6", "Authentication exchange line is too long")


def auth_mechanism_unknown() -> Reply:
    return Reply(504, "5.5.4", "Unrecognized authentication mechanism")


def auth_encryption_required() -> Reply:
    return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")


def auth_required() -> Reply:
    return Reply(530, "5.7.0", "Authentication required")


def already_authenticated() -> Reply:
    return Reply(503, "5.5.1", "Already authenticated")
