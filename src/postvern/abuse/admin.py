"""What ``postvern ban list|add|remove`` needs: an Abuse opened for one command, and its table.

The command runs in its own process next to the server. Its changes reach a running server
through the shared database file (the server rereads it when SQLite's ``data_version``
moves) and, where Redis is configured, through the shared ban feed at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from postvern.abuse.bans import Ban, utc_text
from postvern.abuse.service import Abuse
from postvern.config import Settings

HEADER = ("ADDRESS", "UNTIL", "OFFENCES", "REASON")


@contextlib.asynccontextmanager
async def opened(settings: Settings, data_dir: Path, key: bytes) -> AsyncIterator[Abuse]:
    """An Abuse started for one operator command and closed after it (no resolver needed)."""
    abuse = Abuse(settings, data_dir, key)
    await abuse.start()
    try:
        yield abuse
    finally:
        await abuse.close()


def ban_table(bans: Sequence[Ban], now: float | None = None) -> list[str]:
    """Aligned lines for ``postvern ban list``: address, until (or "expired"), offences, reason.

    A header comes first when there are bans; no bans make no lines at all (the command
    then says "no bans" on stderr, as every empty list does).
    """
    if not bans:
        return []
    moment = time.time() if now is None else now
    rows = [HEADER] + [
        (
            ban.network,
            utc_text(ban.until) if ban.active(moment) else "expired",
            str(ban.offences),
            ban.reason,
        )
        for ban in bans
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        for row in rows
    ]
