"""A ClamAV clamd client: the INSTREAM command over a unix socket or TCP.

clamd scans bytes sent as INSTREAM chunks (a 4-byte big-endian length, then the data; a
zero length ends the stream) and answers ``stream: OK``, ``stream: <name> FOUND`` or
``<message> ERROR``. The protocol core below is sans-I/O (encode the request, parse the
reply); :class:`ClamdClient` is the asyncio adapter with connect and read timeouts.
A scan that cannot complete raises a :class:`ClamdError` subclass, never returns "clean":
the pipeline answers 4xx (or accepts, if configured) but never passes mail unscanned
by mistake.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from postvern.config import ConfigError, parse_hostport

# clamd's StreamMaxLength defaults to 25 MB; beyond it clamd answers "size limit exceeded".
# A larger message is refused here before a byte is sent, with a named error.
MAX_STREAM_BYTES = 25 * 1024 * 1024
# INSTREAM chunk size. Any size up to StreamMaxLength works; this keeps syscalls few and
# buffers small.
CHUNK_BYTES = 256 * 1024
# Replies are one short line ("stream: Win.Test.EICAR_HDB-1 FOUND"); more is not clamd.
MAX_REPLY_BYTES = 4096
CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 30.0


class ClamdError(Exception):
    """The virus scan could not be completed (the message is not known to be clean)."""


class ClamdUnavailable(ClamdError):
    """clamd could not be reached, or closed the connection."""


class ClamdTimeout(ClamdError):
    """clamd did not connect or answer in time."""


class ClamdProtocolError(ClamdError):
    """clamd's answer could not be understood."""


class ClamdScanError(ClamdError):
    """clamd answered ERROR (for example its size limit)."""


class ClamdTooLarge(ClamdError):
    """The data is larger than the stream limit; it was not sent."""


@dataclass(frozen=True, slots=True)
class ScanResult:
    virus: str | None  # the signature name, None when clean

    @property
    def clean(self) -> bool:
        return self.virus is None


# -- sans-I/O core --------------------------------------------------------------------


def instream_request(data: bytes, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of a ``zINSTREAM`` request for *data* ('z': replies end with NUL)."""
    yield b"zINSTREAM\0"
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        part = view[start : start + chunk]
        yield struct.pack(">I", len(part)) + part.tobytes()
    yield struct.pack(">I", 0)


def parse_scan_reply(reply: bytes) -> ScanResult:
    """Parse an INSTREAM reply; raises ClamdScanError / ClamdProtocolError."""
    text = reply.rstrip(b"\0\r\n").decode("utf-8", "replace").strip()
    if text.endswith(" ERROR"):
        raise ClamdScanError(f"clamd: {text[: -len(' ERROR')][:200]}")
    name, sep, status = text.partition(": ")
    if not sep or name != "stream":
        raise ClamdProtocolError("clamd: unexpected reply")
    if status == "OK":
        return ScanResult(virus=None)
    if status.endswith(" FOUND"):
        virus = status[: -len(" FOUND")].strip()
        if virus:
            return ScanResult(virus=virus[:200])
    raise ClamdProtocolError("clamd: unexpected reply")


def parse_address(address: str) -> tuple[str, str, int]:
    """``"unix:/path"`` → ("unix", path, 0); ``"host:port"`` → ("tcp", host, port)."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ClamdError("clamd address: empty socket path")
        return "unix", path, 0
    try:
        host, port = parse_hostport(address)
    except ConfigError as exc:
        raise ClamdError(f"clamd address: {exc}") from None
    return "tcp", host, port


# -- asyncio adapter ------------------------------------------------------------------


class ClamdClient:
    """Scans bytes with clamd at *address* (``unix:/path`` or ``host:port``)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_stream: int = MAX_STREAM_BYTES,
    ) -> None:
        self.kind, self.host, self.port = parse_address(address)
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_stream = max_stream

    async def ping(self) -> None:
        """Raise a ClamdError unless clamd answers PONG."""
        reply = await self._exchange([b"zPING\0"])
        if reply.rstrip(b"\0\n") != b"PONG":
            raise ClamdProtocolError("clamd: PING was not answered with PONG")

    async def version(self) -> str:
        reply = await self._exchange([b"zVERSION\0"])
        return reply.rstrip(b"\0\n").decode("utf-8", "replace")[:200]

    async def scan(self, data: bytes) -> ScanResult:
        """Scan *data*; raise a ClamdError when the result is not known."""
        if len(data) > self.max_stream:
            raise ClamdTooLarge("message is larger than the scanner's stream limit")
        return parse_scan_reply(await self._exchange(instream_request(data)))

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if self.kind == "unix":
                opening = asyncio.open_unix_connection(self.host)
            else:
                opening = asyncio.open_connection(self.host, self.port)
            return await asyncio.wait_for(opening, self.connect_timeout)
        except TimeoutError:
            raise ClamdTimeout("clamd: connect timed out") from None
        except OSError as exc:
            raise ClamdUnavailable(f"clamd: cannot connect ({exc.strerror or 'error'})") from None

    async def _exchange(self, request: Iterator[bytes] | list[bytes]) -> bytes:
        reader, writer = await self._open()
        try:
            return await asyncio.wait_for(self._talk(reader, writer, request), self.timeout)
        except TimeoutError:
            raise ClamdTimeout("clamd: no answer in time") from None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _talk(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: Iterator[bytes] | list[bytes],
    ) -> bytes:
        try:
            for piece in request:
                writer.write(piece)
                await writer.drain()
        except OSError:
            # clamd closes early when a stream passes its limit; its reply says why.
            reply = await _read_reply(reader)
            if reply:
                return reply
            raise ClamdUnavailable("clamd: connection closed while sending") from None
        reply = await _read_reply(reader)
        if not reply:
            raise ClamdUnavailable("clamd: connection closed without an answer")
        return reply


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    reply = b""
    try:
        while len(reply) < MAX_REPLY_BYTES and not reply.endswith(b"\0"):
            piece = await reader.read(MAX_REPLY_BYTES - len(reply))
            if not piece:
                break
            reply += piece
    except OSError:
        pass
    if len(reply) >= MAX_REPLY_BYTES and not reply.endswith(b"\0"):
        raise ClamdProtocolError("clamd: reply too long")
    return reply
