"""One SMTP client connection to a remote MX (RFC 5321), with STARTTLS (RFC 3207).

:meth:`ClientSession.open` connects to one address of one MX host, says EHLO, and upgrades to
TLS whenever the server offers it: first validating the certificate against the MX name; when
that fails and the caller does not require validation, reconnecting with unvalidated TLS
(opportunistic security, RFC 7435: encryption without authentication still beats plaintext).
:meth:`ClientSession.send` runs one mail transaction and says, per recipient, whether it was
delivered, failed for now, or failed for good. aiosmtplib does the wire work.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
from aiosmtplib import SMTPResponse

from postvern.crypto import tls

# RFC 5321 §4.5.3.2: a client waits 5 minutes for MAIL and RCPT replies and 10 minutes for
# the reply after the message (the receiver may be scanning it); shorter waits would give up
# on slow but healthy servers. aiosmtplib applies one limit to DATA's 354 and the final reply,
# so both get the longer one. The TCP connect and the greeting share ``mta.connect_timeout``
# (a host that does not greet within it is treated as down and the next MX is tried).
COMMAND_TIMEOUT = 300.0
DATA_END_TIMEOUT = 600.0
# One transaction as a whole: the per-reply limits above allow a server that drips replies
# to hold a connection for hours; this bounds an attempt however the time is spent.
MAX_TRANSACTION_TIME = 1800.0
# A TLS handshake is a few round trips; a minute covers any working server.
TLS_HANDSHAKE_TIMEOUT = 60.0
# RFC 5321 §4.5.3.1.8: servers must take at least 100 recipients per transaction; more are
# sent in further transactions on the same connection.
MAX_RECIPIENTS_PER_TRANSACTION = 100
# A connection is reused for further messages to the same domain, but not forever: other
# senders need the receiver's connection slots too (Postfix's reuse limit is 300 s).
MAX_MESSAGES_PER_SESSION = 100
MAX_SESSION_AGE = 300.0
# Remote reply text kept for logs and notifications (RFC 5321 §4.5.3.1.5: 512-octet lines).
MAX_REPLY_TEXT = 512

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
# RFC 3461 §4: xtext encodes "+", "=" and anything outside "!".."~" as "+HH".
_XTEXT_SPECIAL = re.compile(r"[^\x21-\x2a\x2c-\x3c\x3e-\x7e]")


class TLSLevel(enum.StrEnum):
    """What protected the connection (recorded per attempt, RFC 7435 §6)."""

    NONE = "none"  # the server did not offer STARTTLS, or refused it with 454
    UNVERIFIED = "unverified"  # encrypted, certificate not valid for the MX name
    VERIFIED = "verified"  # encrypted, certificate valid for the MX name


class Disposition(enum.StrEnum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # 4xx, connection trouble: retry later
    PERMANENT = "permanent"  # 5xx: give up, tell the sender


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one recipient in one attempt."""

    disposition: Disposition
    status: str  # RFC 3463 enhanced status: "2.0.0", "4.4.1", "5.1.1"
    diagnostic: str  # RFC 3464 §2.3.6: "smtp; 550 5.1.1 No such user" or "X-Postvern; ..."
    remote_dsn: bool = False  # delivered to a next hop that takes over DSN duty (RFC 3461)

    @classmethod
    def temporary(cls, status: str, text: str) -> Outcome:
        return cls(Disposition.TEMPORARY, status, f"X-Postvern; {clean_text(text)}")

    @classmethod
    def permanent(cls, status: str, text: str) -> Outcome:
        return cls(Disposition.PERMANENT, status, f"X-Postvern; {clean_text(text)}")

    @classmethod
    def from_reply(cls, code: int, text: str, *, remote_dsn: bool = False) -> Outcome:
        status = enhanced_status(code, text)
        diagnostic = f"smtp; {code} {clean_text(text)}"
        if 200 <= code < 300:
            return cls(Disposition.DELIVERED, status, diagnostic, remote_dsn)
        if 500 <= code < 600:
            return cls(Disposition.PERMANENT, status, diagnostic)
        # 4xx, and anything a broken server might send instead, is worth another try.
        return cls(Disposition.TEMPORARY, status, diagnostic)


@dataclass(frozen=True, slots=True)
class EnvelopeRecipient:
    seq: int  # the queue's recipient number, to key the outcome
    address: str
    notify: frozenset[str] | None = None
    orcpt: str | None = None  # decoded "rfc822;addr"


@dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str  # "" for <>
    recipients: Sequence[EnvelopeRecipient]
    message: bytes
    envid: str | None = None
    ret: str | None = None
    smtputf8: bool = False
    # Asked after the recipients and before DATA; False: send nothing (the message is no
    # longer this sender's to send: a cluster front's claim, cluster/sharedq.py).
    before_data: Callable[[], Awaitable[bool]] | None = None


class SessionError(Exception):
    """This host cannot take mail now (connect, greeting, EHLO or TLS failed); try another.

    ``outcome`` is what recipients get if no other host does better.
    """

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.diagnostic)
        self.outcome = outcome


class TLSRequired(SessionError):
    """The policy requires validated TLS and this host did not provide it (RFC 8461 §4.2)."""


class StaleSession(Exception):
    """A reused connection turned out dead before the transaction began; reconnect."""


class Withheld(Exception):
    """``before_data`` said no: the transaction was reset before DATA and nothing is to be
    recorded (another sender has the message now); the connection stays usable."""


@dataclass(frozen=True, slots=True)
class TLSContexts:
    """The two client contexts: validating (system CAs or a bundle) and opportunistic."""

    verified: ssl.SSLContext
    unverified: ssl.SSLContext

    @classmethod
    def load(cls, ca_bundle: str | None) -> TLSContexts:
        """Build both (loading the CA store takes milliseconds: call it off the loop)."""
        bundle = Path(ca_bundle) if ca_bundle else None
        return cls(tls.client_context(bundle), tls.client_context(verify=False))


@dataclass(frozen=True, slots=True)
class Endpoint:
    mx: str  # the MX host name: what the certificate must match
    address: str  # the IP address connected to
    port: int


class ClientSession:
    """An open, greeted (and where possible encrypted) SMTP connection to one MX host."""

    def __init__(self, smtp: aiosmtplib.SMTP, endpoint: Endpoint, tls_level: TLSLevel) -> None:
        self._smtp = smtp
        self.endpoint = endpoint
        self.tls = tls_level
        self.tls_error: str | None = None  # why validation failed, for unverified sessions
        self.messages = 0
        self._opened = time.monotonic()
        self._broken = False

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        endpoint: Endpoint,
        *,
        local_hostname: str,
        contexts: TLSContexts,
        require_verified_tls: bool,
        connect_timeout: float,
    ) -> ClientSession:
        """Connect, EHLO, STARTTLS if offered; raise :class:`SessionError` if this host
        cannot be used (:class:`TLSRequired` when the policy's TLS demand is not met)."""
        smtp = await _greet(endpoint, local_hostname, connect_timeout)
        _refuse_loop(smtp, endpoint, local_hostname)
        if not smtp.supports_extension("starttls"):
            return cls._plaintext(smtp, endpoint, require_verified_tls, "STARTTLS not offered")
        try:
            level = await _start_tls(smtp, endpoint, contexts.verified, local_hostname)
        except ssl.SSLCertVerificationError as e:
            _close(smtp)
            reason = f"certificate not valid for {endpoint.mx}: {e.verify_message}"
            if require_verified_tls:
                raise TLSRequired(Outcome.temporary("4.7.5", reason)) from None
            return await cls._unverified(
                endpoint, local_hostname, contexts, connect_timeout, reason
            )
        if level is TLSLevel.NONE:
            return cls._plaintext(smtp, endpoint, require_verified_tls, "STARTTLS refused")
        return cls(smtp, endpoint, level)

    @classmethod
    def _plaintext(
        cls, smtp: aiosmtplib.SMTP, endpoint: Endpoint, require_tls: bool, reason: str
    ) -> ClientSession:
        if require_tls:
            _close(smtp)
            raise TLSRequired(Outcome.temporary("4.7.5", f"{endpoint.mx}: {reason}"))
        return cls(smtp, endpoint, TLSLevel.NONE)

    @classmethod
    async def _unverified(
        cls,
        endpoint: Endpoint,
        local_hostname: str,
        contexts: TLSContexts,
        connect_timeout: float,
        reason: str,
    ) -> ClientSession:
        """RFC 7435: the validating handshake was aborted; a fresh connection with an
        unvalidated context still encrypts. Never plaintext once TLS was offered."""
        smtp = await _greet(endpoint, local_hostname, connect_timeout)
        if not smtp.supports_extension("starttls"):
            _close(smtp)
            raise SessionError(Outcome.temporary("4.7.5", f"{endpoint.mx} withdrew STARTTLS"))
        level = await _start_tls(smtp, endpoint, contexts.unverified, local_hostname)
        if level is TLSLevel.NONE:
            _close(smtp)
            raise SessionError(Outcome.temporary("4.7.5", f"{endpoint.mx} refused STARTTLS"))
        session = cls(smtp, endpoint, TLSLevel.UNVERIFIED)
        session.tls_error = reason
        return session

    # -- state -------------------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Whether another message may be sent on this connection."""
        return (
            not self._broken
            and self._smtp.is_connected
            and self.messages < MAX_MESSAGES_PER_SESSION
            and time.monotonic() - self._opened < MAX_SESSION_AGE
        )

    @property
    def supports_dsn(self) -> bool:
        return self._smtp.supports_extension("dsn")

    async def close(self) -> None:
        """QUIT politely; a connection already broken is just closed."""
        if self._smtp.is_connected and not self._broken:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await self._smtp.quit(timeout=COMMAND_TIMEOUT)
        _close(self._smtp)

    # -- one message -------------------------------------------------------------------------

    async def send(self, envelope: Envelope) -> dict[int, Outcome]:
        """Deliver ``envelope`` over this connection; an outcome for every recipient.

        Raises :class:`StaleSession` if a reused connection is found dead before MAIL was
        answered (nothing was sent: the caller reconnects and tries again).
        """
        refusal = self._refuse_unsendable(envelope)
        if refusal is not None:
            return {r.seq: refusal for r in envelope.recipients}
        outcomes: dict[int, Outcome] = {}
        recipients = list(envelope.recipients)
        for start in range(0, len(recipients), MAX_RECIPIENTS_PER_TRANSACTION):
            batch = recipients[start : start + MAX_RECIPIENTS_PER_TRANSACTION]
            outcomes.update(await self._transaction(envelope, batch, first=start == 0))
            if self._broken:
                lost = Outcome.temporary("4.4.2", "connection closed by the server")
                outcomes.update({r.seq: lost for r in recipients if r.seq not in outcomes})
                break
        self.messages += 1
        return outcomes

    def _refuse_unsendable(self, envelope: Envelope) -> Outcome | None:
        """Checks against the server's extensions before anything is sent."""
        smtp = self._smtp
        addresses = [envelope.mail_from] + [r.address for r in envelope.recipients]
        if not all(a.isascii() for a in addresses) and not smtp.supports_extension("smtputf8"):
            # RFC 6531 §3.2: without SMTPUTF8 at the server, UTF-8 addresses cannot be sent.
            return Outcome.permanent("5.6.7", "the receiving server does not support SMTPUTF8")
        if not envelope.message.isascii() and not smtp.supports_extension("8bitmime"):
            # RFC 6152 §3: 8-bit data must not go to a server that did not offer 8BITMIME.
            return Outcome.permanent("5.6.3", "the receiving server does not accept 8-bit data")
        limit = _size_limit(smtp)
        if limit and len(envelope.message) > limit:
            # RFC 1870 §6.1: a message over the server's fixed limit will never fit.
            return Outcome.permanent("5.3.4", "message larger than the receiving server accepts")
        return None

    async def _transaction(
        self, envelope: Envelope, batch: list[EnvelopeRecipient], *, first: bool
    ) -> dict[int, Outcome]:
        stage = "MAIL"
        try:
            async with asyncio.timeout(MAX_TRANSACTION_TIME):
                reply = await self._command(
                    b"MAIL", b"FROM:" + _path(envelope.mail_from), *self._mail_params(envelope)
                )
                if reply.code != 250:
                    await self._reset()
                    outcome = Outcome.from_reply(reply.code, reply.message)
                    return {r.seq: outcome for r in batch}
                stage = "RCPT"
                outcomes, accepted = await self._recipients(batch)
                if not accepted:
                    await self._reset()
                    return outcomes
                if envelope.before_data is not None and not await envelope.before_data():
                    await self._reset()
                    raise Withheld
                stage = "DATA"
                final = await self._data(envelope.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            self._broken = True
            _close(self._smtp)
            if stage == "MAIL" and first and self.messages > 0:
                raise StaleSession(type(e).__name__) from None
            # Lost after the message went out but before the reply, the receiver may have it
            # (RFC 5321 §6.1); retrying can duplicate, not retrying can lose. We retry.
            lost = Outcome.temporary("4.4.2", f"connection lost during {stage}")
            return {r.seq: lost for r in batch}
        outcome = Outcome.from_reply(final.code, final.message, remote_dsn=self.supports_dsn)
        outcomes.update({r.seq: outcome for r in accepted})
        return outcomes

    async def _recipients(
        self, batch: list[EnvelopeRecipient]
    ) -> tuple[dict[int, Outcome], list[EnvelopeRecipient]]:
        outcomes: dict[int, Outcome] = {}
        accepted: list[EnvelopeRecipient] = []
        for r in batch:
            reply = await self._command(b"RCPT", b"TO:" + _path(r.address), *self._rcpt_params(r))
            if reply.code in (250, 251):
                accepted.append(r)
            elif reply.code == 552:
                # RFC 5321 §4.5.3.1.10: 552 to RCPT is how old servers say "too many
                # recipients"; clients must treat it as temporary.
                text = clean_text(reply.message)
                outcomes[r.seq] = Outcome(Disposition.TEMPORARY, "4.5.3", f"smtp; 552 {text}")
            else:
                outcomes[r.seq] = Outcome.from_reply(reply.code, reply.message)
            if self._broken:
                break
        return outcomes, accepted

    async def _data(self, message: bytes) -> SMTPResponse:
        """DATA, the dot-stuffed message, and the final reply (aiosmtplib does the framing)."""
        try:
            return await self._smtp.data(message, timeout=DATA_END_TIMEOUT)
        except aiosmtplib.SMTPDataError as e:
            if e.code == 421:
                self._broken = True
            await self._reset()
            return SMTPResponse(e.code, e.message)

    async def _command(self, verb: bytes, *args: bytes) -> SMTPResponse:
        response = await self._smtp.execute_command(verb, *args, timeout=COMMAND_TIMEOUT)
        if response.code == 421:
            # The server is closing the channel (RFC 5321 §3.8); nothing more can be sent.
            self._broken = True
        return response

    async def _reset(self) -> None:
        if self._broken:
            return
        try:
            reply = await self._smtp.execute_command(b"RSET", timeout=COMMAND_TIMEOUT)
            self._broken = reply.code != 250
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self._broken = True

    def _mail_params(self, envelope: Envelope) -> list[bytes]:
        smtp = self._smtp
        params: list[bytes] = []
        if smtp.supports_extension("size"):
            params.append(f"SIZE={len(envelope.message)}".encode())
        if not envelope.message.isascii():
            params.append(b"BODY=8BITMIME")
        addresses = [envelope.mail_from] + [r.address for r in envelope.recipients]
        utf8_addresses = not all(a.isascii() for a in addresses)
        # RFC 6531 §3.4; UTF-8 addresses without server support were refused beforehand.
        if (envelope.smtputf8 or utf8_addresses) and smtp.supports_extension("smtputf8"):
            params.append(b"SMTPUTF8")
        if smtp.supports_extension("dsn"):
            # RFC 3461 §4.3, §4.4: pass RET and ENVID on so the next hop can honour them.
            if envelope.ret:
                params.append(f"RET={envelope.ret}".encode())
            if envelope.envid:
                params.append(f"ENVID={xtext(envelope.envid)}".encode())
        return params

    def _rcpt_params(self, recipient: EnvelopeRecipient) -> list[bytes]:
        if not self._smtp.supports_extension("dsn"):
            return []
        params: list[bytes] = []
        if recipient.notify:
            params.append(f"NOTIFY={','.join(sorted(recipient.notify))}".encode())
        if recipient.orcpt:
            addr_type, _, address = recipient.orcpt.partition(";")
            params.append(f"ORCPT={addr_type};{xtext(address)}".encode())
        return params


# --- Helpers --------------------------------------------------------------------------------


def _path(address: str) -> bytes:
    """``<address>`` for MAIL/RCPT; the address is already validated (queue.enqueue)."""
    return b"<" + address.encode("utf-8") + b">"


async def _greet(
    endpoint: Endpoint, local_hostname: str, connect_timeout: float
) -> aiosmtplib.SMTP:
    """Connect and get past the greeting and EHLO (HELO if EHLO is refused, §3.2)."""
    smtp = aiosmtplib.SMTP(
        hostname=endpoint.address,
        port=endpoint.port,
        local_hostname=local_hostname,
        start_tls=False,
        timeout=COMMAND_TIMEOUT,
    )
    try:
        await smtp.connect(timeout=connect_timeout)
    except aiosmtplib.SMTPConnectResponseError as e:
        _close(smtp)
        raise SessionError(Outcome.from_reply(e.code, e.message)) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        _close(smtp)
        reason = f"cannot connect to {endpoint.mx}[{endpoint.address}]: {_reason(e)}"
        raise SessionError(Outcome.temporary("4.4.1", reason)) from None
    await _ehlo(smtp, endpoint, local_hostname)
    return smtp


async def _ehlo(smtp: aiosmtplib.SMTP, endpoint: Endpoint, local_hostname: str) -> None:
    try:
        try:
            await smtp.ehlo(hostname=local_hostname, timeout=COMMAND_TIMEOUT)
        except aiosmtplib.SMTPHeloError:
            await smtp.helo(hostname=local_hostname, timeout=COMMAND_TIMEOUT)
    except aiosmtplib.SMTPResponseException as e:
        _close(smtp)
        raise SessionError(Outcome.from_reply(e.code, e.message)) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        _close(smtp)
        reason = f"{endpoint.mx} dropped the connection: {_reason(e)}"
        raise SessionError(Outcome.temporary("4.4.2", reason)) from None


async def _start_tls(
    smtp: aiosmtplib.SMTP, endpoint: Endpoint, context: ssl.SSLContext, local_hostname: str
) -> TLSLevel:
    """STARTTLS, then EHLO again (RFC 3207 §4.2). A 454 reply leaves the session in plaintext
    (the server withdrew its offer); a certificate that does not validate raises
    ``ssl.SSLCertVerificationError``; any other failure is a :class:`SessionError`."""
    try:
        await smtp.starttls(
            server_hostname=endpoint.mx, tls_context=context, timeout=TLS_HANDSHAKE_TIMEOUT
        )
    except ssl.SSLCertVerificationError:
        raise
    except aiosmtplib.SMTPResponseException as e:
        if e.code == 454:
            return TLSLevel.NONE
        _close(smtp)
        raise SessionError(Outcome.from_reply(e.code, e.message)) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        _close(smtp)
        reason = f"TLS handshake with {endpoint.mx} failed: {_reason(e)}"
        raise SessionError(Outcome.temporary("4.7.5", reason)) from None
    await _ehlo(smtp, endpoint, local_hostname)
    verified = context.verify_mode == ssl.CERT_REQUIRED
    return TLSLevel.VERIFIED if verified else TLSLevel.UNVERIFIED


def _refuse_loop(smtp: aiosmtplib.SMTP, endpoint: Endpoint, local_hostname: str) -> None:
    """RFC 5321 §5.1 loop check, the way Postfix does it: a server greeting with our own
    name is this server (an MX or address that leads back here under another name)."""
    reply = smtp.last_ehlo_response or smtp.last_helo_response
    first_line = reply.message.split("\n", 1)[0] if reply else ""
    name = first_line.split(" ", 1)[0].lower().rstrip(".")
    if name and name == local_hostname.lower().rstrip("."):
        _close(smtp)
        text = f"mail for {endpoint.mx} loops back to myself"
        raise SessionError(Outcome.permanent("5.4.6", text))


def _close(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        smtp.close()


def _size_limit(smtp: aiosmtplib.SMTP) -> int:
    value = smtp.esmtp_extensions.get("size", "")
    return int(value) if value.isdigit() else 0


def _reason(error: BaseException) -> str:
    """A short, secret-free reason for logs and diagnostics."""
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
    if isinstance(cause, ssl.SSLError):
        return cause.reason or "TLS error"
    if isinstance(cause, TimeoutError):
        return "timed out"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(cause).__name__


def enhanced_status(code: int, text: str) -> str:
    """The RFC 3463 code at the start of a reply's text, or one derived from the code
    (RFC 3463 §3.1: X.0.0 when nothing more specific is known)."""
    match = _ENHANCED.match(text.strip())
    if match and match.group(1) == str(code)[0]:
        return match.group(0)
    klass = str(code)[0] if str(code)[0] in "245" else "4"
    return f"{klass}.0.0"


def clean_text(text: str) -> str:
    """Reply text on one printable line, bounded: it goes into logs and DSN fields."""
    return _UNPRINTABLE.sub(" ", " ".join(text.split()))[:MAX_REPLY_TEXT]


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext encoding (ENVID, ORCPT values)."""
    return _XTEXT_SPECIAL.sub(lambda m: "".join(f"+{b:02X}" for b in m.group().encode()), value)
