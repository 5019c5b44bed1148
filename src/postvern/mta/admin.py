"""The operations behind ``postvern queue list|show|retry|delete``.

They work on a :class:`~postvern.mta.queue.QueueStore` (the CLI opens one on the queue file
while the server may be running; SQLite's WAL lets both work) and return plain data plus a
text rendering. ``list`` never shows message text; ``show`` shows the header section only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from postvern.encdb import write_transaction
from postvern.mta.dsn import header_block
from postvern.mta.queue import EntryInfo, EntryNotFound, QueueStore, RecipientState

# ``show`` prints the header section, bounded so a pathological message cannot flood a
# terminal; the rest is summarised by its size.
MAX_SHOWN_HEADERS = 64 * 1024


@dataclass(frozen=True, slots=True)
class RecipientLine:
    address: str
    state: str
    attempts: int
    next_attempt: float | None  # unix time; None once delivered or failed
    last_error: str | None  # the last diagnostic ("smtp; 451 ...") unless delivered
    remote_mta: str | None
    tls: str | None


@dataclass(frozen=True, slots=True)
class EntrySummary:
    id: str
    created: float
    age: float  # seconds in the queue
    sender: str  # "<>" for the null sender
    size: int
    next_attempt: float | None
    recipients: tuple[RecipientLine, ...]


@dataclass(frozen=True, slots=True)
class EntryDetail:
    summary: EntrySummary
    envid: str | None
    ret: str | None
    smtputf8: bool
    headers: str  # the header section as text (UTF-8, undecodable bytes replaced)


def list_entries(store: QueueStore, *, now: float | None = None) -> list[EntrySummary]:
    """Every entry in the queue, oldest first, without message text."""
    now = time.time() if now is None else now
    return [_summary(info, now) for info in store.list_entries()]


def show_entry(store: QueueStore, entry_id: str, *, now: float | None = None) -> EntryDetail:
    """One entry with its header section; raises :class:`EntryNotFound`."""
    now = time.time() if now is None else now
    entry = store.entry(entry_id)
    if entry is None:
        raise EntryNotFound(entry_id)
    headers = header_block(entry.message)[:MAX_SHOWN_HEADERS]
    return EntryDetail(
        summary=_summary(entry.info, now),
        envid=entry.info.envid,
        ret=entry.info.ret,
        smtputf8=entry.info.smtputf8,
        headers=headers.decode("utf-8", "replace"),
    )


def retry_entries(store: QueueStore, entry_id: str | None = None) -> int:
    """Make pending recipients due now (one entry, or every entry with None).

    Returns how many recipients were rescheduled; raises :class:`EntryNotFound` for an
    unknown id. Then :func:`postvern.mta.wake.wake` makes a running server's MTA act at once
    (``OutboundMTA.wake`` in the same process); otherwise it notices within a minute.
    """
    with write_transaction(store.conn):
        if entry_id is not None and store.info(entry_id) is None:
            raise EntryNotFound(entry_id)
        count = store.reschedule(entry_id, time.time())
    return count


def delete_entry(store: QueueStore, entry_id: str) -> None:
    """Remove an entry and its message for good (no notification is sent)."""
    with write_transaction(store.conn):
        if not store.delete(entry_id):
            raise EntryNotFound(entry_id)


# --- Text rendering -------------------------------------------------------------------------


def format_list(entries: list[EntrySummary], *, now: float | None = None) -> str:
    """Postfix ``mailq``-like text: one block per entry, one line per recipient."""
    if not entries:
        return ""  # the CLI says "no queued messages" on stderr, as every empty list does
    now = time.time() if now is None else now
    lines = []
    for e in entries:
        nxt = _when(e.next_attempt, now) if e.next_attempt is not None else "-"
        lines.append(
            f"{e.id}  {e.size:>9} bytes  age {_duration(e.age)}  next {nxt}  from {e.sender}"
        )
        for r in e.recipients:
            lines.append(f"    {r.state:<9} {r.address}  (attempts {r.attempts})")
            if r.last_error:
                lines.append(f"              last error: {r.last_error}")
        lines.append("")
    lines.append(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in the queue.")
    return "\n".join(lines) + "\n"


def format_detail(detail: EntryDetail, *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    s = detail.summary
    lines = [
        f"Queue id:   {s.id}",
        f"Sender:     {s.sender}",
        f"Queued:     {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(s.created))} UTC "
        f"({_duration(s.age)} ago)",
        f"Size:       {s.size} bytes",
    ]
    if detail.envid:
        lines.append(f"ENVID:      {detail.envid}")
    if detail.ret:
        lines.append(f"RET:        {detail.ret}")
    lines.append("Recipients:")
    for r in s.recipients:
        nxt = f", next {_when(r.next_attempt, now)}" if r.next_attempt is not None else ""
        via = f", via {r.remote_mta} (tls {r.tls or 'none'})" if r.remote_mta else ""
        lines.append(f"  {r.address}: {r.state}, {r.attempts} attempts{nxt}{via}")
        if r.last_error:
            lines.append(f"    last error: {r.last_error}")
    lines += ["Headers:", detail.headers.rstrip("\r\n").replace("\r\n", "\n")]
    return "\n".join(lines) + "\n"


def _summary(info: EntryInfo, now: float) -> EntrySummary:
    recipients = tuple(
        RecipientLine(
            address=r.address,
            state=str(r.state),
            attempts=r.attempts,
            next_attempt=r.next_attempt if r.state is RecipientState.PENDING else None,
            last_error=r.diagnostic if r.state is not RecipientState.DELIVERED else None,
            remote_mta=r.remote_mta,
            tls=r.tls,
        )
        for r in info.recipients
    )
    return EntrySummary(
        id=info.id,
        created=info.created,
        age=max(0.0, now - info.created),
        sender=info.mail_from or "<>",
        size=info.size,
        next_attempt=info.next_attempt,
        recipients=recipients,
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _when(moment: float, now: float) -> str:
    return "now" if moment <= now else f"in {_duration(moment - now)}"
