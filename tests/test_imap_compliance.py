"""Points a third-party IMAP compliance suite found (issue #14) and NUL bytes in messages
(issue #12), each against the real server on loopback with a raw client or imaplib."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from test_imap_session import ALICE, Env, in_thread, make_env, message


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path):
        yield e


def search_numbers(lines: list[bytes]) -> list[int]:
    (line,) = [line for line in lines if line.startswith(b"* SEARCH")]
    return [int(n) for n in line.split()[2:]]


# -- 1. SEARCH TEXT and BODY match substrings (RFC 9051 §6.4.4) ------------------------------


async def test_search_text_and_body_match_substrings(env: Env) -> None:
    await env.deliver(ALICE, message("keyboard rows", "asdfghjkl\r\nqwertyuiop zxcvbnm"))
    await env.deliver(ALICE, message("other", "Nothing like it; see Kl\u00e4rung."))

    def session() -> dict[str, list[int]]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        out = {
            name: search_numbers(wire.ok(f"SEARCH {query}"))
            for name, query in {
                "text": "TEXT sdfghjk",
                "body": 'BODY "GHJKL QWERT"',  # case folded, across the line break
                "header": "TEXT eyboa",
                "body_not_header": "BODY eyboa",
                "two_chars": "BODY kl",  # too short for the index: scanned
                "one_char": "TEXT z",
                "empty": 'BODY ""',
            }.items()
        }
        wire.close()
        return out

    out = await in_thread(session)
    assert out["text"] == [1]
    assert out["body"] == [1]
    assert out["header"] == [1]
    assert out["body_not_header"] == []
    assert out["two_chars"] == [1, 2]
    assert out["one_char"] == [1]
    assert out["empty"] == [1, 2]
