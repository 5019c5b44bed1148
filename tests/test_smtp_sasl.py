"""SASL PLAIN (RFC 4616) and LOGIN as SMTP AUTH uses them."""

from __future__ import annotations

import pytest

from postvern.smtp import sasl
from postvern.smtp.sasl import Credentials, SASLError


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\0alice\0secret", ("", "alice", "secret")),
        (b"admin\0alice\0secret", ("admin", "alice", "secret")),
        ("\0jürgen\0pässwörd".encode(), ("", "jürgen", "pässwörd")),
        (b"\0alice\0with space and : colon", ("", "alice", "with space and : colon")),
    ],
)
def test_plain_messages(message: bytes, expected: tuple[str, str, str]) -> None:
    credentials = sasl.decode_plain(message)
    assert (credentials.authzid, credentials.authcid, credentials.password) == expected


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"alice\0secret",  # two fields
        b"\0alice\0secret\0",  # four
        b"\0\0secret",  # empty authcid
        b"\0alice\0",  # empty password
        b"\0al\xffice\0secret",  # not UTF-8
    ],
)
def test_malformed_plain_messages(message: bytes) -> None:
    with pytest.raises(SASLError) as info:
        sasl.decode_plain(message)
    assert "secret" not in str(info.value)


def test_password_stays_out_of_repr() -> None:
    credentials = Credentials("", "alice", "hunter2")
    assert "hunter2" not in repr(credentials)
    assert "alice" in repr(credentials)


def test_plain_without_initial_response_sends_an_empty_challenge() -> None:
    mechanism = sasl.server_mechanism("PLAIN")
    assert mechanism.step(None) == b""
    assert mechanism.step(b"\0alice\0pw") == Credentials("", "alice", "pw")


def test_plain_with_initial_response() -> None:
    assert sasl.server_mechanism("PLAIN").step(b"z\0alice\0pw") == Credentials("z", "alice", "pw")


def test_plain_expects_a_response_after_its_challenge() -> None:
    mechanism = sasl.server_mechanism("PLAIN")
    mechanism.step(None)
    with pytest.raises(SASLError):
        mechanism.step(None)


def test_login_asks_for_user_then_password() -> None:
    mechanism = sasl.server_mechanism("LOGIN")
    assert mechanism.step(None) == b"Username:"
    assert mechanism.step(b"alice") == b"Password:"
    assert mechanism.step(b"pw") == Credentials("", "alice", "pw")


def test_login_initial_response_is_the_user_name() -> None:
    mechanism = sasl.server_mechanism("LOGIN")
    assert mechanism.step(b"alice") == b"Password:"
    assert mechanism.step(b"pw") == Credentials("", "alice", "pw")


@pytest.mark.parametrize("responses", [[b""], [b"alice", b""], [b"\xff"], [b"alice", b"\xfe"]])
def test_login_refuses_empty_or_undecodable_fields(responses: list[bytes]) -> None:
    mechanism = sasl.server_mechanism("LOGIN")
    with pytest.raises(SASLError):
        for response in responses:
            mechanism.step(response)


def test_unknown_mechanism() -> None:
    with pytest.raises(SASLError):
        sasl.server_mechanism("CRAM-MD5")


@pytest.mark.parametrize(
    ("text", "data"), [("=", b""), ("", b""), ("AGFsaWNlAHB3", b"\0alice\0pw"), ("YQ==", b"a")]
)
def test_decode_response(text: str, data: bytes) -> None:
    assert sasl.decode_response(text) == data


@pytest.mark.parametrize("text", ["YQ", "Y Q==", "YQ==YQ==", "ü", "!!!!", "YQ=\t="])
def test_decode_response_refuses_bad_base64(text: str) -> None:
    with pytest.raises(SASLError) as info:
        sasl.decode_response(text)
    assert text not in str(info.value) or text == ""
