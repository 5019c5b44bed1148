"""Server side of the SASL mechanisms SMTP AUTH offers: PLAIN (RFC 4616) and LOGIN.

A mechanism turns the client's decoded responses into :class:`Credentials` (authorization
identity, authentication identity, password); checking them is the handler's job. Responses
carry passwords, so nothing here logs, and no exception message or ``repr`` contains one.
"""

from __future__ import annotations

import binascii
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar


class SASLError(Exception):
    """A response is malformed or out of turn; the message never quotes the response."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client claims. ``authzid`` is "" when the client asked for no other identity."""

    authzid: str
    authcid: str
    password: str = field(repr=False)


def decode_response(text: str) -> bytes:
    """Base64 of an AUTH initial response or continuation line (RFC 4954 §4).

    A lone "=" is the empty initial response; strict decoding refuses stray characters and
    bad padding instead of guessing what the client meant.
    """
    if text == "=":
        return b""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SASLError("invalid base64 in authentication response") from None


def decode_plain(message: bytes) -> Credentials:
    """``[authzid] NUL authcid NUL passwd`` (RFC 4616 §2), each part UTF-8.

    An empty authzid means "act as authcid". A non-empty one is passed on as it came: whether
    authcid may act as another identity is policy, decided by the handler.
    """
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise SASLError("PLAIN message must have exactly three fields")
    authzid, authcid, password = (_utf8(part) for part in parts)
    if not authcid or not password:
        raise SASLError("PLAIN message lacks an identity or a password")
    return Credentials(authzid, authcid, password)


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError("authentication data is not UTF-8") from None


class Mechanism(ABC):
    """One authentication exchange. Call :meth:`step` with the initial response (``None``
    when the client gave none), then with each response; it returns the next challenge
    (bytes, to be base64-encoded in a 334 reply) or the finished :class:`Credentials`."""

    name: ClassVar[str]

    @abstractmethod
    def step(self, response: bytes | None) -> bytes | Credentials: ...


class Plain(Mechanism):
    """RFC 4616: one message; without an initial response the server sends an empty challenge."""

    name = "PLAIN"

    def __init__(self) -> None:
        self._challenged = False

    def step(self, response: bytes | None) -> bytes | Credentials:
        if response is None:
            if self._challenged:
                raise SASLError("PLAIN expects a response")
            self._challenged = True
            return b""
        return decode_plain(response)


class Login(Mechanism):
    """The obsolete but ubiquitous LOGIN mechanism (draft-murchison-sasl-login-00): the
    server asks "Username:" then "Password:"; an initial response is the user name."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def step(self, response: bytes | None) -> bytes | Credentials:
        if self._username is None:
            if response is None:
                return b"Username:"
            self._username = _utf8(response)
            if not self._username:
                raise SASLError("LOGIN user name is empty")
            return b"Password:"
        if response is None:
            raise SASLError("LOGIN expects a password")
        password = _utf8(response)
        if not password:
            raise SASLError("LOGIN password is empty")
        return Credentials("", self._username, password)


MECHANISMS: dict[str, type[Mechanism]] = {"PLAIN": Plain, "LOGIN": Login}


def server_mechanism(name: str) -> Mechanism:
    """A fresh exchange for mechanism ``name`` (upper case); SASLError if not implemented."""
    try:
        return MECHANISMS[name]()
    except KeyError:
        raise SASLError("mechanism not implemented") from None
