"""Points of issue #14 that a third-party IMAP compliance suite and its stress load found
(keywords, CREATE with a trailing separator, unusual mailbox names, \\Recent, CONDSTORE,
MOVE within one mailbox), each against the real server on loopback with raw clients."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from test_imap_session import ALICE, Env, in_thread, make_env, message


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


# -- MOVE into the selected mailbox itself (RFC 6851) -----------------------------------------


async def test_move_to_the_selected_mailbox_is_copy_and_expunge(env: Env) -> None:
    for n in range(1, 4):
        await env.deliver(ALICE, message(f"m{n}"))

    def session() -> tuple[list[bytes], bytes, list[bytes], bytes, list[bytes]]:
        wire = env.wire()
        wire.ok("SELECT INBOX")
        wire.ok("STORE 2 +FLAGS (\\Flagged $Keep)")
        moved, done = wire.command("MOVE 2 INBOX")
        uid_moved, uid_done = wire.command("UID MOVE 1 INBOX")
        flags = wire.ok("UID FETCH 1:* (FLAGS)")
        wire.close()
        return moved, done, uid_moved, uid_done, flags

    moved, done, uid_moved, uid_done, flags = await in_thread(session)
    assert b" OK " in done and b" OK " in uid_done
    # COPYUID first, in an untagged OK (RFC 6851 §4.3), then the expunge and the new EXISTS.
    assert moved[0].startswith(b"* OK [COPYUID ") and b" 2 4]" in moved[0], moved
    assert moved[1:] == [b"* 2 EXPUNGE\r\n", b"* 3 EXISTS\r\n"], moved
    assert b" 1 5]" in uid_moved[0], uid_moved
    assert uid_moved[1:] == [b"* 1 EXPUNGE\r\n", b"* 3 EXISTS\r\n"], uid_moved
    uids = [int(m) for line in flags for m in re.findall(rb"UID (\d+)", line)]
    assert uids == [3, 4, 5]
    assert b"$Keep" in next(line for line in flags if b"UID 4" in line)


async def test_move_to_itself_with_qresync_answers_vanished(env: Env) -> None:
    await env.deliver(ALICE, message("only"))

    def session() -> list[bytes]:
        wire = env.wire()
        wire.ok("ENABLE QRESYNC")
        wire.ok("SELECT INBOX")
        moved = wire.ok("UID MOVE 1 INBOX")
        wire.close()
        return moved

    moved = await in_thread(session)
    assert moved[0].startswith(b"* OK [COPYUID ") and b" 1 2]" in moved[0], moved
    assert moved[1:] == [b"* VANISHED 1\r\n", b"* 1 EXISTS\r\n"], moved
