"""Measure, in a process of its own, what sleeping mailboxes give back to the system.

Run by tests/test_idle_close.py with the venv's python in a fresh subprocess, so the RSS it
reads is this process's alone: a test runner that has already held hundreds of MiB keeps
free heap memory the waking mailboxes reuse, and then waking them shows no growth at all.

    python tests/trim_probe.py DATA_DIR [--no-trim]   (JSON {address: password} on stdin)

It opens every user's mailbox through the registry as a session does (unlock, then what
SELECT and FETCH read), puts each session in IDLE so the mailbox hibernates
(``MailboxRegistry._arm_hibernation``), waits until every mailbox sleeps and the
``malloc_trim`` that follows has run, and prints one JSON line of VmRSS figures (KiB):
``before`` (after a warm-up and one malloc_trim), ``awake`` and ``asleep``.

``--no-trim`` is the control: ``service.MALLOC_TRIM = None``, exactly what the registry
does on a C library without malloc_trim (musl), so the same run shows what the process
keeps without the trim.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from postvern.app import App
from postvern.directory.accounts import Unlocked
from postvern.store import service
from postvern.store.mailbox import INBOX
from postvern.store.service import MailboxHandle, MailboxRegistry

WARM_UP = 4  # mailboxes opened and closed before the baseline: one-off costs (imports, caches)
FETCHED = 5  # messages each session reads whole, as a client opening its newest mail
WAIT_SECONDS = 300.0  # the whole sleep must finish within this, or the probe fails


def rss_kib() -> int:
    """This process's resident set (VmRSS), in KiB."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    assert match is not None
    return int(match.group(1))


async def until(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not check():
        if loop.time() > deadline:
            raise SystemExit(f"trim_probe: timed out waiting until {what}")
        await asyncio.sleep(0.05)


def read_like_a_session(handle: MailboxHandle) -> int:
    """What SELECT and FETCH of the newest messages read; the bytes read."""
    box = handle.box
    inbox = box.folder(INBOX).id
    uids = box.uids(inbox)
    box.messages(inbox)
    return sum(len(box.raw(inbox, uid)) for uid in uids[-FETCHED:])


async def session(registry: MailboxRegistry, unlocked: Unlocked) -> MailboxHandle:
    handle = await registry.unlock(unlocked.user, unlocked.mailbox_key)
    assert await handle.run(read_like_a_session, handle) > 0
    return handle


async def probe(data: Path, passwords: dict[str, str], trim: bool) -> dict[str, int]:
    real_trim = service.MALLOC_TRIM
    assert real_trim is not None, "no malloc_trim in this C library"
    if not trim:
        service.MALLOC_TRIM = None  # the registry then never trims (as on musl)
    app = App.open(data)
    registry = MailboxRegistry(app.accounts)
    try:
        users = [app.accounts.authenticate(a, p) for a, p in sorted(passwords.items())]
        for handle in [await session(registry, u) for u in users[:WARM_UP]]:
            await handle.release()
        await until(lambda: registry.unlocked_count == 0, "the warm-up mailboxes closed")
        await until(lambda: not registry.trim_pending, "the warm-up's trim ran")
        real_trim(0)  # the baseline holds no free pages the mailboxes could reuse
        before = rss_kib()

        handles = [await session(registry, u) for u in users]
        awake = rss_kib()
        requests = registry.trim_requests
        for handle in handles:
            handle.quiet()  # the session enters IDLE
        # Every mailbox asked for a trim as it fell asleep and none is armed or running:
        # the last one ran after the last mailbox slept.
        await until(
            lambda: registry.trim_requests - requests == len(users) and not registry.trim_pending,
            "every mailbox asleep and the trim after the last one done",
        )
        assert all(h.box.hibernating for h in handles)
        asleep = rss_kib()
        trims = registry.trims

        # A sleeping mailbox still works: the next call wakes it.
        assert await handles[0].run(read_like_a_session, handles[0]) > 0
        for handle in handles:
            await handle.release()
        return {
            "mailboxes": len(users),
            "before": before,
            "awake": awake,
            "asleep": asleep,
            "trims": trims,
        }
    finally:
        await registry.close()
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--no-trim", action="store_true", help="the control: never malloc_trim")
    args = parser.parse_args()
    passwords = json.load(sys.stdin)  # never on the command line (ps shows it)
    result = asyncio.run(probe(args.data, passwords, trim=not args.no_trim))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
