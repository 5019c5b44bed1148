"""The IMAP connection state machine: states, capabilities, AUTHENTICATE, IDLE, literals,
limits, STARTTLS, COMPRESS=DEFLATE, and a fuzzer that checks every input gets an answer."""

from __future__ import annotations

import base64
import tracemalloc
import zlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postvern.config import Limits
from postvern.imap.grammar import commands as c
from postvern.imap.protocol import (
    DEFAULT_CAPABILITIES,
    NEED_DATA,
    PAUSED,
    CommandReceived,
    CompressionStarted,
    ConnectionClosed,
    ConnectionState,
    IdleDone,
    ImapConnection,
    LocalProtocolError,
    ProtocolConfig,
    StartTLSRequested,
)
from postvern.imap.serialize import Code, Completion, Condition, ExistsData, ResponseCode, Status


class Client:
    """Drives an ImapConnection the way the session will, recording events and output."""

    def __init__(self, config: ProtocolConfig | None = None, *, tls: bool = True) -> None:
        self.conn = ImapConnection(config or ProtocolConfig(), tls_active=tls)
        self.conn.greeting()
        self.greeting = self.conn.data_to_send()

    def send(self, data: bytes) -> tuple[list[object], bytes]:
        self.conn.receive_data(data)
        return self.drain()

    def drain(self) -> tuple[list[object], bytes]:
        events: list[object] = []
        while (event := self.conn.next_event()) not in (NEED_DATA, PAUSED):
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
        return events, self.conn.data_to_send()

    def answer(self, completion: Completion) -> bytes:
        self.conn.send(completion)
        return self.conn.data_to_send()

    def login(self) -> None:
        events, _ = self.send(b"L1 LOGIN user pass\r\n")
        assert isinstance(events[0], CommandReceived)
        self.answer(Completion.ok("L1", "logged in"))
        assert self.conn.state is ConnectionState.AUTHENTICATED

    def select(self, mailbox: bytes = b"INBOX") -> None:
        self.send(b"S1 SELECT " + mailbox + b"\r\n")
        self.answer(Completion.ok("S1", "selected", ResponseCode(Code.READ_WRITE)))
        assert self.conn.state is ConnectionState.SELECTED


def commands(events: list[object]) -> list[c.Command]:
    return [e.command for e in events if isinstance(e, CommandReceived)]


# -- greeting and capabilities --------------------------------------------------------------


def test_greeting_without_tls_hides_authentication() -> None:
    client = Client(tls=False)
    assert client.greeting.startswith(b"* OK [CAPABILITY IMAP4rev2 IMAP4rev1 ")
    assert b" STARTTLS" in client.greeting and b" LOGINDISABLED" in client.greeting
    assert b"AUTH=PLAIN" not in client.greeting
    assert b"MOVE" not in client.greeting  # mailbox features only after login


def test_greeting_with_tls_offers_plain() -> None:
    client = Client()
    assert b"AUTH=PLAIN" in client.greeting and b"SASL-IR" in client.greeting
    assert b"STARTTLS" not in client.greeting and b"LOGINDISABLED" not in client.greeting


def test_capabilities_after_login() -> None:
    client = Client()
    client.login()
    _, out = client.send(b"c CAPABILITY\r\n")
    line = out.split(b"\r\n")[0].decode()
    assert line.startswith("* CAPABILITY IMAP4rev2 IMAP4rev1")
    caps = set(line.split()[2:])
    assert {"MOVE", "CONDSTORE", "QRESYNC", "COMPRESS=DEFLATE", "UTF8=ACCEPT"} <= caps
    assert f"APPENDLIMIT={Limits().imap_literal}" in caps
    assert "AUTH=PLAIN" not in caps and "STARTTLS" not in caps
    assert out.endswith(b"c OK CAPABILITY completed\r\n")


def test_preauth_greeting() -> None:
    conn = ImapConnection(ProtocolConfig())
    conn.greeting(preauth=True)
    assert conn.data_to_send().startswith(b"* PREAUTH [CAPABILITY IMAP4rev2")
    assert conn.state is ConnectionState.AUTHENTICATED


def test_only_configured_capabilities_are_advertised_and_accepted() -> None:
    caps = tuple(
        cap for cap in DEFAULT_CAPABILITIES if cap not in ("MOVE", "SORT", "ESEARCH", "ID")
    )
    client = Client(ProtocolConfig(capabilities=caps))
    client.login()
    client.select()
    _, out = client.send(b"c CAPABILITY\r\n")
    assert b"MOVE" not in out and b"SORT" not in out
    _, out = client.send(b"m MOVE 1 Trash\r\n")
    assert out == b"m BAD unknown command MOVE\r\n"
    _, out = client.send(b"s SORT (DATE) UTF-8 ALL\r\n")
    assert out == b"s BAD unknown command SORT\r\n"
    _, out = client.send(b"e SEARCH RETURN (COUNT) ALL\r\n")
    assert out.startswith(b"e BAD SEARCH uses ESEARCH")
    _, out = client.send(b"i ID NIL\r\n")
    assert out.startswith(b"i BAD unknown command ID")


# -- login ----------------------------------------------------------------------------------


def test_login_needs_tls() -> None:
    client = Client(tls=False)
    events, out = client.send(b"a LOGIN user pass\r\n")
    assert not events
    assert out == b"a NO [PRIVACYREQUIRED] authentication needs TLS: use STARTTLS first\r\n"
    _, out = client.send(b"b AUTHENTICATE PLAIN\r\n")
    assert out.startswith(b"b NO [PRIVACYREQUIRED]")


def test_plaintext_auth_can_be_allowed_for_tests() -> None:
    client = Client(ProtocolConfig(plaintext_auth=True), tls=False)
    assert b"AUTH=PLAIN" in client.greeting
    client.login()


def test_starttls_discards_pipelined_plaintext() -> None:
    client = Client(tls=False)
    events, out = client.send(b"t STARTTLS\r\ninjected LOGIN user pass\r\n")
    assert events == [StartTLSRequested()]
    assert out == b"t OK begin TLS negotiation now\r\n"
    client.conn.tls_established()
    events, out = client.send(b"")  # nothing was kept from before the handshake
    assert not events or events == [ConnectionClosed("eof")]


def test_starttls_after_tls_and_after_login() -> None:
    client = Client(tls=False)
    client.send(b"t STARTTLS\r\n")
    client.conn.tls_established()
    _, out = client.send(b"c CAPABILITY\r\n")
    assert b"AUTH=PLAIN" in out and b"STARTTLS" not in out
    _, out = client.send(b"t2 STARTTLS\r\n")
    assert out == b"t2 BAD TLS is already active\r\n"
    client.login()
    _, out = client.send(b"t3 STARTTLS\r\n")
    assert out.startswith(b"t3 BAD STARTTLS is not valid after authentication")


def test_starttls_unknown_without_certificate() -> None:
    client = Client(ProtocolConfig(tls_available=False), tls=False)
    assert b"STARTTLS" not in client.greeting
    _, out = client.send(b"t STARTTLS\r\n")
    assert out == b"t BAD unknown command STARTTLS\r\n"


def test_login_success_and_failure() -> None:
    client = Client()
    events, _ = client.send(b"a LOGIN fred secret\r\nb NOOP\r\n")
    assert commands(events) == [c.Login(tag="a", username="fred", password="secret")]
    assert client.conn.next_event() is PAUSED  # b waits for a's completion
    client.answer(
        Completion.no("a", "invalid credentials", ResponseCode(Code.AUTHENTICATIONFAILED))
    )
    assert client.conn.state is ConnectionState.NOT_AUTHENTICATED
    events, _ = client.drain()
    assert commands(events) == [c.Noop(tag="b")]


def test_authenticate_plain_exchange() -> None:
    client = Client()
    events, out = client.send(b"A001 AUTHENTICATE PLAIN\r\n")
    assert not events and out == b"+ \r\n"
    events, out = client.send(base64.b64encode(b"\x00fred\x00s3cret p\xc3\xa4ss") + b"\r\n")
    [command] = commands(events)
    assert isinstance(command, c.Authenticate) and command.credentials is not None
    assert (command.credentials.authzid, command.credentials.authcid) == ("", "fred")
    assert command.credentials.password == "s3cret päss"
    assert "s3cret" not in repr(command)
    client.answer(Completion.ok("A001", "authenticated"))
    assert client.conn.state is ConnectionState.AUTHENTICATED


def test_authenticate_with_initial_response() -> None:
    client = Client()
    ir = base64.b64encode(b"admin\x00fred\x00pw")
    events, out = client.send(b"a AUTHENTICATE PLAIN " + ir + b"\r\n")
    [command] = commands(events)
    assert command.credentials.authzid == "admin"  # type: ignore[attr-defined]
    assert out == b""


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (b"*", b"a BAD authentication cancelled\r\n"),
        (b"!!!", b"a BAD invalid base64 data\r\n"),
        (base64.b64encode(b"fred\x00pw"), b"a BAD malformed PLAIN response\r\n"),
        (base64.b64encode(b"\x00fred\x00"), b"a BAD malformed PLAIN response\r\n"),
        (base64.b64encode(b"\x00fred\x00\xff"), b"a BAD PLAIN response is not UTF-8\r\n"),
    ],
)
def test_authenticate_failures(response: bytes, expected: bytes) -> None:
    client = Client()
    client.send(b"a AUTHENTICATE PLAIN\r\n")
    events, out = client.send(response + b"\r\n")
    assert not events and out == expected
    events, out = client.send(b"b NOOP\r\n")  # back to reading commands
    assert commands(events) == [c.Noop(tag="b")]


def test_authenticate_unknown_mechanism() -> None:
    client = Client()
    _, out = client.send(b"a AUTHENTICATE CRAM-MD5\r\n")
    assert out == b"a NO unsupported authentication mechanism\r\n"


# -- states ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "line", "expected"),
    [
        ("none", b"a SELECT INBOX", b"a BAD SELECT needs authentication: log in first\r\n"),
        ("none", b"a FETCH 1 FLAGS", b"a BAD FETCH needs authentication: log in first\r\n"),
        ("auth", b"a FETCH 1 FLAGS", b"a BAD FETCH needs a selected mailbox\r\n"),
        ("auth", b"a UID FETCH 1 FLAGS", b"a BAD UID FETCH needs a selected mailbox\r\n"),
        ("auth", b"a EXPUNGE", b"a BAD EXPUNGE needs a selected mailbox\r\n"),
        ("auth", b"a LOGIN x y", b"a BAD LOGIN is not valid after authentication\r\n"),
        (
            "selected",
            b"a ENABLE CONDSTORE",
            b"a BAD ENABLE is only valid before a mailbox is selected\r\n",
        ),
        (
            "selected",
            b"a AUTHENTICATE PLAIN",
            b"a BAD AUTHENTICATE is not valid after authentication\r\n",
        ),
    ],
)
def test_commands_in_the_wrong_state(setup: str, line: bytes, expected: bytes) -> None:
    client = Client()
    if setup in ("auth", "selected"):
        client.login()
    if setup == "selected":
        client.select()
    events, out = client.send(line + b"\r\n")
    assert not events and out == expected


def test_select_close_and_failed_select() -> None:
    client = Client()
    client.login()
    events, _ = client.send(b"e EXAMINE Archive\r\n")
    assert commands(events) == [c.Select(tag="e", mailbox="Archive", read_only=True)]
    client.answer(Completion.ok("e", "examined", ResponseCode(Code.READ_ONLY)))
    assert client.conn.state is ConnectionState.SELECTED and client.conn.selected_read_only
    # RFC 9051 §6.3.2: a failed SELECT leaves no mailbox selected.
    client.send(b"s SELECT Nope\r\n")
    client.answer(Completion.no("s", "no such mailbox", ResponseCode(Code.NONEXISTENT)))
    assert client.conn.state is ConnectionState.AUTHENTICATED
    client.select()
    assert not client.conn.selected_read_only
    client.send(b"c CLOSE\r\n")
    client.answer(Completion.ok("c"))
    assert client.conn.state is ConnectionState.AUTHENTICATED
    client.select()
    client.send(b"u UNSELECT\r\n")
    client.answer(Completion.ok("u"))
    assert client.conn.state is ConnectionState.AUTHENTICATED


def test_completion_must_match_the_command_in_progress() -> None:
    client = Client()
    with pytest.raises(LocalProtocolError):
        client.conn.send(Completion.ok("nothing"))
    client.send(b"a NOOP\r\n")
    with pytest.raises(LocalProtocolError):
        client.conn.send(Completion.ok("b"))


def test_logout_and_eof() -> None:
    client = Client()
    events, out = client.send(b"z LOGOUT\r\nq NOOP\r\n")
    assert events == [ConnectionClosed("logout")]
    assert out == b"* BYE logging out\r\nz OK LOGOUT completed\r\n"
    assert client.conn.state is ConnectionState.LOGOUT
    assert client.send(b"r NOOP\r\n") == ([], b"")
    other = Client()
    assert other.send(b"") == ([ConnectionClosed("eof")], b"")


def test_bye_from_the_session_closes() -> None:
    client = Client()
    client.conn.send(Condition(Status.BYE, "server shutting down"))
    assert client.drain() == ([ConnectionClosed("bye")], b"* BYE server shutting down\r\n")


# -- commands answered by the core ----------------------------------------------------------


def test_enable() -> None:
    client = Client()
    client.login()
    _, out = client.send(b"t1 ENABLE CONDSTORE X-GOOD-IDEA\r\n")
    assert out == b"* ENABLED CONDSTORE\r\nt1 OK ENABLE completed\r\n"
    _, out = client.send(b"t2 ENABLE qresync condstore\r\n")
    assert out == b"* ENABLED QRESYNC\r\nt2 OK ENABLE completed\r\n"
    assert client.conn.qresync_enabled and client.conn.condstore_enabled
    assert not client.conn.utf8_names
    _, out = client.send(b"t3 ENABLE IMAP4rev2\r\n")
    assert out.startswith(b"* ENABLED IMAP4rev2\r\n")
    assert client.conn.rev2 and client.conn.utf8_names


def test_utf8_accept_changes_mailbox_names_both_ways() -> None:
    client = Client()
    client.login()
    _, out = client.send(b'a SELECT "Entw\xc3\xbcrfe"\r\n')
    assert out.startswith(b"a BAD 8-bit mailbox name")
    events, _ = client.send(b"b SELECT Entw&APw-rfe\r\n")
    assert commands(events)[0].mailbox == "Entwürfe"  # type: ignore[attr-defined]
    client.answer(Completion.no("b"))
    client.send(b"e ENABLE UTF8=ACCEPT\r\n")
    events, _ = client.send(b'c SELECT "Entw\xc3\xbcrfe"\r\n')
    assert commands(events)[0].mailbox == "Entwürfe"  # type: ignore[attr-defined]
    client.answer(Completion.no("c"))
    from postvern.imap.serialize import ListData

    client.conn.send(ListData("Entwürfe"))
    assert client.conn.data_to_send() == b'* LIST () "/" "Entw\xc3\xbcrfe"\r\n'


def test_id_namespace_setquota() -> None:
    client = Client()
    _, out = client.send(b'i ID ("name" "Thunderbird" "version" "115")\r\n')
    assert out.startswith(b'* ID ("name" "Postvern" "version" ')
    assert out.endswith(b"i OK ID completed\r\n")
    assert client.conn.client_id == (("name", "Thunderbird"), ("version", "115"))
    client.login()
    _, out = client.send(b"n NAMESPACE\r\n")
    assert out == b'* NAMESPACE (("" "/")) NIL NIL\r\nn OK NAMESPACE completed\r\n'
    _, out = client.send(b'q SETQUOTA "" (STORAGE 512)\r\n')
    assert out == b"q NO [NOPERM] quotas are set by the administrator\r\n"
    events, _ = client.send(b"g GETQUOTAROOT INBOX\r\n")
    assert commands(events) == [c.GetQuotaRoot(tag="g", mailbox="INBOX")]


def test_condstore_is_enabled_by_use() -> None:
    client = Client()
    client.login()
    client.select()
    assert not client.conn.condstore_enabled
    events, _ = client.send(b"f FETCH 1 (FLAGS) (CHANGEDSINCE 5)\r\n")
    assert commands(events)[0].changed_since == 5  # type: ignore[attr-defined]
    assert client.conn.condstore_enabled


def test_extension_arguments_need_their_capability() -> None:
    caps = tuple(
        cap for cap in DEFAULT_CAPABILITIES if cap not in ("CONDSTORE", "BINARY", "MULTIAPPEND")
    )
    client = Client(ProtocolConfig(capabilities=caps))
    client.login()
    _, out = client.send(b"a APPEND x {1+}\r\na {1+}\r\nb\r\n")
    assert out.startswith(b"a BAD APPEND uses MULTIAPPEND")
    _, out = client.send(b"b APPEND x ~{1}\r\n")
    assert out == b"b BAD literal8 needs BINARY, which is not available\r\n"
    client.select()
    _, out = client.send(b"c FETCH 1 (MODSEQ)\r\n")
    assert out.startswith(b"c BAD FETCH uses CONDSTORE")
    _, out = client.send(b"d FETCH 1 BINARY[1]\r\n")
    assert out.startswith(b"d BAD FETCH uses BINARY")


# -- IDLE -----------------------------------------------------------------------------------


def test_idle_done() -> None:
    client = Client()
    client.login()
    client.select()
    events, out = client.send(b"i IDLE\r\n")
    assert commands(events) == [c.Idle(tag="i")] and out == b"+ idling\r\n"
    client.conn.send(ExistsData(5))
    assert client.conn.data_to_send() == b"* 5 EXISTS\r\n"
    events, _ = client.send(b"DONE\r\nn NOOP\r\n")
    assert events == [IdleDone("i")]
    assert client.conn.next_event() is PAUSED
    assert client.answer(Completion.ok("i", "IDLE terminated")) == b"i OK IDLE terminated\r\n"
    events, _ = client.drain()
    assert commands(events) == [c.Noop(tag="n")]


def test_idle_expects_done() -> None:
    client = Client()
    client.login()
    client.send(b"i IDLE\r\n")
    events, out = client.send(b"x NOOP\r\n")
    assert events == [IdleDone("i", aborted=True)]
    assert out == b"i BAD expected DONE\r\n"
    events, _ = client.send(b"y NOOP\r\n")
    assert commands(events) == [c.Noop(tag="y")]


def test_session_may_end_idle_itself() -> None:
    client = Client()
    client.login()
    client.send(b"i IDLE\r\n")
    client.answer(Completion.ok("i", "IDLE timed out"))
    events, _ = client.send(b"n NOOP\r\n")
    assert commands(events) == [c.Noop(tag="n")]


# -- literals and limits --------------------------------------------------------------------


def test_literal_go_ahead_and_refusals_before_login() -> None:
    client = Client()
    events, out = client.send(b"a LOGIN {4}\r\n")
    assert out == b"+ Ready for literal data\r\n"
    events, out = client.send(b"fred {6}\r\n")
    assert out == b"+ Ready for literal data\r\n"
    events, out = client.send(b"s3cret\r\n")
    assert commands(events) == [c.Login(tag="a", username="fred", password="s3cret")]
    client.answer(Completion.no("a"))
    limit = Limits().imap_literal_unauth
    _, out = client.send(b"b LOGIN {%d}\r\n" % (limit + 1))
    assert out == b"b NO [TOOBIG] literal too large (limit %d octets)\r\n" % limit
    _, out = client.send(b"c LOGIN {4294967295}\r\n")
    assert out.startswith(b"c NO [TOOBIG] literal too large")
    _, out = client.send(b"d LOGIN {99999999999999999999999}\r\n")
    assert out == b"d BAD literal size out of range\r\n"
    # Refused by name or state before the client sends anything: no "+".
    _, out = client.send(b"e FROB {5}\r\n")
    assert out == b"e BAD unknown command FROB\r\n"
    _, out = client.send(b"f APPEND INBOX {5}\r\n")
    assert out == b"f BAD APPEND needs authentication: log in first\r\n"
    events, _ = client.send(b"g NOOP\r\n")
    assert commands(events) == [c.Noop(tag="g")]


def test_literals_after_login() -> None:
    client = Client()
    client.login()
    _, out = client.send(b"a APPEND INBOX {5000}\r\n")
    assert out == b"+ Ready for literal data\r\n"
    events, _ = client.send(b"x" * 5000 + b"\r\n")
    [append] = commands(events)
    assert isinstance(append, c.Append) and len(append.messages[0].data) == 5000
    client.answer(Completion.ok("a"))
    _, out = client.send(b"b APPEND INBOX {4294967295}\r\n")
    assert out.startswith(b"b NO [TOOBIG]")
    _, out = client.send(b"c LIST ~{3}\r\n")
    assert out == b"c BAD literal8 is only allowed in APPEND\r\n"


def test_non_synchronizing_literal_over_limit_is_discarded() -> None:
    config = ProtocolConfig(limits=replace(Limits(), imap_literal=1000))
    client = Client(config)
    client.login()
    events, out = client.send(b"a APPEND INBOX {2000+}\r\n" + b"y" * 2000 + b"\r\nb NOOP\r\n")
    assert out == b"a BAD [TOOBIG] literal too large (limit 1000 octets)\r\n"
    assert commands(events) == [c.Noop(tag="b")]


def test_literal_minus_when_configured() -> None:
    caps = tuple(cap for cap in DEFAULT_CAPABILITIES if cap != "LITERAL+")
    client = Client(ProtocolConfig(capabilities=caps))
    client.login()
    events, out = client.send(b"a APPEND INBOX {4097+}\r\n" + b"y" * 4097 + b"\r\nb NOOP\r\n")
    assert out.startswith(b"a BAD [TOOBIG] non-synchronizing literal over 4096 octets")
    assert commands(events) == [c.Noop(tag="b")]


def test_huge_line_keeps_memory_bounded() -> None:
    client = Client()
    limit = Limits().imap_line
    chunk = b"A" * (1 << 20)
    client.send(b"t1 LOGIN ")
    tracemalloc.start()
    try:
        for _ in range(200):  # 200 MiB without a line end
            events, out = client.send(chunk)
            assert not events and not out
            assert client.conn.pending_input <= limit + len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(chunk)
    events, out = client.send(b"\r\nt2 NOOP\r\n")
    assert out == b"t1 BAD command line too long\r\n"
    assert commands(events) == [c.Noop(tag="t2")]


# -- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"", b"* BAD empty command line\r\n"),
        (b"+x NOOP", b"* BAD invalid tag\r\n"),
        (b"\xff\xfe garbage", b"* BAD invalid tag\r\n"),
        (b"a", b"a BAD missing command\r\n"),
        (b"a FROBNICATE 1 2", b"a BAD unknown command FROBNICATE\r\n"),
        (b"a NOOP extra", b"a BAD unexpected extra arguments\r\n"),
        (b"a LOGIN onlyuser", b"a BAD missing argument\r\n"),
        (b"a LOGIN us\xe9r pw", b"a BAD 8-bit characters must be quoted or sent as a literal\r\n"),
        (b'a LOGIN "unterminated pw', b"a BAD unterminated quoted string\r\n"),
    ],
)
def test_malformed_before_login(line: bytes, expected: bytes) -> None:
    client = Client()
    events, out = client.send(line + b"\r\n")
    assert not events and out == expected


@pytest.mark.parametrize(
    "line",
    [
        b"a FETCH 1 (FLAGS (BODY)",
        b"a FETCH 1 FLAGS)",
        b"a SEARCH (SEEN (DELETED)",
        b"a SEARCH \x80\x81",
        b"a STORE 1:* +FLAGS (\\Seen",
        b"a COPY 1 \xc3\xa9",
        b"a UID",
        b"a UID NOOP",
        b"a FETCH",
    ],
)
def test_malformed_in_selected_state(line: bytes) -> None:
    client = Client()
    client.login()
    client.select()
    events, out = client.send(line + b"\r\nz NOOP\r\n")
    assert out.startswith(b"a BAD ") and out.count(b"\r\n") == 1
    assert commands(events) == [c.Noop(tag="z")]


def test_deep_search_is_refused() -> None:
    client = Client()
    client.login()
    client.select()
    _, out = client.send(b"a SEARCH " + b"(" * 1000 + b"ALL" + b")" * 1000 + b"\r\n")
    assert out == b"a BAD search criteria nested deeper than 32 levels\r\n"
    events, _ = client.send(b"b SEARCH " + b"NOT " * 20 + b"ALL\r\n")
    assert isinstance(commands(events)[0], c.Search)


def test_search_charset_is_no_with_badcharset() -> None:
    client = Client()
    client.login()
    client.select()
    _, out = client.send(b'a SEARCH CHARSET KOI8-R TEXT "x"\r\n')
    assert out == b"a NO [BADCHARSET (US-ASCII UTF-8)] unsupported charset\r\n"


def test_too_many_bad_commands_end_the_connection() -> None:
    client = Client(ProtocolConfig(max_bad_commands=5))
    events, out = client.send(b"x FOO\r\n" * 10)
    assert events == [ConnectionClosed("error")]
    assert out.count(b"x BAD") == 5 and out.endswith(b"* BYE too many invalid commands\r\n")


# -- COMPRESS=DEFLATE -----------------------------------------------------------------------


def test_compress_deflate_round_trip() -> None:
    client = Client()
    client.login()
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    inflate = zlib.decompressobj(-15)
    first = deflate.compress(b"n1 NOOP\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH)
    # The client may send compressed data right behind the COMPRESS command.
    events, out = client.send(b"z COMPRESS DEFLATE\r\n" + first)
    assert events[0] == CompressionStarted()
    assert commands(events) == [c.Noop(tag="n1")]
    assert out.startswith(b"z OK DEFLATE active\r\n")
    assert inflate.decompress(out[len(b"z OK DEFLATE active\r\n") :]) == b""
    client.conn.send(Completion.ok("n1"))
    assert inflate.decompress(client.conn.data_to_send()) == b"n1 OK completed\r\n"
    data = deflate.compress(b"c CAPABILITY\r\nz2 COMPRESS DEFLATE\r\n") + deflate.flush(
        zlib.Z_SYNC_FLUSH
    )
    _, out = client.send(data)
    text = inflate.decompress(out)
    assert b"COMPRESS=DEFLATE" not in text.split(b"\r\n")[0]
    assert text.endswith(b"z2 NO [COMPRESSIONACTIVE] already compressing\r\n")


def test_compress_needs_login_and_deflate() -> None:
    client = Client()
    _, out = client.send(b"z COMPRESS DEFLATE\r\n")
    assert out.startswith(b"z BAD COMPRESS needs authentication")
    client.login()
    _, out = client.send(b"z COMPRESS LZMA\r\n")
    assert out == b"z BAD unknown compression mechanism\r\n"


def test_deflate_bomb_is_inflated_in_bounded_steps() -> None:
    client = Client()
    client.login()
    client.send(b"z COMPRESS DEFLATE\r\n")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    size = 64 << 20
    bomb = deflate.compress(b"t LOGIN " + b"B" * size) + deflate.compress(b"\r\nq NOOP\r\n")
    bomb += deflate.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < size // 500
    tracemalloc.start()
    try:
        events, out = client.send(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * Limits().imap_line + len(bomb) + (1 << 20)
    assert commands(events) == [c.Noop(tag="q")]
    assert zlib.decompressobj(-15).decompress(out) == b"t BAD command line too long\r\n"


def test_corrupt_deflate_stream_ends_the_connection() -> None:
    client = Client()
    client.login()
    client.send(b"z COMPRESS DEFLATE\r\n")
    events, out = client.send(b"\xff\xff\xff\xff garbage")
    assert events == [ConnectionClosed("error")]
    assert zlib.decompressobj(-15).decompress(out).startswith(b"* BYE compression error")


# -- fuzzing --------------------------------------------------------------------------------

_WORDS = st.sampled_from(
    [
        b"a1",
        b"LOGIN",
        b"SELECT",
        b"FETCH",
        b"UID",
        b"SEARCH",
        b"IDLE",
        b"DONE",
        b"AUTHENTICATE PLAIN",
        b"ENABLE QRESYNC",
        b"COMPRESS DEFLATE",
        b"STARTTLS",
        b"LOGOUT",
        b"(",
        b")",
        b'"x',
        b"{2}",
        b"{1+}",
        b"~{1}",
        b"*",
        b" ",
        b"INBOX",
        b"1:*",
        b"\xc3",
        b"\x00",
        b"NOT",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_WORDS, max_size=8).map(b" ".join), min_size=1, max_size=8), st.booleans())
def test_every_line_is_answered_and_nothing_raises(lines: list[bytes], logged_in: bool) -> None:
    client = Client(ProtocolConfig(plaintext_auth=True))
    if logged_in:
        client.login()
    inside_literal = False
    for line in lines:
        if client.conn.state is ConnectionState.LOGOUT or client.conn.compression_active:
            break  # after COMPRESS, plaintext lines are (correctly) noise
        client.conn.receive_data(line + b"\r\n")
        answered = False
        while (event := client.conn.next_event()) is not NEED_DATA:
            answered = True
            if event is PAUSED:
                current = client.conn.current_command
                assert current is not None
                client.conn.send(Completion.ok(current.tag))
            elif isinstance(event, StartTLSRequested):
                client.conn.tls_established()
            elif isinstance(event, ConnectionClosed):
                break
        out = client.conn.data_to_send()
        # Every complete line gets an answer: a command for the session, a response, or a
        # continuation request (a literal, AUTHENTICATE or IDLE in progress).
        # A line ending in a literal marker is not complete yet, and the bytes after it are
        # literal data rather than a line of their own.
        assert answered or out or inside_literal or line.endswith(b"+}")
        inside_literal = out.endswith(b"+ Ready for literal data\r\n") or line.endswith(b"+}")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    client = Client(ProtocolConfig(plaintext_auth=True, limits=replace(Limits(), imap_line=128)))
    client.conn.receive_data(data)
    for _ in range(200):
        event = client.conn.next_event()
        if event is NEED_DATA or isinstance(event, ConnectionClosed):
            break
        if event is PAUSED:
            current = client.conn.current_command
            assert current is not None
            client.conn.send(Completion.ok(current.tag))
    client.conn.data_to_send()
    assert client.conn.pending_input <= len(data)


def test_capabilities_for_the_login_response() -> None:
    client = Client()
    after = client.conn.capabilities(ConnectionState.AUTHENTICATED)
    assert "MOVE" in after and "AUTH=PLAIN" not in after
    client.send(b"a LOGIN u p\r\n")
    code = ResponseCode.capability(after)
    assert client.answer(Completion.ok("a", "logged in", code)).startswith(
        b"a OK [CAPABILITY IMAP4rev2"
    )
    assert client.conn.capabilities() == after


def test_zero_length_literals() -> None:
    client = Client()
    client.login()
    _, out = client.send(b"a APPEND INBOX {0}\r\n")
    assert out == b"+ Ready for literal data\r\n"
    events, _ = client.send(b"\r\n")
    [append] = commands(events)
    assert append.messages[0].data == b""  # type: ignore[attr-defined]
