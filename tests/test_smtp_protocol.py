"""The sans-I/O SMTP core, driven without sockets: syntax, order, limits and smuggling."""

from __future__ import annotations

import base64
import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postvern.config import Limits
from postvern.smtp import events as ev
from postvern.smtp import replies
from postvern.smtp.protocol import (
    MAX_AUTH_LINE,
    LocalProtocolError,
    Mode,
    ServerConnection,
    SMTPLimits,
)
from postvern.smtp.replies import Reply

Policy = Callable[[ev.Event], Reply | None]


def standard_reply(event: ev.Event, conn: ServerConnection) -> Reply:
    """What a permissive server says; tests override single answers through a policy."""
    if isinstance(event, ev.ProtocolError | ev.Refused | ev.MessageRejected | ev.Unsynchronized):
        return event.reply
    if isinstance(event, ev.Ehlo):
        return replies.ehlo("mx.test", event.domain, conn.extensions())
    if isinstance(event, ev.Helo):
        return replies.helo("mx.test")
    if isinstance(event, ev.Mail):
        return replies.sender_ok()
    if isinstance(event, ev.Rcpt):
        return replies.recipient_ok()
    if isinstance(event, ev.Data):
        return replies.start_data()
    if isinstance(event, ev.Bdat):
        return replies.chunk_received(event.size)
    if isinstance(event, ev.MessageBody):
        return replies.message_accepted()
    if isinstance(event, ev.Quit):
        return replies.closing("mx.test")
    if isinstance(event, ev.StartTLS):
        return replies.ready_to_start_tls()
    if isinstance(event, ev.Auth) and event.initial_response is None:
        return replies.auth_challenge(b"")
    if isinstance(event, ev.Auth | ev.AuthResponse):
        return replies.auth_succeeded()
    if isinstance(event, ev.Vrfy):
        return replies.cannot_vrfy()
    if isinstance(event, ev.Help):
        return replies.help_text()
    return replies.ok()


class Driver:
    """Feeds bytes into a ServerConnection and answers every event like a session would."""

    def __init__(self, policy: Policy | None = None, **options: Any) -> None:
        self.conn = ServerConnection(**options)
        self.policy = policy
        self.output = bytearray(self.conn.send(replies.greeting("mx.test")))
        self.events: list[ev.Event] = []
        self.replies()  # drop the greeting

    def feed(self, data: bytes) -> list[ev.Event]:
        self.conn.receive_data(data)
        return self.drain()

    def drain(self) -> list[ev.Event]:
        got: list[ev.Event] = []
        while True:
            event = self.conn.next_event()
            if isinstance(event, ev.NeedData):
                break
            got.append(event)
            if isinstance(event, ev.ConnectionClosed):
                break
            reply = self.policy(event) if self.policy else None
            self.output += self.conn.send(reply or standard_reply(event, self.conn))
        self.events += got
        return got

    def replies(self) -> list[str]:
        """Final reply lines written since the last call ("250 2.1.0 Sender OK", ...)."""
        lines = self.output.decode("ascii").split("\r\n")
        self.output.clear()
        return [line for line in lines if re.match(r"\d{3} ", line)]

    def codes(self) -> list[str]:
        """Code and enhanced code of each reply since the last call ("250 2.1.0")."""
        return [" ".join(line.split(" ")[:2]) for line in self.replies()]


def greeted(**options: Any) -> Driver:
    driver = Driver(**options)
    driver.feed(b"EHLO client.test\r\n")
    driver.replies()
    return driver


def in_data(**options: Any) -> Driver:
    driver = greeted(**options)
    driver.feed(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert driver.codes()[-1] == "354 End"
    return driver


def only(events: list[ev.Event], kind: type[ev.Event]) -> list[ev.Event]:
    return [e for e in events if isinstance(e, kind)]


# --- Using the core -------------------------------------------------------------------------


def test_events_need_the_greeting_first() -> None:
    conn = ServerConnection()
    conn.receive_data(b"EHLO x\r\n")
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_each_request_must_be_answered_before_the_next() -> None:
    conn = ServerConnection()
    conn.send(replies.greeting("mx"))
    conn.receive_data(b"NOOP\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), ev.Noop)
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    conn.send(replies.ok())
    assert isinstance(conn.next_event(), ev.Noop)


def test_only_421_may_be_sent_unasked_and_it_closes() -> None:
    conn = ServerConnection()
    conn.send(replies.greeting("mx"))
    with pytest.raises(LocalProtocolError):
        conn.send(replies.ok())
    assert conn.send(replies.idle_timeout()).startswith(b"421 4.4.2 ")
    assert conn.closed
    assert isinstance(conn.next_event(), ev.ConnectionClosed)


def test_intermediate_reply_to_the_wrong_request_is_refused() -> None:
    conn = ServerConnection()
    conn.send(replies.greeting("mx"))
    conn.receive_data(b"NOOP\r\n")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(replies.start_data())


def test_config_limits_are_taken_over() -> None:
    conn = ServerConnection(Limits(smtp_line=600, message_size=1234, recipients=7, smtp_errors=4))
    assert conn.limits == SMTPLimits(command_line=600, message_size=1234, recipients=7, errors=4)
    assert "SIZE 1234" in conn.extensions()


# --- Greeting, EHLO and extensions ----------------------------------------------------------


def test_ehlo_lists_the_extensions() -> None:
    d = Driver(limits=SMTPLimits(message_size=5000), tls_available=True)
    d.feed(b"EHLO client.test\r\n")
    lines = d.output.decode().split("\r\n")
    assert lines[0] == "250-mx.test Hello client.test"
    keywords = [line[4:] for line in lines if line]
    for keyword in ("PIPELINING", "SIZE 5000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"):
        assert keyword in keywords
    assert "CHUNKING" in keywords and "STARTTLS" in keywords
    assert not any(k.startswith("AUTH") for k in keywords)


def test_auth_is_advertised_only_under_tls_when_required() -> None:
    plain = ServerConnection(auth_mechanisms=("PLAIN", "LOGIN"), tls_available=True)
    assert not any(k.startswith("AUTH") for k in plain.extensions())
    secure = ServerConnection(auth_mechanisms=("PLAIN", "LOGIN"), tls_active=True)
    assert "AUTH PLAIN LOGIN" in secure.extensions()
    assert "STARTTLS" not in secure.extensions()
    relaxed = ServerConnection(auth_mechanisms=("PLAIN",), auth_requires_tls=False)
    assert "AUTH PLAIN" in relaxed.extensions()


@pytest.mark.parametrize(
    "name", ["client.test", "[192.0.2.1]", "[IPv6:2001:db8::1]", "host_1.example", "localhost"]
)
def test_ehlo_names_accepted(name: str) -> None:
    d = Driver()
    (event,) = d.feed(f"EHLO {name}\r\n".encode())
    assert event == ev.Ehlo(name)


@pytest.mark.parametrize("argument", ["", " ", "bad..name", "-bad.test", "two words", "[1.2.3]"])
def test_ehlo_names_refused(argument: str) -> None:
    d = Driver()
    d.feed(f"EHLO {argument}\r\n".encode())
    assert d.codes() == ["501 5.5.4"]


def test_helo_client_may_not_use_parameters() -> None:
    d = Driver()
    d.feed(b"HELO client.test\r\nMAIL FROM:<a@example.test> SIZE=10\r\n")
    assert d.codes() == ["250 mx.test", "555 5.5.4"]
    assert d.conn.esmtp is False


def test_refused_session_only_accepts_quit() -> None:
    conn = ServerConnection()
    conn.send(replies.session_refused("mx"))
    conn.receive_data(b"EHLO x.test\r\nQUIT\r\n")
    event = conn.next_event()
    assert isinstance(event, ev.ProtocolError) and event.reply.code == 503
    conn.send(event.reply)
    assert isinstance(conn.next_event(), ev.Quit)


def test_421_greeting_closes() -> None:
    conn = ServerConnection()
    conn.send(replies.too_many_connections())
    assert conn.closed


# --- Command order (RFC 5321 §4.1.4) --------------------------------------------------------


def test_mail_needs_ehlo() -> None:
    d = Driver()
    events = d.feed(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert [type(e) for e in events] == [ev.ProtocolError] * 3
    assert d.codes() == ["503 5.5.1"] * 3


def test_sequence_errors() -> None:
    d = greeted()
    d.feed(b"RCPT TO:<b@example.test>\r\n")
    d.feed(b"DATA\r\n")
    d.feed(b"MAIL FROM:<a@example.test>\r\nMAIL FROM:<a@example.test>\r\n")
    d.feed(b"DATA\r\n")
    assert d.codes() == ["503 5.5.1", "503 5.5.1", "250 2.1.0", "503 5.5.1", "554 5.5.1"]
    assert not only(d.events, ev.Data)


def test_rset_and_ehlo_end_the_transaction() -> None:
    d = greeted()
    d.feed(b"MAIL FROM:<a@example.test>\r\nRSET\r\nRCPT TO:<b@example.test>\r\n")
    assert d.codes() == ["250 2.1.0", "250 2.0.0", "503 5.5.1"]
    d.feed(b"MAIL FROM:<a@example.test>\r\nEHLO again.test\r\nRCPT TO:<b@example.test>\r\n")
    assert d.codes()[-1] == "503 5.5.1"


def test_rejected_mail_opens_no_transaction() -> None:
    d = greeted(policy=lambda e: Reply(550, "5.7.1", "no") if isinstance(e, ev.Mail) else None)
    d.feed(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n")
    assert d.codes() == ["550 5.7.1", "503 5.5.1"]


def test_rejected_recipients_do_not_count_for_data() -> None:
    d = greeted(policy=lambda e: Reply(550, "5.1.1", "no") if isinstance(e, ev.Rcpt) else None)
    d.feed(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert d.codes() == ["250 2.1.0", "550 5.1.1", "554 5.5.1"]


def test_text_pipelined_behind_a_refused_data_is_discarded_and_closes() -> None:
    # RFC 2920 §3.1: the message may follow only the 354. Behind a refused DATA it is the
    # text of a client that did not wait; its lines must never run as commands.
    d = greeted(policy=lambda e: Reply(550, "5.1.1", "no") if isinstance(e, ev.Rcpt) else None)
    events = d.feed(
        b"MAIL FROM:<a@example.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n"
        b"RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    )
    assert d.codes() == ["250 2.1.0", "550 5.1.1", "421 4.5.0"]
    (unsynchronized,) = only(events, ev.Unsynchronized)
    assert unsynchronized.command == "DATA" and unsynchronized.discarded > 0
    assert [type(e) for e in events][-2:] == [ev.Unsynchronized, ev.ConnectionClosed]
    assert d.conn.closed and len(only(events, ev.Rcpt)) == 1


def test_data_without_mail_with_text_behind_it_closes() -> None:
    d = greeted()
    d.feed(b"DATA\r\nRCPT TO:<b@example.test>\r\n")
    assert d.codes() == ["421 4.5.0"] and d.conn.closed


def test_a_refused_data_alone_keeps_the_session() -> None:
    # A pipelining client that waits for the reply to DATA (RFC 2920 §3.1) goes on.
    d = greeted(policy=lambda e: Reply(550, "5.1.1", "no") if isinstance(e, ev.Rcpt) else None)
    d.feed(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert d.conn.refusing_data is False  # answered
    d.feed(b"RSET\r\nQUIT\r\n")
    assert d.codes() == ["250 2.1.0", "550 5.1.1", "554 5.5.1", "250 2.0.0", "221 2.0.0"]


def test_refusing_data_is_true_until_the_refusal_is_answered() -> None:
    d = greeted()
    d.conn.receive_data(b"MAIL FROM:<a@example.test>\r\n")
    d.conn.send(standard_reply(d.conn.next_event(), d.conn))
    d.conn.receive_data(b"DATA\r\n")
    event = d.conn.next_event()
    assert isinstance(event, ev.Refused) and d.conn.refusing_data
    d.conn.send(event.reply)
    assert not d.conn.refusing_data


def test_text_pipelined_behind_an_accepted_data_is_the_message() -> None:
    # Early text behind a DATA that gets its 354 is still read as the message (lenient).
    d = greeted()
    events = d.feed(
        b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhi\r\n.\r\n"
    )
    assert d.codes() == ["250 2.1.0", "250 2.1.5", "354 End", "250 2.0.0"]
    assert only(events, ev.MessageBody) and not d.conn.closed


def test_unknown_and_unimplemented_commands() -> None:
    d = greeted()
    d.feed(b"FOO bar\r\nEXPN list\r\nTURN\r\n")
    assert d.codes() == ["500 5.5.2", "502 5.5.1", "500 5.5.2"]


def test_simple_commands() -> None:
    d = greeted()
    events = d.feed(b"NOOP anything\r\nVRFY someone\r\nHELP mail\r\nrset\r\n")
    assert events == [ev.Noop(), ev.Vrfy("someone"), ev.Help("mail"), ev.Rset()]
    d.feed(b"RSET now\r\nVRFY\r\nQUIT now\r\n")
    assert d.codes()[-3:] == ["501 5.5.4", "501 5.5.4", "501 5.5.4"]


def test_quit_closes_and_later_input_is_ignored() -> None:
    d = greeted()
    events = d.feed(b"QUIT\r\nNOOP\r\n")
    assert events == [ev.Quit(), ev.ConnectionClosed()]
    assert d.codes() == ["221 2.0.0"]
    d.conn.receive_data(b"NOOP\r\n")
    assert isinstance(d.conn.next_event(), ev.ConnectionClosed)


def test_end_of_stream_mid_line_closes() -> None:
    d = greeted()
    assert d.feed(b"NOO") == []
    assert d.feed(b"") == [ev.ConnectionClosed()]


# --- PIPELINING (RFC 2920) ------------------------------------------------------------------


def test_pipelined_commands_are_answered_in_order_in_one_batch() -> None:
    d = Driver()
    events = d.feed(
        b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
        b"RCPT TO:<bad address>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n"
    )
    kinds = [type(e) for e in events]
    assert kinds == [ev.Ehlo, ev.Mail, ev.Rcpt, ev.ProtocolError, ev.Rcpt, ev.Data]
    assert d.codes()[1:] == ["250 2.1.0", "250 2.1.5", "501 5.1.3", "250 2.1.5", "354 End"]


def test_pipelined_commands_split_anywhere_give_the_same_events() -> None:
    script = b"EHLO c.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nNOOP\r\n"
    whole = Driver()
    whole.feed(script)
    for size in (1, 2, 3, 7):
        pieces = Driver()
        for i in range(0, len(script), size):
            pieces.feed(script[i : i + size])
        assert pieces.events == whole.events


# --- Paths (RFC 5321 §4.1.2, RFC 6531) ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "local", "domain"),
    [
        ("<user@example.test>", "user", "example.test"),
        ("<first.last+tag@sub.example.test>", "first.last+tag", "sub.example.test"),
        ("<!#$%&'*+-/=?^_`{|}~@example.test>", "!#$%&'*+-/=?^_`{|}~", "example.test"),
        ('<"john doe"@example.test>', "john doe", "example.test"),
        ('<"a\\"b\\\\c"@example.test>', 'a"b\\c', "example.test"),
        ('<"odd@>,:"@example.test>', "odd@>,:", "example.test"),
        ("<@relay.test:user@example.test>", "user", "example.test"),
        ("<@one.test,@two.test:user@example.test>", "user", "example.test"),
        ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user", "[IPv6:2001:db8::1]"),
        ("<user@EXAMPLE.Test>", "user", "EXAMPLE.Test"),
    ],
)
def test_valid_paths(path: str, local: str, domain: str) -> None:
    d = greeted()
    (mail,) = d.feed(f"MAIL FROM:{path}\r\n".encode())
    assert isinstance(mail, ev.Mail) and mail.address is not None
    assert (mail.address.local_part, mail.address.domain) == (local, domain)
    (rcpt,) = d.feed(f"RCPT TO:{path}\r\n".encode())
    assert isinstance(rcpt, ev.Rcpt) and rcpt.address == mail.address


def test_address_prints_back_as_a_valid_path() -> None:
    d = greeted()
    (mail,) = d.feed(b'MAIL FROM:<"john \\"j\\" doe"@example.test>\r\n')
    assert isinstance(mail, ev.Mail)
    assert str(mail.address) == '"john \\"j\\" doe"@example.test'
    again = greeted()
    (twin,) = again.feed(f"MAIL FROM:<{mail.address}>\r\n".encode())
    assert isinstance(twin, ev.Mail) and twin.address == mail.address


def test_null_reverse_path_and_space_after_colon() -> None:
    d = greeted()
    (mail,) = d.feed(b"MAIL FROM: <>\r\n")
    assert isinstance(mail, ev.Mail) and mail.address is None


def test_bare_postmaster_recipient() -> None:
    d = greeted()
    d.feed(b"MAIL FROM:<>\r\n")
    (rcpt,) = d.feed(b"RCPT TO:<Postmaster>\r\n")
    assert isinstance(rcpt, ev.Rcpt) and rcpt.address.is_postmaster
    assert str(rcpt.address) == "Postmaster"


@pytest.mark.parametrize(
    "path",
    [
        "user@example.test",  # no brackets
        "<user@example.test",
        "<>",  # null path is only a reverse-path
        "<user>",
        "<@example.test>",
        "<user@>",
        "<user@@example.test>",
        "<.user@example.test>",
        "<user.@example.test>",
        "<us..er@example.test>",
        "<us er@example.test>",
        '<"unterminated@example.test>',
        "<user@example..test>",
        "<user@-example.test>",
        "<user@example-.test>",
        "<user@example.test.>",
        "<user@[300.1.1.1]>",
        "<user@[1.2.3]>",
        "<user@[IPv6:2001:db8::g]>",
        "<user@[IPv6:fe80::1%eth0]>",
        "<user@[tag:whatever]>",
        "<@relay.test user@example.test>",
        "<@relay.test,relay2.test:user@example.test>",
        f"<user@{'a' * 64}.test>",
        f"<{'u' * 250}@example.test>",  # path over 256 octets
    ],
)
def test_invalid_recipient_paths(path: str) -> None:
    d = greeted()
    d.feed(b"MAIL FROM:<>\r\n")
    d.replies()
    d.feed(f"RCPT TO:{path}\r\n".encode())
    assert d.codes() == ["501 5.1.3"]


@pytest.mark.parametrize("argument", ["FROM <a@example.test>", "TO:<a@example.test>", "FROM:"])
def test_invalid_mail_syntax(argument: str) -> None:
    d = greeted()
    d.feed(f"MAIL {argument}\r\n".encode())
    assert d.codes() == ["501 5.1.7"]


def test_path_of_256_octets_is_accepted() -> None:
    local = "u" * (256 - len("<@example.test>"))
    d = greeted()
    (mail,) = d.feed(f"MAIL FROM:<{local}@example.test>\r\n".encode())
    assert isinstance(mail, ev.Mail)


def test_utf8_addresses_need_smtputf8() -> None:
    d = greeted()
    d.feed("MAIL FROM:<jösé@exämple.test>\r\n".encode())
    assert d.codes() == ["553 5.6.7"]
    (mail,) = d.feed("MAIL FROM:<jösé@exämple.test> SMTPUTF8\r\n".encode())
    assert isinstance(mail, ev.Mail) and mail.params.smtputf8
    assert mail.address is not None and mail.address.is_utf8
    (rcpt,) = d.feed("RCPT TO:<用户@例子.测试>\r\n".encode())
    assert isinstance(rcpt, ev.Rcpt) and rcpt.address.local_part == "用户"


def test_utf8_recipient_in_ascii_transaction_is_refused() -> None:
    d = greeted()
    d.feed("MAIL FROM:<a@example.test>\r\nRCPT TO:<ü@example.test>\r\n".encode())
    assert d.codes() == ["250 2.1.0", "553 5.6.7"]


def test_smtputf8_can_be_switched_off() -> None:
    d = greeted(smtputf8=False)
    d.feed(b"MAIL FROM:<a@example.test> SMTPUTF8\r\n")
    assert d.codes() == ["555 5.5.4"]


def test_invalid_utf8_and_controls_in_commands() -> None:
    d = greeted()
    d.feed(b"MAIL FROM:<\xff@example.test>\r\nNOOP \x00\r\nNOOP \x1b[1m\r\n")
    assert d.codes() == ["500 5.5.2", "500 5.5.2", "500 5.5.2"]


# --- ESMTP parameters -----------------------------------------------------------------------


def test_mail_parameters_are_decoded() -> None:
    d = greeted(auth_mechanisms=("PLAIN",), tls_active=True)
    (mail,) = d.feed(
        b"MAIL FROM:<a@example.test> size=1000 BODY=8bitmime AUTH=a+2Bb@example.test\r\n"
    )
    assert isinstance(mail, ev.Mail)
    assert mail.params.size == 1000
    assert mail.params.body == "8BITMIME"
    assert mail.params.auth == "a+b@example.test"


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ("SIZE=abc", "501 5.5.4"),
        ("SIZE", "501 5.5.4"),
        (f"SIZE={'9' * 21}", "501 5.5.4"),
        ("BODY=BINARYMIME", "501 5.5.4"),
        ("SIZE=1 SIZE=2", "501 5.5.4"),
        ("X-UNKNOWN=1", "555 5.5.4"),
        ("AUTH=<>", "555 5.5.4"),  # AUTH not offered
        ("RET=FULL", "555 5.5.4"),  # DSN not offered
        ("=value", "501 5.5.4"),
        ("SIZE=1\tBODY=7BIT", "500 5.5.2"),
    ],
)
def test_bad_mail_parameters(params: str, code: str) -> None:
    d = greeted()
    d.feed(f"MAIL FROM:<a@example.test> {params}\r\n".encode())
    assert d.codes() == [code]
    assert not d.conn.in_transaction


def test_size_over_the_limit_is_refused_at_mail() -> None:
    d = greeted(limits=SMTPLimits(message_size=1000))
    events = d.feed(
        b"MAIL FROM:<a@example.test> SIZE=1001\r\nMAIL FROM:<a@example.test> SIZE=1000\r\n"
    )
    assert [type(e) for e in events] == [ev.Refused, ev.Mail]
    assert d.codes() == ["552 5.3.4", "250 2.1.0"]


def test_dsn_parameters_when_offered() -> None:
    d = greeted(dsn=True)
    assert "DSN" in d.conn.extensions()
    (mail,) = d.feed(b"MAIL FROM:<a@example.test> RET=hdrs ENVID=QQ+2B1\r\n")
    assert isinstance(mail, ev.Mail)
    assert (mail.params.ret, mail.params.envid) == ("HDRS", "QQ+1")
    (rcpt,) = d.feed(
        b"RCPT TO:<b@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40example.test\r\n"
    )
    assert isinstance(rcpt, ev.Rcpt)
    assert rcpt.params.notify == frozenset({"SUCCESS", "DELAY"})
    assert rcpt.params.orcpt == "rfc822;b@example.test"
    d.replies()
    d.feed(
        b"RCPT TO:<c@example.test> NOTIFY=NEVER,SUCCESS\r\n"
        b"RCPT TO:<c@example.test> ORCPT=rfc822\r\n"
        b"RCPT TO:<c@example.test> ORCPT=rfc822;bad+zz\r\n"
    )
    assert d.codes() == ["501 5.5.4"] * 3


def test_rcpt_parameters_are_refused_without_dsn() -> None:
    d = greeted()
    d.feed(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test> NOTIFY=NEVER\r\n")
    assert d.codes() == ["250 2.1.0", "555 5.5.4"]


# --- Limits ---------------------------------------------------------------------------------


def test_recipient_limit_gives_452() -> None:
    d = greeted(limits=SMTPLimits(recipients=3))
    d.feed(b"MAIL FROM:<a@example.test>\r\n")
    for i in range(5):
        d.feed(f"RCPT TO:<r{i}@example.test>\r\n".encode())
    assert d.codes()[1:] == ["250 2.1.5"] * 3 + ["452 4.5.3"] * 2
    assert d.conn.recipient_count == 3
    assert only(d.events, ev.Refused) and not only(d.events, ev.ProtocolError)
    d.feed(b"DATA\r\n")
    assert d.codes() == ["354 End"]


def test_error_limit_closes_with_421() -> None:
    d = Driver(limits=SMTPLimits(errors=3))
    events = d.feed(b"BAD\r\nWORSE\r\nWORST\r\nNOOP\r\n")
    assert d.codes() == ["500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert isinstance(events[-1], ev.ConnectionClosed)
    assert d.conn.closed


def test_policy_refusals_do_not_count_as_errors() -> None:
    d = greeted(limits=SMTPLimits(errors=2, recipients=1))
    d.feed(b"MAIL FROM:<a@example.test>\r\n" + b"RCPT TO:<b@example.test>\r\n" * 5)
    assert not d.conn.closed
    assert d.conn.errors == 0


@pytest.mark.parametrize("limit", [512, 1000, 4096])
def test_command_line_limit_counts_crlf(limit: int) -> None:
    d = greeted(limits=SMTPLimits(command_line=limit))
    fits = b"NOOP " + b"x" * (limit - 7) + b"\r\n"
    assert len(fits) == limit
    d.feed(fits + b"NOOP " + b"x" * (limit - 6) + b"\r\nNOOP\r\n")
    assert d.codes() == ["250 2.0.0", "500 5.5.2", "250 2.0.0"]


def test_endless_line_does_not_grow_the_buffer() -> None:
    d = greeted(limits=SMTPLimits(command_line=1000))
    chunk = b"A" * 65536
    largest = 0
    for _ in range(300):  # ~20 MB without a line end
        assert d.feed(chunk) == []
        largest = max(largest, d.conn.buffered)
    assert largest <= 1000 + len(chunk)
    d.feed(b"\r\nNOOP\r\n")
    assert d.codes() == ["500 5.5.2", "250 2.0.0"]


def test_overlong_line_in_small_pieces_is_still_bounded() -> None:
    d = greeted(limits=SMTPLimits(command_line=512))
    for _ in range(5000):
        d.feed(b"B" * 7)
        assert d.conn.buffered <= 512 + 7
    d.feed(b"\r\n")
    assert d.codes() == ["500 5.5.2"]


@pytest.mark.parametrize("line", [b"NOOP\n", b"NOOP\rQUIT\r\n", b"NO\rOP\r\n", b"NOOP\r\r\n"])
def test_bare_cr_or_lf_in_a_command_is_refused(line: bytes) -> None:
    d = greeted()
    events = d.feed(line)
    assert [type(e) for e in events] == [ev.ProtocolError]
    assert d.codes() == ["500 5.5.2"]


# --- DATA (RFC 5321 §4.1.1.4, §4.5.2) -------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"Subject: x\r\n\r\nbody\r\n.\r\n", b"Subject: x\r\n\r\nbody\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b"..leading\r\n.\r\n", b".leading\r\n"),
        (b"a\r\n..\r\n..b\r\n.\r\n", b"a\r\n.\r\n.b\r\n"),
        (b".single\r\n.\r\n", b"single\r\n"),  # §4.5.2: any leading dot is removed
        (b"mid.dle\r\n.\r\n", b"mid.dle\r\n"),
        (b"8bit \xc3\xa9 \xff\r\n.\r\n", b"8bit \xc3\xa9 \xff\r\n"),
        (b"nul \x00 byte\r\n.\r\n", b"nul \x00 byte\r\n"),
    ],
)
def test_data_is_unstuffed(wire: bytes, message: bytes) -> None:
    for size in (1, 3, len(wire)):
        d = in_data()
        events = []
        for i in range(0, len(wire), size):
            events += d.feed(wire[i : i + size])
        assert events == [ev.MessageBody(message)]
        assert d.codes() == ["250 2.0.0"]
        assert d.conn.mode is Mode.COMMAND


def test_commands_pipelined_after_the_message_are_read() -> None:
    d = in_data()
    events = d.feed(b"body\r\n.\r\nMAIL FROM:<a@example.test>\r\nQUIT\r\n")
    assert [type(e) for e in events] == [ev.MessageBody, ev.Mail, ev.Quit, ev.ConnectionClosed]


def test_message_size_is_counted_as_it_streams() -> None:
    d = in_data(limits=SMTPLimits(message_size=10_000))
    line = b"x" * 998 + b"\r\n"
    for _ in range(2000):  # 2 MB against a 10 kB limit
        assert d.feed(line * 2) == []
        assert d.conn.buffered < 4096
        assert d.conn.message_bytes <= 10_000
    events = d.feed(b".\r\n")
    assert events == [ev.MessageRejected(replies.message_too_big(10_000))]
    assert d.codes() == ["552 5.3.4"]
    # The session goes on.
    d.feed(b"MAIL FROM:<a@example.test>\r\n")
    assert d.codes() == ["250 2.1.0"]


def test_message_at_exactly_the_limit_is_accepted() -> None:
    d = in_data(limits=SMTPLimits(message_size=1000))
    body = (b"y" * 98 + b"\r\n") * 10
    (event,) = d.feed(body + b".\r\n")
    assert event == ev.MessageBody(body)


def test_data_line_limit() -> None:
    d = in_data(limits=SMTPLimits(data_line=1000))
    d.feed(b"ok\r\n" + b"z" * 998 + b"\r\n.\r\n")
    assert d.codes() == ["250 2.0.0"]
    d = in_data(limits=SMTPLimits(data_line=1000))
    d.feed(b"ok\r\n" + b"z" * 999 + b"\r\n.\r\n")
    assert d.codes() == ["554 5.6.0"]


def test_endless_data_line_is_discarded_and_bounded() -> None:
    d = in_data(limits=SMTPLimits(data_line=4096))
    for _ in range(200):
        assert d.feed(b"Q" * 65536) == []
        assert d.conn.buffered <= 4096 + 65536
    events = d.feed(b"\r\n.\r\nNOOP\r\n")
    assert [type(e) for e in events] == [ev.MessageRejected, ev.Noop]
    assert d.codes() == ["554 5.6.0", "250 2.0.0"]


def test_end_of_stream_during_data_closes_without_a_message() -> None:
    d = in_data()
    d.feed(b"half a message\r\n")
    assert d.feed(b"") == [ev.ConnectionClosed()]


# --- SMTP smuggling -------------------------------------------------------------------------

SMUGGLE = b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nevil\r\n"

FAKE_ENDS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n\n.\n\n",
    b"\r\r.\r\r",
    b"\r\n\n.\r\n",  # <CR><LF><LF>.<CR><LF>
    b"\r\n\r.\r\n",
    b"\r\n.\r\x00\n",
]


@pytest.mark.parametrize("fake", FAKE_ENDS, ids=[repr(f) for f in FAKE_ENDS])
@pytest.mark.parametrize("piece", [1, 2, 5, 10_000])
def test_smuggled_end_of_data_never_ends_data(fake: bytes, piece: int) -> None:
    d = in_data()
    stream = b"Subject: hello\r\n\r\nbody" + fake + SMUGGLE + b"\r\n.\r\nNOOP\r\n"
    for i in range(0, len(stream), piece):
        d.feed(stream[i : i + piece])
    ends = [e for e in d.events if isinstance(e, ev.MessageBody | ev.MessageRejected)]
    assert ends == [ev.MessageRejected(replies.bare_newline_in_data())]
    assert not [e for e in d.events if isinstance(e, ev.Mail)][1:]  # only the real MAIL
    assert d.codes()[-2:] == ["550 5.5.2", "250 2.0.0"]


@pytest.mark.parametrize("fake", [b"\r\n.\x00\r\n", b"\r\n. \r\n", b"\r\n.\t\r\n"])
def test_lookalike_end_without_bare_newline_is_message_text(fake: bytes) -> None:
    d = in_data()
    events = d.feed(b"body" + fake + SMUGGLE + b"\r\n.\r\n")
    assert events == [ev.MessageBody(b"body" + fake.replace(b"\n.", b"\n") + SMUGGLE + b"\r\n")]


def model_of_data(stream: bytes) -> tuple[bytes | None, bool, bytes] | None:
    """Independent, line-by-line reading of RFC 5321 §4.1.1.4 and §4.5.2.

    Returns (unstuffed message or None if refused, refused, bytes after the end), or None
    while the data has not ended.
    """
    framed = b"\r\n" + stream
    end = framed.find(b"\r\n.\r\n")
    if end < 0:
        return None
    text = framed[2 : end + 2]
    rest = framed[end + 5 :]
    lines = text.split(b"\r\n")[:-1] if text else []
    if any(b"\r" in line or b"\n" in line for line in lines):
        return None, True, rest
    unstuffed = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return unstuffed, False, rest


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.\r\n"]), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=60),
)
def test_data_framing_matches_the_rfc_model(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts)
    expected = model_of_data(stream)
    d = in_data()
    position = 0
    event: ev.Event = ev.NEED_DATA
    for size in [*cuts, len(stream)]:
        piece = stream[position : position + size]
        if not piece:
            continue
        d.conn.receive_data(piece)
        position += len(piece)
        event = d.conn.next_event()
        if not isinstance(event, ev.NeedData):
            break
    if expected is None:
        assert isinstance(event, ev.NeedData)
        return
    message, refused, rest = expected
    if refused:
        assert event == ev.MessageRejected(replies.bare_newline_in_data())
    else:
        assert event == ev.MessageBody(message or b"")
    # What follows the end is left for the command reader, untouched.
    assert d.conn.buffered + len(stream) - position == len(rest)


# --- BDAT / CHUNKING (RFC 3030) -------------------------------------------------------------


def in_transaction(**options: Any) -> Driver:
    d = greeted(**options)
    d.feed(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n")
    d.replies()
    return d


def test_bdat_chunks_are_joined_verbatim() -> None:
    d = in_transaction()
    events = d.feed(b"BDAT 7\r\nline\r\n.BDAT 9 LAST\r\n\r\n.\r\nbin\x00NOOP\r\n")
    assert events == [ev.Bdat(7), ev.MessageBody(b"line\r\n.\r\n.\r\nbin\x00"), ev.Noop()]
    assert d.codes() == ["250 2.0.0", "250 2.0.0", "250 2.0.0"]
    assert not d.conn.in_transaction


def test_bdat_split_across_reads() -> None:
    d = in_transaction()
    stream = b"BDAT 6\r\nhello BDAT 5 LAST\r\nworld"
    events = []
    for byte in stream:
        events += d.feed(bytes([byte]))
    assert events == [ev.Bdat(6), ev.MessageBody(b"hello world")]


def test_bdat_zero_last() -> None:
    d = in_transaction()
    events = d.feed(b"BDAT 3\r\nabcBDAT 0 LAST\r\n")
    assert events == [ev.Bdat(3), ev.MessageBody(b"abc")]


def test_bdat_octets_are_consumed_even_when_refused() -> None:
    d = greeted()
    events = d.feed(b"BDAT 12\r\nRSET\r\nQUIT\r\nNOOP\r\n")
    assert [type(e) for e in events] == [ev.ProtocolError, ev.Noop]
    assert d.codes() == ["503 5.5.1", "250 2.0.0"]


def test_bdat_over_the_size_limit() -> None:
    d = in_transaction(limits=SMTPLimits(message_size=100))
    events = d.feed(b"BDAT 60\r\n" + b"a" * 60 + b"BDAT 60\r\n" + b"b" * 60)
    events += d.feed(b"BDAT 10 LAST\r\n" + b"c" * 10 + b"MAIL FROM:<a@example.test>\r\n")
    assert [type(e) for e in events] == [ev.Bdat, ev.MessageRejected, ev.Refused, ev.Mail]
    assert d.codes() == ["250 2.0.0", "552 5.3.4", "503 5.5.1", "250 2.1.0"]
    assert d.conn.errors == 0


def test_refused_bdat_fails_the_transaction() -> None:
    def policy(event: ev.Event) -> Reply | None:
        return Reply(452, "4.3.1", "full") if isinstance(event, ev.Bdat) else None

    d = in_transaction(policy=policy)
    d.feed(b"BDAT 2\r\nabBDAT 2 LAST\r\ncdRSET\r\n")
    assert d.codes() == ["452 4.3.1", "503 5.5.1", "250 2.0.0"]
    assert not only(d.events, ev.MessageBody)


def test_data_and_rcpt_cannot_follow_bdat() -> None:
    d = in_transaction()
    d.feed(b"BDAT 1\r\nxDATA\r\n")
    d.feed(b"RCPT TO:<c@example.test>\r\n")
    assert d.codes() == ["250 2.0.0", "503 5.5.1", "503 5.5.1"]


def test_bdat_needs_recipients_and_valid_syntax() -> None:
    d = greeted()
    d.feed(b"MAIL FROM:<a@example.test>\r\nBDAT 1 LAST\r\nx")
    d.feed(b"BDAT\r\nBDAT -1\r\nBDAT 1 FIRST\r\n")
    assert d.codes() == ["250 2.1.0", "554 5.5.1", "501 5.5.4", "501 5.5.4", "501 5.5.4"]


def test_bdat_when_chunking_is_off() -> None:
    d = greeted(chunking=False)
    assert "CHUNKING" not in d.conn.extensions()
    d.feed(b"BDAT 1 LAST\r\n")
    assert d.codes() == ["502 5.5.1"]


# --- STARTTLS (RFC 3207) --------------------------------------------------------------------


def test_starttls_discards_pipelined_commands() -> None:
    d = greeted(tls_available=True)
    events = d.feed(b"STARTTLS\r\nRSET\r\nMAIL FROM:<a@example.test>\r\n")
    assert events == [ev.StartTLS(discarded=len(b"RSET\r\nMAIL FROM:<a@example.test>\r\n"))]
    assert d.codes() == ["220 2.0.0"]
    assert d.conn.mode is Mode.TLS
    # Bytes during the handshake belong to TLS, never to SMTP.
    assert d.feed(b"NOOP\r\n") == []
    assert d.conn.buffered == 0


def test_tls_restart_forgets_the_session() -> None:
    d = greeted(tls_available=True)
    d.feed(b"STARTTLS\r\n")
    d.conn.tls_started()
    d.replies()
    d.feed(b"MAIL FROM:<a@example.test>\r\nEHLO c.test\r\nSTARTTLS\r\n")
    lines = d.output.decode().split("\r\n")
    assert lines[0] == "503 5.5.1 Send EHLO or HELO first"
    assert "STARTTLS" not in "\n".join(lines[1:-2])
    assert lines[-2] == "503 5.5.1 TLS already active"


def test_starttls_refusals() -> None:
    d = Driver(tls_available=True)
    d.feed(b"STARTTLS\r\n")  # before EHLO
    assert d.codes() == ["503 5.5.1"]
    d.feed(b"EHLO c.test\r\n")
    d.replies()
    d.feed(b"STARTTLS now\r\n")
    assert d.codes() == ["501 5.5.4"]
    plain = greeted()
    plain.feed(b"STARTTLS\r\n")
    assert plain.codes() == ["502 5.5.1"]


def test_starttls_answered_454_stays_in_plaintext() -> None:
    def policy(event: ev.Event) -> Reply | None:
        return replies.tls_not_available() if isinstance(event, ev.StartTLS) else None

    d = greeted(policy=policy, tls_available=True)
    d.feed(b"STARTTLS\r\nNOOP\r\n")
    assert d.codes() == ["454 4.7.0"]
    d.feed(b"NOOP\r\n")
    assert d.codes() == ["250 2.0.0"]


def test_tls_started_without_starttls_is_a_caller_error() -> None:
    with pytest.raises(LocalProtocolError):
        greeted().conn.tls_started()


# --- AUTH (RFC 4954) ------------------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_auth_before_tls_is_refused_with_538() -> None:
    d = greeted(auth_mechanisms=("PLAIN",), tls_available=True)
    d.feed(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
    assert d.codes() == ["538 5.7.11"]
    assert not only(d.events, ev.Auth)


def test_auth_not_offered() -> None:
    d = greeted(tls_active=True)
    d.feed(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
    assert d.codes() == ["502 5.5.1"]


def test_auth_with_initial_response() -> None:
    d = greeted(auth_mechanisms=("PLAIN", "LOGIN"), tls_active=True)
    (auth,) = d.feed(b"AUTH plain " + b64(b"\0alice\0secret") + b"\r\n")
    assert auth == ev.Auth("PLAIN", b"\0alice\0secret")
    assert "secret" not in repr(auth)
    assert d.conn.authenticated
    d.feed(b"AUTH PLAIN =\r\n")
    assert d.codes() == ["235 2.7.0", "503 5.5.1"]


def test_auth_empty_initial_response() -> None:
    d = greeted(auth_mechanisms=("PLAIN",), tls_active=True)
    assert d.feed(b"AUTH PLAIN =\r\n") == [ev.Auth("PLAIN", b"")]


def test_auth_exchange_with_challenges() -> None:
    challenges = iter([replies.auth_challenge(b"Username:"), replies.auth_challenge(b"Password:")])

    def policy(event: ev.Event) -> Reply | None:
        if isinstance(event, ev.Auth) or (
            isinstance(event, ev.AuthResponse) and event.response == b"alice"
        ):
            return next(challenges)
        return None

    d = greeted(policy=policy, auth_mechanisms=("LOGIN",), tls_active=True)
    events = d.feed(b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"pw") + b"\r\n")
    assert events == [ev.Auth("LOGIN", None), ev.AuthResponse(b"alice"), ev.AuthResponse(b"pw")]
    assert d.output.decode().split("\r\n")[:3] == [
        "334 VXNlcm5hbWU6",
        "334 UGFzc3dvcmQ6",
        "235 2.7.0 Authentication successful",
    ]


def test_auth_cancel_and_bad_base64() -> None:
    d = greeted(auth_mechanisms=("PLAIN",), tls_active=True)
    events = d.feed(b"AUTH PLAIN\r\n*\r\nAUTH PLAIN\r\nnot base64!\r\nAUTH PLAIN AB=C\r\nNOOP\r\n")
    kinds = [type(e) for e in events]
    assert kinds == [ev.Auth, ev.Refused, ev.Auth, ev.ProtocolError, ev.ProtocolError, ev.Noop]
    assert d.codes() == ["334 ", "501 5.7.0", "334 ", "501 5.5.2", "501 5.5.2", "250 2.0.0"]
    assert not d.conn.authenticated


def test_auth_refusals() -> None:
    d = greeted(auth_mechanisms=("PLAIN",), tls_active=True)
    d.feed(b"AUTH CRAM-MD5\r\nAUTH\r\nAUTH PLAIN a b\r\n")
    d.feed(b"MAIL FROM:<a@example.test>\r\nAUTH PLAIN =\r\n")
    assert d.codes() == ["504 5.5.4", "501 5.5.4", "501 5.5.4", "250 2.1.0", "503 5.5.1"]
    helo = Driver(auth_mechanisms=("PLAIN",), tls_active=True)
    helo.feed(b"HELO c.test\r\nAUTH PLAIN =\r\n")
    assert helo.codes()[-1] == "503 5.5.1"


def test_auth_lines_may_be_longer_than_commands() -> None:
    d = greeted(limits=SMTPLimits(command_line=512), auth_mechanisms=("PLAIN",), tls_active=True)
    password = b"p" * 6000
    (auth,) = d.feed(b"AUTH PLAIN " + b64(b"\0alice\0" + password) + b"\r\n")
    assert isinstance(auth, ev.Auth) and auth.initial_response == b"\0alice\0" + password


def test_auth_continuation_line_limit() -> None:
    d = greeted(auth_mechanisms=("PLAIN",), tls_active=True)
    d.feed(b"AUTH PLAIN\r\n" + b"A" * MAX_AUTH_LINE + b"\r\nNOOP\r\n")
    assert d.codes() == ["334 ", "500 5.5.6", "250 2.0.0"]


# --- Replies --------------------------------------------------------------------------------


def test_reply_formatting() -> None:
    assert Reply(250, "2.0.0", "OK").to_bytes() == b"250 2.0.0 OK\r\n"
    multi = Reply(550, "5.7.1", ("first", "second"))
    assert multi.to_bytes() == b"550-5.7.1 first\r\n550 5.7.1 second\r\n"
    assert Reply(354, None, "go").to_bytes() == b"354 go\r\n"


def test_reply_text_cannot_inject_lines() -> None:
    wire = Reply(550, "5.1.1", "<x@y>\r\n250 2.0.0 OK").to_bytes()
    assert wire.count(b"\r\n") == 1 and wire.startswith(b"550 5.1.1 <x@y>??250")
    assert Reply(250, "2.0.0", "caf\u00e9").to_bytes() == b"250 2.0.0 caf?\r\n"


def test_reply_lines_are_cut_to_512_octets() -> None:
    wire = Reply(550, "5.1.1", "x" * 2000).to_bytes()
    assert len(wire) == 512 and wire.endswith(b"\r\n")


@pytest.mark.parametrize(
    ("code", "status"), [(250, "5.0.0"), (700, None), (250, "2.0"), (421, "4.x.0")]
)
def test_malformed_replies_are_programming_errors(code: int, status: str | None) -> None:
    with pytest.raises(ValueError):
        Reply(code, status, "x")


def test_every_final_standard_reply_has_an_enhanced_code() -> None:
    # RFC 2034 exempts the greeting, the EHLO response and the intermediate 3xx replies.
    exempt = {"greeting", "ehlo", "helo", "start_data", "auth_challenge"}
    arguments = {"hostname": "mx", "limit": 1, "size": 1, "command": "DATA"}
    factories = [
        (name, function)
        for name, function in inspect.getmembers(replies, inspect.isfunction)
        if function.__module__ == replies.__name__ and name not in exempt
    ]
    assert len(factories) > 40
    for name, factory in factories:
        required = [
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.default is inspect.Parameter.empty
        ]
        reply = factory(**{p: arguments[p] for p in required})
        assert isinstance(reply, Reply) and reply.status is not None, name


# --- Fuzzing: any bytes, any split, never an exception ----------------------------------------

FRAGMENTS = [
    b"EHLO c.test\r\n",
    b"HELO c.test\r\n",
    b"MAIL FROM:<a@example.test>\r\n",
    b"MAIL FROM:<> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n",
    b"RCPT TO:<b@example.test>\r\n",
    b"RCPT TO:<Postmaster>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN AGFsaWNl\r\n",
    b"STARTTLS\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"AAAA",
    b"*\r\n",
    b"\xff\x00",
]


def fuzz_policy(event: ev.Event) -> Reply | None:
    if isinstance(event, ev.AuthResponse):
        return replies.auth_challenge(b"more") if len(event.response) % 2 else None
    return None


def run_fuzz(stream: bytes, cuts: list[int], limits: SMTPLimits) -> None:
    d = Driver(
        fuzz_policy,
        limits=limits,
        tls_available=True,
        auth_mechanisms=("PLAIN", "LOGIN"),
        auth_requires_tls=False,
    )
    position = 0
    bound = max(limits.command_line, limits.auth_line, limits.data_line)
    for size in [*cuts, len(stream)]:
        piece = stream[position : position + size]
        position += len(piece)
        if piece:
            d.feed(piece)
        # Drained, the core holds at most one unfinished line, whatever came in.
        assert d.conn.buffered <= bound
        assert d.conn.message_bytes <= limits.message_size
        if d.conn.mode is Mode.TLS:
            d.conn.tls_started()
    d.feed(b"")
    assert d.conn.closed


SMALL = SMTPLimits(
    command_line=64, auth_line=128, data_line=64, message_size=200, recipients=2, errors=30
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=1, max_value=97), max_size=20),
)
def test_random_bytes_never_raise(stream: bytes, cuts: list[int]) -> None:
    run_fuzz(stream, cuts, SMALL)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=12), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=31), max_size=30),
)
def test_random_command_soup_never_raises(parts: list[bytes], cuts: list[int]) -> None:
    run_fuzz(b"".join(parts), cuts, SMALL)
