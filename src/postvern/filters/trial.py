"""Trying the content filter on mail from elsewhere: a user's own archive, another corpus.

``postvern filter check FILE…`` prints the verdict on each message and
``postvern filter test --ham PATH --spam PATH`` how much of each kind the filter junks,
as Mox's ``junk test`` does: before trusting the shipped model with their mail, an
administrator can measure it on mail they know, and see which of their ham it would junk
and why. Only the content filter runs (the model, the phishing and attachment rules); the
virus scan is clamd's and the sender's authentication is the SMTP session's, neither of
which a stored message still has.

A PATH is a message file, an mbox file (its first line starts with "From "), or a
directory of either, walked in name order, a directory's files before its subdirectories.
Hidden files and directories are skipped (a Maildir++ folder such as ``.Junk`` is tried
by naming it); in a Maildir only ``cur`` and ``new`` are read. Messages are read one at
a time, so a large mbox costs the memory of its largest message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from postvern.filters import FilterSettings, ScanContext, analyse, decide
from postvern.filters.spam import MODEL_POINTS_FULL, shipped_model
from postvern.filters.verdict import Verdict

# A message larger than this is skipped (and counted): the SMTP server refuses such mail
# before the filter ever sees it, and one stray disk image must not exhaust memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Misjudged messages listed per kind, with their verdicts.
DEFAULT_SHOWN = 10

KINDS = ("ham", "spam", "phish")
KIND_NAMES = {"ham": "ham (wanted mail)", "spam": "spam", "phish": "phishing"}


class TrialError(Exception):
    """A path that cannot be read as mail."""


@dataclass(frozen=True, slots=True)
class Message:
    name: str  # the file, with "#n" for the n-th message of an mbox
    raw: bytes


def read_messages(path: Path) -> Iterator[Message]:
    """Every message under *path* (see the module's description); unreadable paths raise
    TrialError, and each file or message larger than MAX_MESSAGE_BYTES is yielded as an
    empty Message so that the caller can count it."""
    if not path.exists():
        raise TrialError(f"{path}: no such file or directory")
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if "cur" in dirs or "new" in dirs:
                # A Maildir: its mail is in cur/ and new/ (tmp/ holds deliveries not yet
                # done); beside them are the server's files (dovecot-uidlist, indexes).
                dirs[:] = [d for d in dirs if d != "tmp"]
                continue
            for name in sorted(files):
                if not name.startswith("."):
                    yield from _file_messages(Path(root) / name)
    else:
        yield from _file_messages(path)


def _file_messages(path: Path) -> Iterator[Message]:
    try:
        with path.open("rb") as f:
            if f.read(5) == b"From ":
                f.seek(0)
                yield from mbox_messages(f, str(path))
                return
            f.seek(0)
            if path.stat().st_size > MAX_MESSAGE_BYTES:
                yield Message(str(path), b"")
            else:
                yield Message(str(path), f.read())
    except OSError as exc:
        raise TrialError(f"{path}: {exc.strerror or exc}") from None


def mbox_messages(f: BinaryIO, name: str = "mbox") -> Iterator[Message]:
    """The messages of an mbox read from *f*, one at a time. A message starts at a line
    beginning "From " (RFC 4155); mboxrd's quoting of body lines (">From ", ">>From ")
    is undone."""
    lines: list[bytes] = []
    size, count, started = 0, 0, False
    for line in f:
        if line.startswith(b"From "):
            if started:
                yield _mbox_message(lines, size, f"{name}#{count}")
                count += 1
            lines, size, started = [], 0, True
            continue
        if not started:
            continue
        if size <= MAX_MESSAGE_BYTES:
            if line.startswith(b">") and line.lstrip(b">").startswith(b"From "):
                line = line[1:]
            lines.append(line)
        size += len(line)
    if started:
        yield _mbox_message(lines, size, f"{name}#{count}")


def _mbox_message(lines: list[bytes], size: int, name: str) -> Message:
    return Message(name, b"" if size > MAX_MESSAGE_BYTES else b"".join(lines))


@dataclass(slots=True)
class Tally:
    """How the filter judged the messages of one kind."""

    messages: int = 0
    skipped: int = 0  # too large to judge
    failed: int = 0  # the filter raised: counted and named, the trial goes on
    junked_by_model: int = 0  # the spam model alone is past its threshold
    junked: int = 0  # the whole verdict: junk or reject
    seconds: float = 0.0  # CPU time of judging
    misjudged: list[tuple[str, str]] = field(default_factory=list)  # (name, verdict header)


def judge(raw: bytes, ctx: ScanContext) -> tuple[Verdict, bool]:
    """The verdict on *raw*, and whether the model alone is past its threshold (its full
    voice, MODEL_POINTS_FULL: what would junk the message if the model junked alone)."""
    analysis = analyse(raw, ctx)
    verdict = decide(analysis, ctx.settings)
    model = sum(h.points for h in analysis.hits if h.code == "SPAM_MODEL")
    return verdict, model >= MODEL_POINTS_FULL


def run_trial(
    paths: dict[str, Iterable[Path]], ctx: ScanContext | None = None, shown: int = DEFAULT_SHOWN
) -> dict[str, Tally]:
    """Judge every message under the *paths* of each kind ("ham", "spam", "phish")."""
    ctx = ctx or ScanContext(settings=FilterSettings())
    shipped_model()  # loaded once, before the clock runs
    tallies: dict[str, Tally] = {}
    for kind, kind_paths in paths.items():
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        tally = tallies[kind] = Tally()
        for path in kind_paths:
            for message in read_messages(path):
                _count(tally, kind, message, ctx, shown)
    return tallies


def _count(tally: Tally, kind: str, message: Message, ctx: ScanContext, shown: int) -> None:
    if not message.raw:
        tally.skipped += 1
        return
    started = time.process_time()
    try:
        verdict, model_junks = judge(message.raw, ctx)
    except Exception as exc:  # one message the filter trips on must not end the trial
        tally.failed += 1
        if len(tally.misjudged) < shown:
            tally.misjudged.append((message.name, f"not judged: {type(exc).__name__}"))
        return
    tally.seconds += time.process_time() - started
    tally.messages += 1
    tally.junked_by_model += model_junks
    tally.junked += verdict.is_spam
    if verdict.is_spam != (kind != "ham") and len(tally.misjudged) < shown:
        tally.misjudged.append((message.name, verdict.header()))


def report(tallies: dict[str, Tally]) -> list[str]:
    """Lines for a person: per kind the share junked (ham: false positives; spam and
    phishing: recall), then the speed, then the misjudged messages with their reasons."""
    lines = [f"{'':24}{'model alone':>22}{'full verdict':>22}"]
    for kind, tally in tallies.items():
        what = "ham junked (false pos.)" if kind == "ham" else f"{kind} junked (recall)"
        cells = [
            _share(tally.junked_by_model, tally.messages),
            _share(tally.junked, tally.messages),
        ]
        lines.append(f"{what:24}" + "".join(f"{c:>22}" for c in cells))
        if tally.failed:
            lines.append(f"  ({tally.failed} {kind} messages the filter failed on, listed below)")
        if tally.skipped:
            lines.append(
                f"  ({tally.skipped} {kind} messages over {MAX_MESSAGE_BYTES >> 20} MiB skipped)"
            )
    total = sum(t.messages for t in tallies.values())
    seconds = sum(t.seconds for t in tallies.values())
    if total and seconds:
        lines.append(f"speed: {total / seconds:,.0f} messages/s on one core ({total} messages)")
    for kind, tally in tallies.items():
        if tally.misjudged:
            wrong = "junked" if kind == "ham" else "not junked"
            lines.append(f"{kind} {wrong} (first {len(tally.misjudged)}):")
            lines += [f"  {name}\n    {header}" for name, header in tally.misjudged]
    return lines


def _share(part: int, whole: int) -> str:
    if not whole:
        return "-"
    return f"{100.0 * part / whole:.2f}% ({part}/{whole})"
