"""Fuzz targets: each takes bytes and must return without raising anything but the parser's
own documented refusal. Shared by the atheris runner (run.py, coverage-guided) and the
bounded run in the tests (tests/test_fuzz_bounded.py).

The protocol cores are driven as their sessions drive them: the SMTP core with the test
suite's permissive reply policy (every request answered, so the fuzzer reaches DATA, BDAT,
AUTH and STARTTLS states), the IMAP core with every command completed OK (so it reaches the
authenticated and selected grammars), the POP3 core with the test suite's session (logins
accepted or refused, messages retrieved, QUIT committed). Input is cut into pieces at the
fuzzer's own choice of points, so split lines and literals are exercised too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2] / "tests"
sys.path.insert(0, str(TESTS))

import dkim.util  # noqa: E402

from postvern.emailauth import dmarc, domainkeys, spf  # noqa: E402
from postvern.emailauth.dkim import key_record_problem, signature_problem  # noqa: E402
from postvern.emailauth.headers import parse_header_block  # noqa: E402
from postvern.imap.parser import NEED_DATA as IMAP_NEED_DATA  # noqa: E402
from postvern.imap.protocol import PAUSED, CommandReceived, ConnectionClosed, ImapConnection  # noqa: E402
from postvern.imap.protocol import ProtocolConfig as IMAPConfig  # noqa: E402
from postvern.imap.serialize import Completion  # noqa: E402
from postvern.mime.parse import parse_message  # noqa: E402
from postvern.pop3.protocol import Event as POP3Event  # noqa: E402
from postvern.pop3.protocol import NeedData as POP3NeedData  # noqa: E402
from postvern.pop3.protocol import POP3Connection  # noqa: E402
from postvern.smtp import events as smtp_events  # noqa: E402
from postvern.smtp import replies as smtp_replies  # noqa: E402
from postvern.smtp.protocol import ServerConnection  # noqa: E402

# Steps one input may take: a core that keeps producing events from finite input would be a
# bug of its own (an endless loop), reported as such.
MAX_EVENTS = 10_000

# Made once, not per input: the same for every input, and not the code under test (~2 us
# each, instrumented; small beside the ~200-300 us an SMTP or IMAP input takes).
SMTP_GREETING = smtp_replies.greeting("mx.fuzz")
IMAP_CONFIG = IMAPConfig()
# A fixed clock for the DKIM t=/x= checks, so that a finding reproduces on any day.
DKIM_NOW = 1_700_000_000.0


def _pieces(data: bytes) -> list[bytes]:
    """The input cut where the first byte says (1-16 pieces), after that byte."""
    if not data:
        return [b""]
    count = data[0] % 16 + 1
    body = data[1:]
    size = max(1, len(body) // count)
    return [body[i : i + size] for i in range(0, len(body), size)] or [b""]


def smtp_core(data: bytes) -> None:
    # Here, not at the top: it brings pytest and hypothesis, which the other targets do not
    # need; after the first input this is a dictionary lookup (~1 us of ~200-300).
    from test_smtp_protocol import standard_reply

    conn = ServerConnection(tls_available=True, auth_mechanisms=("PLAIN", "LOGIN"), dsn=True)
    conn.send(SMTP_GREETING)
    steps = 0
    for piece in [*_pieces(data), b""]:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            steps += 1
            assert steps < MAX_EVENTS, "endless events"
            if isinstance(event, smtp_events.NeedData):
                break
            if isinstance(event, smtp_events.ConnectionClosed):
                return
            conn.send(standard_reply(event, conn))


def imap_core(data: bytes) -> None:
    conn = ImapConnection(IMAP_CONFIG, tls_active=True)
    conn.greeting()
    conn.data_to_send()
    steps = 0
    for piece in _pieces(data):
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            steps += 1
            assert steps < MAX_EVENTS, "endless events"
            if event is IMAP_NEED_DATA or event is PAUSED:
                break
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, CommandReceived):
                conn.send(Completion.ok(event.command.tag, "done"))
            conn.data_to_send()


class _GuardedPOP3(POP3Connection):
    """A POP3 core that counts its events (see MAX_EVENTS)."""

    steps = 0

    def next_event(self) -> POP3Event | POP3NeedData:
        self.steps += 1
        assert self.steps < MAX_EVENTS, "endless events"
        return super().next_event()


def pop3_core(data: bytes) -> None:
    """The whole conversation, the test suite's session answering every event: logins
    accepted (or refused, if the first byte's 0x80 bit is set) with a three-message maildrop,
    so that the fuzzer reaches TRANSACTION (STAT, LIST, UIDL, RETR, TOP, DELE, RSET) and
    UPDATE; STLS on a plaintext connection if the 0x40 bit is set."""
    # Here, not at the top, for the reason given in smtp_core.
    from test_pop3_protocol import drive

    flags = data[0] if data else 0
    plaintext = bool(flags & 0x40)
    conn = _GuardedPOP3(tls_active=not plaintext, tls_available=plaintext)
    drive(conn, _pieces(data), refuse=bool(flags & 0x80))


def mime(data: bytes) -> None:
    parse_message(data)


def header_block(data: bytes) -> None:
    parse_header_block(data)


def dkim_tags(data: bytes) -> None:
    """The tag=value lists of DKIM-Signature, ARC-Seal, ARC-Message-Signature and key
    records (RFC 6376 §3.2), as dkimpy parses them for the verifier, then Postvern's checks
    of the list read as a signature (§3.5, §6.1.1; drafts refused and allowed) and as a key
    record (§3.6.1, with RFC 4871's g= honoured). The one input is both, so that the i= and
    g= the fuzzer writes meet."""
    try:
        tags = dkim.util.parse_tag_value(data)
    except dkim.util.InvalidTagValueList:
        return
    signature_problem(tags, DKIM_NOW)
    signature_problem(tags, DKIM_NOW, drafts=True)
    signature = tags if b"d" in tags else {**tags, b"d": b"example.org"}
    key_record_problem(data, b"rsa-sha256", signature, granularity=True)


def domainkeys_record(data: bytes) -> None:
    try:
        domainkeys.parse_key_record(data)
    except domainkeys.DomainKeysError:
        pass


def spf_record(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        spf.parse_record(text)
    except spf.SPFError:
        pass


def dmarc_record(data: bytes) -> None:
    try:
        dmarc.parse_record(data.decode("utf-8", "replace"))
    except dmarc.RecordError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "smtp": smtp_core,
    "imap": imap_core,
    "pop3": pop3_core,
    "mime": mime,
    "headers": header_block,
    "dkim": dkim_tags,
    "domainkeys": domainkeys_record,
    "spf": spf_record,
    "dmarc": dmarc_record,
}
