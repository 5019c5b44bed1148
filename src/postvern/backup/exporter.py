"""Exporting a mailbox to mbox (one file per folder) or Maildir (Maildir++ sub-folders).

This writes the user's mail in clear where they asked for it, with flags and dates: the
files are created 0600 in a 0700 directory. It needs the user's password, like any reading
of the mailbox.
"""

from __future__ import annotations

import mailbox
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postvern.backup.importer import FLAGS_TO_MAILDIR, FLAGS_TO_MBOX
from postvern.store.mailbox import INBOX, Mailbox

FORMATS = ("mbox", "maildir")


@dataclass
class ExportResult:
    messages: int = 0
    folders: int = 0


def count(box: Mailbox) -> int:
    return sum(len(box.uids(f.id)) for f in box.folders())


def _safe(name: str) -> str:
    return name.replace("/", ".").replace(os.sep, "_").lstrip(".") or "_"


def export(
    box: Mailbox, dest: Path, fmt: str, progress: Callable[[int], None] | None = None
) -> ExportResult:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    result = ExportResult()
    root = None
    if fmt == "maildir":
        for sub in ("tmp", "new", "cur"):  # Maildir(create=True) makes these only for a new dir
            (dest / sub).mkdir(mode=0o700, exist_ok=True)
        root = mailbox.Maildir(dest, create=True)
    for folder in box.folders():
        result.folders += 1
        infos = box.messages(folder.id)
        if fmt == "mbox":
            out: mailbox.Mailbox = mailbox.mbox(dest / f"{_safe(folder.name)}.mbox", create=True)
        else:
            assert root is not None
            out = root if folder.name == INBOX else root.add_folder(_safe(folder.name))
        out.lock()
        try:
            for info in infos:
                raw = box.raw(folder.id, info.uid)
                stamp = info.internaldate.timestamp()
                if fmt == "mbox":
                    m = mailbox.mboxMessage(raw)
                    m.set_from("MAILER-DAEMON", time.gmtime(stamp))
                    m.set_flags("".join(FLAGS_TO_MBOX[f] for f in info.flags if f in FLAGS_TO_MBOX))
                else:
                    m = mailbox.MaildirMessage(raw)  # type: ignore[assignment]
                    m.set_subdir("cur")  # type: ignore[attr-defined]
                    m.set_flags(
                        "".join(
                            sorted(FLAGS_TO_MAILDIR[f] for f in info.flags if f in FLAGS_TO_MAILDIR)
                        )
                    )
                    m.set_date(stamp)  # type: ignore[attr-defined]
                out.add(m)
                result.messages += 1
                if progress is not None:
                    progress(1)
            out.flush()
        finally:
            out.unlock()
            if fmt == "mbox":
                out.close()
    return result
