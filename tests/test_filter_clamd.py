"""Virus scanning against a real clamd (tests/clamd.py), and what a scanner failure does."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import zipfile
from email.message import EmailMessage

import pytest

from clamd import (
    EICAR,
    EICAR_SIGNATURE,
    MARKER,
    MARKER_SIGNATURE,
    ClamdServer,
    clamd_fixture,  # noqa: F401  (the session fixture ``clamd``)
)
from postvern.filters import FilterSettings, ScanContext, scan
from postvern.filters.clamd import (
    ClamdClient,
    ClamdProtocolError,
    ClamdScanError,
    ClamdTimeout,
    ClamdTooLarge,
    ClamdUnavailable,
    instream_request,
    parse_scan_reply,
)


def mime_message(payload_lines: list[str], filename: str = "file.bin") -> bytes:
    head = (
        "From: someone@example.org\r\nTo: bob@example.test\r\nSubject: files\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XYZ\r\n\r\n"
        "--XYZ\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        f"--XYZ\r\nContent-Type: application/octet-stream; name={filename}\r\n"
        f"Content-Disposition: attachment; filename={filename}\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    )
    return (head + "\r\n".join(payload_lines) + "\r\n--XYZ--\r\n").encode()


def unused_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# -- the sans-I/O core ----------------------------------------------------------------


def test_instream_framing() -> None:
    pieces = list(instream_request(b"abcdefghij", chunk=4))
    assert pieces == [
        b"zINSTREAM\0",
        b"\x00\x00\x00\x04abcd",
        b"\x00\x00\x00\x04efgh",
        b"\x00\x00\x00\x02ij",
        b"\x00\x00\x00\x00",
    ]


def test_reply_parsing() -> None:
    assert parse_scan_reply(b"stream: OK\0").clean
    found = parse_scan_reply(b"stream: Eicar-Test-Signature FOUND\0")
    assert found.virus == "Eicar-Test-Signature"
    with pytest.raises(ClamdScanError):
        parse_scan_reply(b"INSTREAM size limit exceeded. ERROR\0")
    for garbage in (b"", b"hello\0", b"stream: maybe\0", b"stream:  FOUND\0"):
        with pytest.raises(ClamdProtocolError):
            parse_scan_reply(garbage)


# -- a real clamd -----------------------------------------------------------------------


async def test_ping_and_version_over_both_transports(clamd: ClamdServer) -> None:
    for address in (clamd.unix_address, clamd.tcp_address):
        client = ClamdClient(address, timeout=10)
        await client.ping()
        assert "ClamAV" in await client.version()


async def test_eicar_plain(clamd: ClamdServer) -> None:
    for address in (clamd.unix_address, clamd.tcp_address):
        result = await ClamdClient(address).scan(EICAR)
        assert result.virus is not None and result.virus.startswith(EICAR_SIGNATURE)
        assert (await ClamdClient(address).scan(b"just some harmless bytes")).clean


async def test_custom_signature(clamd: ClamdServer) -> None:
    result = await ClamdClient(clamd.unix_address).scan(b"header " + MARKER + b" trailer")
    assert result.virus is not None and result.virus.startswith(MARKER_SIGNATURE)


async def test_eicar_inside_zip(clamd: ClamdServer) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme.txt", "hello")
        archive.writestr("tools/eicar.com", EICAR)
    result = await ClamdClient(clamd.unix_address).scan(buffer.getvalue())
    assert result.virus is not None and result.virus.startswith(EICAR_SIGNATURE)


async def test_eicar_base64_split_across_lines_in_a_message(clamd: ClamdServer) -> None:
    encoded = base64.b64encode(EICAR).decode()
    lines = [encoded[i : i + 19] for i in range(0, len(encoded), 19)]  # odd line lengths
    raw = mime_message(lines, "eicar.com")
    verdict = await scan(raw, ScanContext(settings=FilterSettings(clamd=clamd.tcp_address)))
    assert verdict.action == "reject"
    assert verdict.virus is not None and verdict.virus.startswith(EICAR_SIGNATURE)
    assert "virus=" in verdict.header()


async def test_clean_message_is_delivered(clamd: ClamdServer) -> None:
    raw = mime_message([base64.b64encode(b"quarterly figures").decode()], "figures.txt")
    verdict = await scan(raw, ScanContext(settings=FilterSettings(clamd=clamd.unix_address)))
    assert verdict.virus is None and verdict.scanner_error is None
    assert verdict.action == "inbox"


async def test_stream_limit_is_enforced_before_sending(clamd: ClamdServer) -> None:
    client = ClamdClient(clamd.unix_address, max_stream=1024)
    with pytest.raises(ClamdTooLarge):
        await client.scan(b"x" * 1025)


async def test_message_over_the_stream_limit_is_scanned_part_by_part(clamd: ClamdServer) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.org", "b@example.test", "files"
    msg.set_content("Two files.")
    for name in ("a.bin", "b.bin", "c.bin"):
        msg.add_attachment(b"harmless " * 1500, "application", "octet-stream", filename=name)
    msg.add_attachment(EICAR, "application", "octet-stream", filename="d.com")
    raw = msg.as_bytes()
    settings = FilterSettings(clamd=clamd.unix_address, clamd_max_stream=len(raw) // 2)
    verdict = await scan(raw, ScanContext(settings=settings))
    assert verdict.virus is not None and verdict.virus.startswith(EICAR_SIGNATURE)
    assert verdict.action == "reject"


# -- scanner failures -------------------------------------------------------------------


async def test_clamd_down_raises_named_error(tmp_path) -> None:
    with pytest.raises(ClamdUnavailable):
        await ClamdClient(f"unix:{tmp_path / 'absent.sock'}").scan(EICAR)
    with pytest.raises(ClamdUnavailable):
        await ClamdClient(unused_address()).ping()


async def test_clamd_down_tempfails_the_message(tmp_path) -> None:
    settings = FilterSettings(clamd=f"unix:{tmp_path / 'absent.sock'}")
    verdict = await scan(mime_message(["aGVsbG8="]), ScanContext(settings=settings))
    assert verdict.action == "tempfail"
    assert verdict.scanner_error
    assert verdict.smtp_reply()[0] == 451


async def test_clamd_down_accepted_when_configured(tmp_path) -> None:
    settings = FilterSettings(clamd=f"unix:{tmp_path / 'absent.sock'}", on_scanner_failure="accept")
    verdict = await scan(mime_message(["aGVsbG8="]), ScanContext(settings=settings))
    assert verdict.action == "inbox"
    assert any(r.startswith("SCAN_INCOMPLETE") for r in verdict.reasons)


async def test_silent_scanner_times_out() -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads everything, never answers
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ClamdTimeout):
            await ClamdClient(f"127.0.0.1:{port}", timeout=0.3).ping()
    finally:
        server.close()
        await server.wait_closed()


async def test_scanner_closing_without_answer_is_unavailable() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ClamdUnavailable):
            await ClamdClient(f"127.0.0.1:{port}", timeout=2).scan(b"data")
    finally:
        server.close()
        await server.wait_closed()
