"""A minimal HTTPS GET for fetching MTA-STS policies (RFC 8461 §3.3), with hard limits.

A policy is one small text file fetched from a host the recipient domain names, so the
client only needs HTTP/1.1 GET with ``Connection: close``, certificate validation, no
redirects, a bounded body and an overall timeout. :class:`ResponseParser` is the sans-I/O
core (feed bytes, get a :class:`Response`); :func:`fetch` is the thin asyncio edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from dataclasses import dataclass, field

# RFC 8461 §3.3: "senders SHOULD limit the size of the policy body to 64 KB".
MAX_BODY = 64 * 1024
# The status line and headers of a static file fit easily; a server sending more is not
# serving a policy, and the bound keeps a hostile server from feeding us endless headers.
MAX_HEAD = 16 * 1024
# A chunk-size line is hex digits and optional extensions; anything longer is malformed.
MAX_CHUNK_LINE = 1024
# RFC 8461 §3.3 suggests senders bound the fetch; a minute is its example, half is plenty
# for one small file and keeps a delivery attempt from waiting on a dead policy host.
FETCH_TIMEOUT = 30.0
READ_SIZE = 16 * 1024


class HTTPError(Exception):
    """The fetch failed: connection, TLS, timeout, malformed response or a limit exceeded."""


class ResponseTooLarge(HTTPError):
    """The headers or the body exceed their limit."""


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, last wins
    body: bytes = b""

    @property
    def media_type(self) -> str:
        """The Content-Type without parameters, lower-case ("text/plain")."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class _State(enum.Enum):
    HEAD = enum.auto()
    LENGTH = enum.auto()  # Content-Length body
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_CRLF = enum.auto()
    TRAILER = enum.auto()
    UNTIL_CLOSE = enum.auto()
    DONE = enum.auto()


class ResponseParser:
    """Parses one HTTP/1.1 response; call :meth:`feed` with bytes, :meth:`eof` at the end.

    Both return the :class:`Response` once it is complete, None while more is needed, and
    raise :class:`HTTPError` for anything malformed or over a limit.
    """

    def __init__(self, max_body: int = MAX_BODY, max_head: int = MAX_HEAD) -> None:
        self._max_body = max_body
        self._max_head = max_head
        self._buffer = bytearray()
        self._state = _State.HEAD
        self._remaining = 0
        self._body = bytearray()
        self._response: Response | None = None

    def feed(self, data: bytes) -> Response | None:
        if self._state is _State.DONE:
            return self._response
        self._buffer += data
        while self._step():
            pass
        return self._response if self._state is _State.DONE else None

    def eof(self) -> Response:
        """The connection closed: a body that runs to the close is now complete."""
        if self._state is _State.UNTIL_CLOSE:
            self._finish()
        if self._state is not _State.DONE or self._response is None:
            raise HTTPError("connection closed before the response was complete")
        return self._response

    # Each step consumes what it can and says whether another step may make progress.

    def _step(self) -> bool:
        state = self._state
        if state is _State.HEAD:
            return self._head()
        if state is _State.LENGTH:
            return self._length_body()
        if state is _State.CHUNK_SIZE:
            return self._chunk_size()
        if state is _State.CHUNK_DATA:
            return self._chunk_data()
        if state is _State.CHUNK_CRLF:
            return self._chunk_crlf()
        if state is _State.TRAILER:
            return self._trailer()
        if state is _State.UNTIL_CLOSE:
            self._take(len(self._buffer))
        return False

    def _head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self._max_head:
                raise ResponseTooLarge("response headers too large")
            return False
        if end > self._max_head:
            raise ResponseTooLarge("response headers too large")
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        status_line, *lines = head.split("\r\n")
        self._response = _status(status_line)
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise HTTPError("malformed header line")
            self._response.headers[name.lower()] = value.strip()
        self._choose_framing(self._response)
        return True

    def _choose_framing(self, response: Response) -> None:
        """RFC 9112 §6.3: chunked wins over Content-Length; neither means read to close."""
        if response.status in (204, 304) or 100 <= response.status < 200:
            self._finish()
            return
        encoding = response.headers.get("transfer-encoding", "").lower()
        if encoding:
            if encoding != "chunked":
                raise HTTPError("unsupported transfer coding")
            self._state = _State.CHUNK_SIZE
            return
        length = response.headers.get("content-length")
        if length is None:
            self._state = _State.UNTIL_CLOSE
            return
        if not length.isdigit() or len(length) > 12:
            raise HTTPError("malformed Content-Length")
        self._remaining = int(length)
        if self._remaining > self._max_body:
            raise ResponseTooLarge("response body too large")
        self._state = _State.LENGTH

    def _length_body(self) -> bool:
        self._take(min(self._remaining, len(self._buffer)))
        if self._remaining == 0:
            self._finish()
        return False

    def _chunk_size(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > MAX_CHUNK_LINE:
                raise HTTPError("malformed chunk size")
            return False
        line = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
        del self._buffer[: end + 2]
        try:
            size = int(line, 16) if line and len(line) <= 8 else -1
        except ValueError:
            size = -1
        if size < 0:
            raise HTTPError("malformed chunk size")
        if len(self._body) + size > self._max_body:
            raise ResponseTooLarge("response body too large")
        self._remaining = size
        self._state = _State.CHUNK_DATA if size else _State.TRAILER
        return True

    def _chunk_data(self) -> bool:
        self._take(min(self._remaining, len(self._buffer)))
        if self._remaining:
            return False
        self._state = _State.CHUNK_CRLF
        return True

    def _chunk_crlf(self) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] != b"\r\n":
            raise HTTPError("malformed chunk")
        del self._buffer[:2]
        self._state = _State.CHUNK_SIZE
        return True

    def _trailer(self) -> bool:
        # Trailer fields are not needed; skip lines until the empty one.
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > self._max_head:
                raise ResponseTooLarge("response trailer too large")
            return False
        del self._buffer[: end + 2]
        if end == 0:
            self._finish()
            return False
        return True

    def _take(self, count: int) -> None:
        if len(self._body) + count > self._max_body:
            raise ResponseTooLarge("response body too large")
        self._body += self._buffer[:count]
        del self._buffer[:count]
        self._remaining -= count if self._state is not _State.UNTIL_CLOSE else 0

    def _finish(self) -> None:
        assert self._response is not None
        self._response.body = bytes(self._body)
        self._state = _State.DONE


def _status(line: str) -> Response:
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HTTPError("malformed status line")
    return Response(int(code), reason)


def build_request(host: str, path: str, port: int = 443) -> bytes:
    """The GET request; ``Host`` names the port only when it is not the default."""
    authority = host if port == 443 else f"{host}:{port}"
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {authority}\r\n"
        "User-Agent: Postvern-MTA-STS\r\n"
        "Accept: text/plain\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


async def fetch(
    address: str,
    port: int,
    host: str,
    path: str,
    context: ssl.SSLContext,
    *,
    time_limit: float = FETCH_TIMEOUT,
    max_body: int = MAX_BODY,
) -> Response:
    """GET ``https://host[:port]path`` from ``address``; the certificate must match ``host``.

    Redirects are not followed (RFC 8461 §3.3): a 3xx comes back as the response it is.
    """
    try:
        async with asyncio.timeout(time_limit):
            return await _fetch(address, port, host, path, context, max_body)
    except TimeoutError:
        raise HTTPError("timed out") from None
    except ssl.SSLCertVerificationError as e:
        raise HTTPError(f"certificate not valid: {e.verify_message}") from None
    except (OSError, ssl.SSLError, EOFError) as e:
        raise HTTPError(f"connection failed: {type(e).__name__}") from None


async def _fetch(
    address: str, port: int, host: str, path: str, context: ssl.SSLContext, max_body: int
) -> Response:
    reader, writer = await asyncio.open_connection(address, port, ssl=context, server_hostname=host)
    try:
        writer.write(build_request(host, path, port))
        await writer.drain()
        parser = ResponseParser(max_body=max_body)
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                return parser.eof()
            response = parser.feed(data)
            if response is not None:
                return response
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
