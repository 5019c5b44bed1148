"""postvern.net on loopback: what a Channel hands its session, and the listener around it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from harness import client_tls_context
from postvern.abuse.portscan import Offence, classify
from postvern.crypto.tls import make_self_signed, server_context
from postvern.net import (
    READ_HIGH_WATER,
    Channel,
    ChannelServer,
    ConnectionCaps,
    serve_channels,
)

HOST = "127.0.0.1"
# Every wait on the network is bounded so a broken channel fails a test instead of hanging it.
NETWORK_WAIT = 20.0
# Short enough to keep the tests quick; any real handshake on loopback is far faster.
QUICK_HANDSHAKE = 0.3

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(NETWORK_WAIT):
        return await awaitable


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    directory: Path = tmp_path_factory.mktemp("tls")
    make_self_signed("localhost", directory / "cert.pem", directory / "key.pem")
    return server_context(directory / "cert.pem", directory / "key.pem")


class ObservedChannel(Channel):
    """A Channel the test can ask whether bytes have reached it, without reading them."""

    def __init__(self, on_open: Callable[[Channel], None]) -> None:
        super().__init__(on_open)
        self.arrived = 0
        self._arrival = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.arrived += len(data)
        self._arrival.set()

    async def until_arrived(self, size: int) -> None:
        while self.arrived < size:
            self._arrival.clear()
            await bounded(self._arrival.wait())


Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connected_pair() -> tuple[ObservedChannel, Client, asyncio.Server]:
    """A server-side channel and the client connected to it."""
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[Channel] = loop.create_future()
    server = await loop.create_server(lambda: ObservedChannel(opened.set_result), HOST, 0)
    port = server.sockets[0].getsockname()[1]
    client = await asyncio.open_connection(HOST, port)
    channel = await bounded(opened)
    assert isinstance(channel, ObservedChannel)
    return channel, client, server


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await bounded(reader.read()) == b""
    except ConnectionResetError:
        return True


async def close_client(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass


async def finish(writer: asyncio.StreamWriter, server: asyncio.Server) -> None:
    await close_client(writer)
    server.close()


# --- Reading ----------------------------------------------------------------------------


async def test_read_returns_everything_received_and_eof_leaves_the_write_side_open() -> None:
    channel, (reader, writer), server = await connected_pair()
    for part in (b"one ", b"two ", b"three"):
        writer.write(part)
        await writer.drain()
    await channel.until_arrived(13)
    assert await bounded(channel.read()) == b"one two three"
    writer.write_eof()
    assert await bounded(channel.read()) == b""
    assert await bounded(channel.read()) == b""
    # A half-close still gets the answers to what came before it.
    channel.write(b"answer\r\n")
    assert await bounded(reader.readline()) == b"answer\r\n"
    channel.close()
    assert await closed_by_server(reader)
    await finish(writer, server)


async def test_reading_stops_at_the_high_water_mark_until_the_session_reads() -> None:
    channel, (_, writer), server = await connected_pair()
    payload = b"x" * (4 * READ_HIGH_WATER)
    writer.write(payload)
    sent = asyncio.ensure_future(writer.drain())
    await channel.until_arrived(READ_HIGH_WATER)
    assert channel.transport is not None
    assert not channel.transport.is_reading()  # the rest waits in TCP, not in our memory
    received = b""
    while len(received) < len(payload):
        data = await bounded(channel.read())
        assert data
        received += data
    assert received == payload
    assert channel.transport.is_reading()
    await bounded(sent)
    await finish(writer, server)


async def test_a_pending_read_is_cancelled_without_losing_input() -> None:
    channel, (_, writer), server = await connected_pair()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await channel.read()
    writer.write(b"later\r\n")
    assert await bounded(channel.read()) == b"later\r\n"
    await finish(writer, server)


async def test_interrupt_wakes_the_pending_read_with_none() -> None:
    channel, (_, writer), server = await connected_pair()
    pending = asyncio.ensure_future(channel.read())
    await asyncio.sleep(0)  # let the read start waiting
    channel.interrupt()
    assert await bounded(pending) is None
    writer.write(b"too late\r\n")
    await channel.until_arrived(10)
    assert await bounded(channel.read()) is None
    await finish(writer, server)


async def test_discarded_input_is_dropped_and_the_next_read_resumes() -> None:
    channel, (_, writer), server = await connected_pair()
    writer.write(b"dropped\r\n")
    await channel.until_arrived(9)
    assert channel.discard_input() == 9
    assert channel.transport is not None and not channel.transport.is_reading()
    writer.write(b"kept\r\n")
    assert await bounded(channel.read()) == b"kept\r\n"
    await finish(writer, server)


# --- STARTTLS ---------------------------------------------------------------------------


@pytest.mark.parametrize("discard_first", [True, False], ids=["discard_input", "start_tls"])
async def test_plaintext_from_before_the_handshake_is_never_read_after_it(
    tls: ssl.SSLContext, discard_first: bool
) -> None:
    """CVE-2011-0411: a command pipelined behind STARTTLS must not run inside TLS."""
    channel, (reader, writer), server = await connected_pair()
    writer.write(b"STARTTLS\r\n")
    await channel.until_arrived(10)
    assert await bounded(channel.read()) == b"STARTTLS\r\n"
    writer.write(b"RSET\r\n")  # the injection, sent before the client has any answer
    await channel.until_arrived(16)
    if discard_first:
        assert channel.discard_input() == 6
    channel.write(b"220 go ahead\r\n")
    upgrade = asyncio.ensure_future(channel.start_tls(tls))
    assert await bounded(reader.readline()) == b"220 go ahead\r\n"
    await bounded(writer.start_tls(client_tls_context()))
    await bounded(upgrade)
    writer.write(b"NOOP\r\n")
    assert await bounded(channel.read()) == b"NOOP\r\n"
    channel.write(b"250 ok\r\n")
    assert await bounded(reader.readline()) == b"250 ok\r\n"
    await finish(writer, server)


async def test_a_stalled_starttls_handshake_times_out_and_closes(tls: ssl.SSLContext) -> None:
    channel, (reader, writer), server = await connected_pair()
    channel.write(b"220 go ahead\r\n")
    with pytest.raises(ConnectionError):
        await bounded(channel.start_tls(tls, QUICK_HANDSHAKE))  # the client never starts
    assert await bounded(reader.readline()) == b"220 go ahead\r\n"
    assert await closed_by_server(reader)
    await finish(writer, server)


# --- The listener -----------------------------------------------------------------------


async def echo(channel: Channel) -> None:
    """A session: greet, echo until end of input; on interrupt say goodbye."""
    try:
        channel.write(b"hello\r\n")
        while data := await channel.read():
            channel.write(data)
        if data is None:
            channel.write(b"bye\r\n")
    finally:
        channel.close()


async def greeted(port: int) -> Client:
    reader, writer = await asyncio.open_connection(HOST, port)
    assert await bounded(reader.readline()) == b"hello\r\n"
    return reader, writer


async def until_sessions(listener: ChannelServer, count: int) -> None:
    """Poll: the listener keeps no event for a session that ended."""
    async with asyncio.timeout(NETWORK_WAIT):
        while listener.active_sessions != count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_connections_over_the_caps_are_told_busy() -> None:
    listener = await serve_channels(
        "test", HOST, 0, run=echo, caps=ConnectionCaps(total=10, per_ip=1), busy=b"busy\r\n"
    )
    _, first = await greeted(listener.port)
    reader, writer = await asyncio.open_connection(HOST, listener.port)
    assert await bounded(reader.readline()) == b"busy\r\n"
    assert await closed_by_server(reader)
    await close_client(writer)
    await close_client(first)
    await until_sessions(listener, 0)
    _, again = await greeted(listener.port)
    await close_client(again)
    await listener.shutdown(grace=2)


async def test_admission_refuses_before_the_session_starts() -> None:
    asked: list[str] = []

    async def admission(ip: str) -> str | None:
        asked.append(ip)
        return "banned for a while"

    listener = await serve_channels(
        "test",
        HOST,
        0,
        run=echo,
        caps=ConnectionCaps(total=10, per_ip=10),
        busy=b"busy\r\n",
        refusal=lambda reason: f"no: {reason}\r\n".encode(),
        admission=admission,
    )
    reader, writer = await asyncio.open_connection(HOST, listener.port)
    assert await bounded(reader.readline()) == b"no: banned for a while\r\n"
    assert await closed_by_server(reader)
    assert asked == [HOST]
    await close_client(writer)
    await listener.shutdown(grace=2)


async def test_shutdown_interrupts_sessions_and_cancels_stragglers() -> None:
    cancelled = asyncio.Event()

    async def stuck(channel: Channel) -> None:
        """A session that never reads again, so never hears the interrupt."""
        channel.write(b"hello\r\n")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            channel.close()

    caps = ConnectionCaps(total=10, per_ip=10)
    listener = await serve_channels("test", HOST, 0, run=echo, caps=caps, busy=b"busy\r\n")
    stubborn = await serve_channels("test", HOST, 0, run=stuck, caps=caps, busy=b"busy\r\n")
    clients = [await greeted(listener.port) for _ in range(2)]
    stuck_reader, stuck_writer = await greeted(stubborn.port)
    await bounded(asyncio.gather(listener.shutdown(grace=5), stubborn.shutdown(grace=0.2)))
    for reader, writer in clients:
        assert await bounded(reader.readline()) == b"bye\r\n"
        assert await closed_by_server(reader)
        writer.close()
    assert cancelled.is_set()
    assert await closed_by_server(stuck_reader)
    stuck_writer.close()
    assert listener.active_sessions == 0 and stubborn.active_sessions == 0


async def implicit_listener(tls: ssl.SSLContext) -> ChannelServer:
    return await serve_channels(
        "test",
        HOST,
        0,
        run=echo,
        caps=ConnectionCaps(total=50, per_ip=50),
        busy=b"busy\r\n",
        ssl_context=tls,
        implicit_tls=True,
        handshake_timeout=QUICK_HANDSHAKE,
    )


async def test_a_stalled_implicit_tls_handshake_times_out(tls: ssl.SSLContext) -> None:
    listener = await implicit_listener(tls)
    reader, writer = await asyncio.open_connection(HOST, listener.port)  # no ClientHello
    assert await closed_by_server(reader)
    assert listener.active_sessions == 0
    await close_client(writer)
    # A client that does complete the handshake is served.
    reader, writer = await asyncio.open_connection(
        HOST, listener.port, ssl=client_tls_context(), server_hostname="localhost"
    )
    assert await bounded(reader.readline()) == b"hello\r\n"
    await close_client(writer)
    await listener.shutdown(grace=2)


def test_implicit_tls_needs_a_context() -> None:
    with pytest.raises(ValueError, match="ssl_context"):
        asyncio.run(
            serve_channels(
                "test",
                HOST,
                0,
                run=echo,
                caps=ConnectionCaps(total=1, per_ip=1),
                busy=b"busy\r\n",
                implicit_tls=True,
            )
        )


# --- Implicit TLS run by the listener (failed handshakes are seen; one shared read buffer) ----


async def test_failed_implicit_tls_handshakes_reach_the_observer(tls: ssl.SSLContext) -> None:
    ended: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
    ChannelServer.observer = lambda name, ip, first, failed: ended.put_nowait((first, failed))
    listener = await implicit_listener(tls)
    try:
        seen = {}
        for case, sent in [
            ("silent", b""),
            ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("plaintext", b"a LOGIN x y\r\n"),
            ("broken hello", b"\x16\x03\x01\x00\x05garbage-not-a-hello"),
        ]:
            reader, writer = await asyncio.open_connection(HOST, listener.port)
            writer.write(sent)
            assert await closed_by_server(reader)
            await close_client(writer)
            first, failed = await bounded(ended.get())
            seen[case] = (failed, classify(first, failed))
        reader, writer = await asyncio.open_connection(
            HOST, listener.port, ssl=client_tls_context(), server_hostname="localhost"
        )
        assert await bounded(reader.readline()) == b"hello\r\n"
        writer.write(b"a NOOP\r\n")
        assert await bounded(reader.readline()) == b"a NOOP\r\n"
        await close_client(writer)
        first, failed = await bounded(ended.get())
        seen["tls client"] = (failed, classify(first, failed))
    finally:
        ChannelServer.observer = None
        await listener.shutdown(grace=2)
    assert seen == {
        "silent": (True, Offence.SILENT),
        "http": (True, Offence.WRONG_PROTOCOL),
        "plaintext": (True, Offence.TLS_FAILED),
        "broken hello": (True, Offence.TLS_FAILED),
        "tls client": (False, None),
    }


async def test_tls_sessions_share_one_read_buffer_without_mixing_bytes(
    tls: ssl.SSLContext,
) -> None:
    listener = await implicit_listener(tls)
    payloads = [bytes([65 + n]) * 200_000 + b"\r\n" for n in range(6)]
    clients = []
    try:
        for _ in payloads:
            reader, writer = await asyncio.open_connection(
                HOST, listener.port, ssl=client_tls_context(), server_hostname="localhost"
            )
            assert await bounded(reader.readline()) == b"hello\r\n"
            clients.append((reader, writer))
        buffers = {
            id(channel.transport._ssl_protocol._ssl_buffer)  # type: ignore[union-attr]
            for channel in listener._sessions.values()
        }

        async def round_trip(client: Client, payload: bytes) -> bytes:
            reader, writer = client
            writer.write(payload)
            return await bounded(reader.readexactly(len(payload)))

        echoed = await asyncio.gather(*map(round_trip, clients, payloads))
    finally:
        for _, writer in clients:
            await close_client(writer)
        await listener.shutdown(grace=2)
    assert len(clients) == len(payloads) and len(buffers) == 1
    assert echoed == payloads
