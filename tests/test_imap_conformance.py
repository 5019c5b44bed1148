"""Points of issue #14 that a third-party IMAP compliance suite and its stress load found
(keywords, CREATE with a trailing separator, unusual mailbox names, \\Recent, CONDSTORE,
MOVE within one mailbox), each against the real server on loopback with raw clients."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from test_imap_session import Env, in_thread, make_env


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in make_env(tmp_path):
        yield e


def listed(lines: list[bytes]) -> set[str]:
    """Mailbox names of LIST responses (quoted or atom)."""
    out = set()
    for line in lines:
        match = re.match(rb'\* LIST \([^)]*\) (?:"/"|NIL) "?([^"\r]*)"?\r\n', line)
        if match:
            out.add(match.group(1).decode())
    return out


# -- CREATE with a trailing hierarchy separator (RFC 9051 §6.3.4) -----------------------------


async def test_create_ignores_a_trailing_hierarchy_separator(env: Env) -> None:
    def session() -> tuple[list[bytes], list[bytes], set[str]]:
        wire = env.wire()
        first = [wire.command("CREATE foo/")[1], wire.command("CREATE foo/bar/")[1]]
        again = [wire.command("CREATE foo/")[1], wire.command("CREATE /")[1]]
        names = listed(wire.ok('LIST "" "foo*"'))
        wire.close()
        return first, again, names

    first, again, names = await in_thread(session)
    assert all(b" OK " in done for done in first), first
    assert b"[ALREADYEXISTS]" in again[0]
    assert b" NO " in again[1]
    assert names == {"foo", "foo/bar"}
