"""The POP3 core alone: bytes in, events and bytes out, no sockets (RFC 1939, 2449, 2595, 5034)."""

from __future__ import annotations

import base64
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postvern.pop3.protocol import (
    MAX_AUTH_FAILURES,
    MAX_BAD_COMMANDS,
    MAX_LINE,
    NEED_DATA,
    Answered,
    Authenticate,
    Closed,
    MaildropEntry,
    POP3Connection,
    ProtocolMisuse,
    ResponseCode,
    Retrieve,
    StartTLS,
    State,
    Update,
    dot_stuff,
    to_crlf,
    top_of,
)

MESSAGES = {
    11: b"Subject: one\r\nFrom: a@example.test\r\n\r\nfirst body\r\n",
    12: b"Subject: two\n\n.starts with a dot\nline 2\n..two dots\nlast line without newline",
    15: b"Subject: three\r\n\r\nl1\r\nl2\r\nl3\r\n",
}
MAILDROP = [MaildropEntry(uid, len(raw), f"UID{uid}") for uid, raw in MESSAGES.items()]


def plain(authzid: str, authcid: str, password: str) -> bytes:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())


def events(conn: POP3Connection, data: bytes = b"") -> list[object]:
    """Feed ``data`` and collect events up to NEED_DATA or an event awaiting an answer."""
    if data:
        conn.receive_data(data)
    out: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if not isinstance(event, Answered):
            return out


def lines(conn: POP3Connection) -> list[str]:
    return conn.data_to_send().decode().split("\r\n")[:-1]


def secure() -> POP3Connection:
    conn = POP3Connection(tls_active=True, tls_available=False)
    conn.data_to_send()
    return conn


def logged_in() -> POP3Connection:
    conn = secure()
    [event] = events(conn, b"USER alice@example.test\r\nPASS pw\r\n")[-1:]
    assert isinstance(event, Authenticate)
    conn.accept_login(MAILDROP)
    conn.data_to_send()
    return conn


def unstuff(response: bytes) -> bytes:
    """What a client makes of a multi-line response (RFC 1939 §3), status line dropped."""
    body = response.split(b"\r\n", 1)[1]
    assert body.endswith(b"\r\n.\r\n") or body == b".\r\n"
    out = []
    for line in body[: -len(b".\r\n")].split(b"\r\n")[:-1]:
        assert line != b".", "a lone dot inside the body would end it early"
        out.append(line[1:] if line.startswith(b".") else line)
    return b"".join(line + b"\r\n" for line in out)


# -- greeting, CAPA, TLS gating ---------------------------------------------------------------


def test_greeting_has_no_apop_timestamp_and_apop_is_refused() -> None:
    conn = POP3Connection(tls_active=True, tls_available=False)
    greeting = conn.data_to_send()
    assert greeting.startswith(b"+OK") and greeting.endswith(b"\r\n") and b"<" not in greeting
    events(conn, b"APOP alice 0123456789abcdef0123456789abcdef\r\n")
    assert lines(conn) == ["-ERR APOP is not supported."]


def capabilities(conn: POP3Connection) -> list[str]:
    events(conn, b"CAPA\r\n")
    out = lines(conn)
    assert out[0].startswith("+OK") and out[-1] == "."
    return out[1:-1]


def test_capa_before_tls_hides_credentials_and_offers_stls() -> None:
    conn = POP3Connection(tls_active=False, tls_available=True)
    conn.data_to_send()
    capa = capabilities(conn)
    assert {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS"} <= set(capa)
    assert "USER" not in capa and not any(c.startswith("SASL") for c in capa)


def test_capa_after_tls_offers_user_and_sasl_plain_in_both_states() -> None:
    conn = secure()
    capa = capabilities(conn)
    assert "USER" in capa and "SASL PLAIN" in capa and "STLS" not in capa
    conn = logged_in()
    # RFC 2449 §5: what AUTHORIZATION announced is announced in TRANSACTION too.
    assert capabilities(conn) == capa


def test_implementation_is_optional() -> None:
    conn = POP3Connection(tls_active=True, tls_available=False, implementation="Postvern")
    conn.data_to_send()
    assert "IMPLEMENTATION Postvern" in capabilities(conn)
    assert not any(c.startswith("IMPLEMENTATION") for c in capabilities(secure()))


@pytest.mark.parametrize(
    "command",
    [b"USER alice@example.test", b"PASS secret", b"AUTH PLAIN " + plain("", "a", "b")],
)
def test_credentials_refused_before_tls(command: bytes) -> None:
    conn = POP3Connection(tls_active=False, tls_available=True)
    conn.data_to_send()
    got = events(conn, command + b"\r\n")
    assert all(isinstance(e, Answered) for e in got)
    [reply] = lines(conn)
    assert reply.startswith("-ERR [AUTH] ")


def test_stls_discards_everything_pipelined_after_it() -> None:
    conn = POP3Connection(tls_active=False, tls_available=True)
    conn.data_to_send()
    got = events(conn, b"CAPA\r\nSTLS\r\nUSER mallory\r\nPASS injected\r\n")
    assert isinstance(got[-1], StartTLS)
    assert lines(conn)[-1] == "+OK Begin TLS negotiation now."
    # Still plaintext until the handshake completes: more injected bytes are dropped too.
    conn.receive_data(b"PASS injected-later\r\n")
    with pytest.raises(ProtocolMisuse):
        conn.next_event()
    conn.tls_started()
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""
    # And the USER given before STLS was forgotten.
    events(conn, b"PASS x\r\n")
    assert lines(conn) == ["-ERR No username given."]


def test_stls_refused_when_tls_is_active_or_unavailable() -> None:
    conn = secure()
    events(conn, b"STLS\r\n")
    assert lines(conn)[0].startswith("-ERR")
    conn = POP3Connection(tls_active=False, tls_available=False)
    conn.data_to_send()
    events(conn, b"STLS\r\n")
    assert lines(conn)[0].startswith("-ERR")
    assert "STLS" not in capabilities(conn)


# -- authentication --------------------------------------------------------------------------


def test_user_pass_yields_authenticate_without_showing_the_password() -> None:
    conn = secure()
    got = events(conn, b"user alice@example.test\r\npass two words  \r\n")
    event = got[-1]
    assert event == Authenticate("USER", "alice@example.test", "two words  ")
    assert "two words" not in repr(event)
    assert lines(conn) == ["+OK"]
    conn.accept_login(MAILDROP)
    assert lines(conn) == ["+OK Logged in."]
    assert conn.state is State.TRANSACTION


def test_auth_plain_with_initial_response() -> None:
    conn = secure()
    [event] = events(conn, b"AUTH PLAIN " + plain("", "bob@example.test", "pw") + b"\r\n")
    assert event == Authenticate("PLAIN", "bob@example.test", "pw")


def test_auth_plain_with_continuation_and_matching_authzid() -> None:
    conn = secure()
    events(conn, b"AUTH PLAIN\r\n")
    assert lines(conn) == ["+ "]
    [event] = events(conn, plain("bob@example.test", "bob@example.test", "pw") + b"\r\n")
    assert event == Authenticate("PLAIN", "bob@example.test", "pw")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (b"*", "-ERR Authentication cancelled."),
        (b"not base64!", "-ERR Invalid base64 data."),
        (b"=", "-ERR [AUTH] Malformed PLAIN credentials."),
        (base64.b64encode(b"only\0two"), "-ERR [AUTH] Malformed PLAIN credentials."),
        (base64.b64encode(b"\0user\0"), "-ERR [AUTH] Malformed PLAIN credentials."),
        (base64.b64encode(b"\0\xff\xfe\0pw"), "-ERR [AUTH] Malformed PLAIN credentials."),
        (plain("admin", "bob", "pw"), "-ERR [AUTH] Authorization identity not permitted."),
    ],
)
def test_auth_plain_refusals(response: bytes, expected: str) -> None:
    conn = secure()
    events(conn, b"AUTH PLAIN\r\n")
    conn.data_to_send()
    got = events(conn, response + b"\r\n")
    assert all(isinstance(e, Answered) for e in got)
    assert lines(conn) == [expected]
    assert conn.state is State.AUTHORIZATION


def test_auth_other_mechanism_and_mechanism_listing() -> None:
    conn = secure()
    events(conn, b"AUTH CRAM-MD5\r\nAUTH\r\n")
    assert lines(conn) == ["-ERR Unsupported authentication mechanism.", "+OK", "PLAIN", "."]


@pytest.mark.parametrize(
    ("code", "prefix"),
    [
        (ResponseCode.AUTH, "-ERR [AUTH] "),
        (ResponseCode.LOGIN_DELAY, "-ERR [LOGIN-DELAY] "),
        (ResponseCode.SYS_TEMP, "-ERR [SYS/TEMP] "),
        (ResponseCode.IN_USE, "-ERR [IN-USE] "),
    ],
)
def test_refused_login_carries_its_response_code(code: ResponseCode, prefix: str) -> None:
    conn = secure()
    events(conn, b"USER a\r\nPASS b\r\n")
    conn.data_to_send()
    conn.refuse_login(code)
    [reply] = lines(conn)
    assert reply.startswith(prefix)
    assert conn.state is (State.CLOSED if code is ResponseCode.LOGIN_DELAY else State.AUTHORIZATION)


def test_connection_closes_after_repeated_auth_failures() -> None:
    conn = secure()
    for attempt in range(1, MAX_AUTH_FAILURES + 1):
        [event] = events(conn, b"AUTH PLAIN " + plain("", "a", f"guess{attempt}") + b"\r\n")
        assert isinstance(event, Authenticate)
        conn.refuse_login(ResponseCode.AUTH)
    assert isinstance(conn.next_event(), Closed)
    assert lines(conn)[-1] == "-ERR [AUTH] Authentication failed."


def test_answering_the_wrong_event_is_a_caller_bug() -> None:
    conn = secure()
    with pytest.raises(ProtocolMisuse):
        conn.accept_login(MAILDROP)
    events(conn, b"USER a\r\nPASS b\r\n")
    with pytest.raises(ProtocolMisuse):
        conn.send_message(b"x")
    with pytest.raises(ProtocolMisuse):
        conn.accept_login([MaildropEntry(1, 1, "has space")])


# -- TRANSACTION -----------------------------------------------------------------------------


def test_stat_list_uidl() -> None:
    conn = logged_in()
    sizes = [len(raw) for raw in MESSAGES.values()]
    events(conn, b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 3\r\n")
    assert lines(conn) == [
        f"+OK 3 {sum(sizes)}",
        f"+OK 3 messages ({sum(sizes)} octets)",
        f"1 {sizes[0]}",
        f"2 {sizes[1]}",
        f"3 {sizes[2]}",
        ".",
        f"+OK 2 {sizes[1]}",
        f"+OK 3 messages ({sum(sizes)} octets)",
        "1 UID11",
        "2 UID12",
        "3 UID15",
        ".",
        "+OK 3 UID15",
    ]


@pytest.mark.parametrize(
    "command",
    [
        b"LIST 0",
        b"LIST 4",
        b"LIST -1",
        b"LIST x",
        b"LIST 99999999999",
        b"LIST 1 2",
        b"RETR",
        b"RETR 1 2",
        b"TOP 1",
        b"TOP 1 -1",
        b"TOP 1 x",
        b"DELE",
        b"UIDL 9",
    ],
)
def test_bad_arguments_are_refused(command: bytes) -> None:
    conn = logged_in()
    got = events(conn, command + b"\r\n")
    assert [type(e) for e in got] == [Answered]
    assert lines(conn)[0].startswith("-ERR")


def test_dele_marks_and_rset_unmarks_and_quit_reports_deletions() -> None:
    conn = logged_in()
    sizes = [len(raw) for raw in MESSAGES.values()]
    events(conn, b"DELE 2\r\nDELE 2\r\nSTAT\r\nLIST\r\nRETR 2\r\nTOP 2 0\r\nLIST 2\r\n")
    assert lines(conn) == [
        "+OK Message 2 deleted.",
        "-ERR Message 2 is marked deleted.",
        f"+OK 2 {sizes[0] + sizes[2]}",
        f"+OK 2 messages ({sizes[0] + sizes[2]} octets)",
        f"1 {sizes[0]}",
        f"3 {sizes[2]}",
        ".",
        "-ERR Message 2 is marked deleted.",
        "-ERR Message 2 is marked deleted.",
        "-ERR Message 2 is marked deleted.",
    ]
    events(conn, b"RSET\r\nSTAT\r\nDELE 1\r\nDELE 3\r\n")
    assert lines(conn)[:2] == [
        f"+OK Maildrop has 3 messages ({sum(sizes)} octets).",
        f"+OK 3 {sum(sizes)}",
    ]
    [event] = events(conn, b"QUIT\r\nDELE 2\r\n")
    assert event == Update(deleted=(11, 15), seen=())
    assert conn.state is State.UPDATE
    conn.update_finished(True)
    assert lines(conn) == ["+OK Logging out, 2 messages deleted."]
    assert isinstance(conn.next_event(), Closed)


def test_failed_update_answers_sys_temp() -> None:
    conn = logged_in()
    events(conn, b"DELE 1\r\nQUIT\r\n")
    conn.data_to_send()
    conn.update_finished(False)
    assert lines(conn) == ["-ERR [SYS/TEMP] Some deleted messages were not removed."]


def retrieve(conn: POP3Connection, command: bytes) -> bytes:
    [event] = [e for e in events(conn, command + b"\r\n") if not isinstance(e, Answered)]
    assert isinstance(event, Retrieve)
    conn.send_message(MESSAGES[event.uid])
    return conn.data_to_send()


def test_retr_sends_crlf_and_byte_stuffs() -> None:
    conn = logged_in()
    out = retrieve(conn, b"RETR 2")
    expected = (
        b"Subject: two\r\n\r\n..starts with a dot\r\nline 2\r\n...two dots\r\n"
        b"last line without newline\r\n.\r\n"
    )
    assert out == f"+OK {len(to_crlf(MESSAGES[12]))} octets\r\n".encode() + expected
    assert unstuff(out) == to_crlf(MESSAGES[12]) + b"\r\n"


def test_top_sends_headers_blank_line_and_n_body_lines() -> None:
    conn = logged_in()
    assert retrieve(conn, b"TOP 3 0").split(b"\r\n", 1)[1] == b"Subject: three\r\n\r\n.\r\n"
    assert retrieve(conn, b"TOP 3 2").split(b"\r\n", 1)[1] == (
        b"Subject: three\r\n\r\nl1\r\nl2\r\n.\r\n"
    )
    assert unstuff(retrieve(conn, b"TOP 3 9999999999")) == MESSAGES[15]
    # TOP does not count as reading the message.
    assert conn.retrieved_uids == ()


def test_retrieved_messages_become_seen_unless_deleted() -> None:
    conn = logged_in()
    retrieve(conn, b"RETR 1")
    retrieve(conn, b"RETR 3")
    assert conn.retrieved_uids == (11, 15)
    events(conn, b"DELE 1\r\n")
    # Without QUIT the deletion never happens, so the message still counts as read.
    assert conn.retrieved_uids == (11, 15)
    [event] = events(conn, b"QUIT\r\n")
    assert event == Update(deleted=(11,), seen=(15,))


def test_message_removed_by_another_session() -> None:
    conn = logged_in()
    events(conn, b"RETR 1\r\n")
    conn.message_missing()
    events(conn, b"RETR 3\r\n")
    conn.message_missing(ResponseCode.SYS_TEMP)
    assert lines(conn) == [
        "-ERR Message 1 was removed by another session.",
        "-ERR [SYS/TEMP] Cannot read message 3 now.",
    ]
    assert conn.retrieved_uids == ()


def test_pipelined_commands_are_answered_in_order_around_retrieve() -> None:
    conn = logged_in()
    got = events(conn, b"NOOP\r\nSTAT\r\nRETR 1\r\nLIST 1\r\nNOOP\r\n")
    assert [type(e) for e in got] == [Answered, Answered, Retrieve]
    with pytest.raises(ProtocolMisuse):
        conn.next_event()
    conn.send_message(MESSAGES[11])
    assert [type(e) for e in events(conn)] == [Answered, Answered]
    out = lines(conn)
    assert out[0] == "+OK" and out[1].startswith("+OK 3 ") and out[2].endswith(" octets")
    assert out[-2:] == [f"+OK 1 {len(MESSAGES[11])}", "+OK"]


def test_transaction_refuses_authorization_commands_and_vice_versa() -> None:
    conn = logged_in()
    events(conn, b"USER x\r\nSTLS\r\n")
    assert lines(conn) == ["-ERR Command not valid in this state."] * 2
    conn = secure()
    events(conn, b"STAT\r\nRETR 1\r\nXYZZY\r\n")
    assert lines(conn) == ["-ERR Command not valid in this state."] * 2 + ["-ERR Unknown command."]


def test_bare_lf_command_lines_are_accepted() -> None:
    conn = logged_in()
    events(conn, b"STAT\nNOOP\n")
    assert lines(conn)[1] == "+OK"


# -- ending a session ------------------------------------------------------------------------


def test_end_of_input_without_quit_deletes_nothing() -> None:
    conn = logged_in()
    conn.receive_data(b"DELE 1\r\n")
    conn.receive_data(b"")
    got = events(conn)
    assert got == [Answered("DELE"), Closed("connection closed by client")]
    assert conn.next_event() == Closed("connection closed by client")


def test_idle_timeout_closes_without_update() -> None:
    conn = logged_in()
    events(conn, b"DELE 1\r\n")
    conn.data_to_send()
    conn.idle_timeout()
    assert lines(conn) == ["-ERR Disconnected for inactivity."]
    assert isinstance(conn.next_event(), Closed)


def test_quit_in_authorization_closes() -> None:
    conn = secure()
    assert events(conn, b"QUIT\r\nUSER x\r\n") == [Closed("quit")]
    assert lines(conn) == ["+OK Logging out."]


def test_too_many_bad_commands_in_a_row_close_the_connection() -> None:
    conn = secure()
    events(conn, b"CAPA\r\n" + b"BOGUS\r\n" * MAX_BAD_COMMANDS + b"CAPA\r\n")
    assert conn.state is State.AUTHORIZATION  # a good command resets the count
    got = events(conn, b"BOGUS\r\n" * (MAX_BAD_COMMANDS + 5))
    assert isinstance(got[-1], Closed)
    assert lines(conn)[-1] == "-ERR Too many bad commands."


# -- line length -----------------------------------------------------------------------------


def test_line_of_max_length_is_accepted_one_more_octet_is_not() -> None:
    conn = secure()
    name = b"a" * (MAX_LINE - len(b"USER \r\n"))
    events(conn, b"USER " + name + b"\r\n")
    assert lines(conn) == ["+OK"]
    got = events(conn, b"USER " + name + b"a\r\n")
    assert got == [Closed("line too long")]
    assert lines(conn) == ["-ERR Input line too long."]


def test_unbounded_line_without_crlf_does_not_grow_memory() -> None:
    chunk = b"A" * (1 << 20)
    for call_next_event in (True, False):
        conn = secure()
        tracemalloc.start()
        try:
            for _ in range(200):  # 200 MB in all
                conn.receive_data(chunk)
                if call_next_event:
                    conn.next_event()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # One chunk is copied into the buffer before it is cut back to MAX_LINE.
        assert peak < 2 * len(chunk)
        assert isinstance(conn.next_event(), Closed)


# -- framing helpers and fuzzing -------------------------------------------------------------


@given(st.binary(max_size=2000))
def test_framing_round_trips_through_a_client(raw: bytes) -> None:
    sent = dot_stuff(to_crlf(raw))
    text = to_crlf(raw)
    expected = text if not text or text.endswith(b"\r\n") else text + b"\r\n"
    assert unstuff(b"+OK\r\n" + sent) == expected


@given(st.binary(max_size=500), st.integers(min_value=0, max_value=30))
def test_top_is_a_prefix_that_keeps_the_headers(raw: bytes, n: int) -> None:
    text = to_crlf(raw)
    top = top_of(text, n)
    split = text.find(b"\r\n\r\n")
    if split == -1 or text.startswith(b"\r\n"):
        assert text.startswith(top) or top == b"\r\n" + text[2:]
    else:
        assert text.startswith(top)
        assert top.startswith(text[: split + 4])
        assert top[split + 4 :].count(b"\r\n") <= n


VOCABULARY = [
    b"USER alice",
    b"PASS pw",
    b"AUTH PLAIN",
    b"AUTH PLAIN " + plain("", "a", "b"),
    b"*",
    b"CAPA",
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"UIDL",
    b"UIDL 2",
    b"RETR 1",
    b"RETR 3",
    b"TOP 2 1",
    b"DELE 1",
    b"DELE 9",
    b"RSET",
    b"NOOP",
    b"STLS",
    b"QUIT",
    b"APOP a b",
    b"",
    b"\x00\xff",
    b"LIST 1 2 3",
    b"TOP 1 99999999999",
]


def drive(conn: POP3Connection, chunks: list[bytes], refuse: bool) -> bytes:
    """Play the session's part: answer every event as a well-behaved caller would."""
    sent = bytearray(conn.data_to_send())
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if event is NEED_DATA or isinstance(event, Closed):
                break
            if isinstance(event, Authenticate):
                if refuse:
                    conn.refuse_login(ResponseCode.AUTH)
                else:
                    conn.accept_login(MAILDROP)
            elif isinstance(event, StartTLS):
                conn.tls_started()
            elif isinstance(event, Retrieve):
                conn.send_message(MESSAGES[event.uid])
            elif isinstance(event, Update):
                conn.update_finished(True)
            sent += conn.data_to_send()
        sent += conn.data_to_send()
        if isinstance(event, Closed):
            break
    return bytes(sent)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    tls=st.booleans(),
    refuse=st.booleans(),
    chunks=st.lists(st.binary(max_size=300), max_size=12),
)
def test_random_bytes_never_raise(tls: bool, refuse: bool, chunks: list[bytes]) -> None:
    conn = POP3Connection(tls_active=tls, tls_available=not tls)
    sent = drive(conn, chunks, refuse)
    assert sent.startswith(b"+OK") and sent.endswith(b"\r\n")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    refuse=st.booleans(),
    commands=st.lists(st.sampled_from(VOCABULARY), max_size=25),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_random_command_sequences_never_raise(
    refuse: bool, commands: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(c + b"\r\n" for c in commands)
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    conn = POP3Connection(tls_active=False, tls_available=True)
    sent = drive(conn, chunks, refuse)
    for line in sent.split(b"\r\n")[:-1]:
        assert b"\n" not in line and b"\r" not in line


def test_retr_and_top_never_send_nul() -> None:
    """A stored NUL goes out as 0x80, one octet for one, as in IMAP (issue #12): a client that
    stops at NUL would hide what follows; the octet count announced stays true."""
    for command in (b"RETR 1", b"TOP 1 5"):
        conn = logged_in()
        [event] = [e for e in events(conn, command + b"\r\n") if not isinstance(e, Answered)]
        assert isinstance(event, Retrieve)
        conn.send_message(b"Subject: nul\r\n\r\nbefore\x00after\r\n")
        out = conn.data_to_send()
        assert b"\x00" not in out and b"before\x80after\r\n" in out
        if command == b"RETR 1":
            assert out.startswith(b"+OK %d octets\r\n" % len(unstuff(out)))
