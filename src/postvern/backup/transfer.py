"""``postvern import USER SOURCE`` and ``postvern export USER``: the command-line side.

Both open the user's mailbox with the user's password (``--password-stdin`` reads it as the
first line of standard input; an IMAP source's password is the second line). Both refuse
while the server runs: the server is the mailbox's one writer, and its sessions would not
hear of messages stored from outside.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postvern import config
from postvern.backup import exporter, importer
from postvern.backup.service import BackupBusy, server_running
from postvern.store.mailbox import INBOX, Mailbox


class _Lines:
    def __init__(self, from_stdin: bool) -> None:
        self.from_stdin = from_stdin

    def read(self, prompt: str) -> str:
        if self.from_stdin:
            line = sys.stdin.readline()
            if not line:
                raise importer.ImportError_(f"expected a line on standard input for: {prompt}")
            return line.rstrip("\r\n")
        return getpass.getpass(f"{prompt}: ")


def _open(args: argparse.Namespace, lines: _Lines) -> tuple[Any, Mailbox]:
    from postvern.app import App

    data: Path = args.data
    if not (data / config.CONFIG_NAME).exists():
        raise importer.ImportError_(f"no data directory at {data}")
    if server_running(data):
        raise BackupBusy("the server is running: stop it first (it is the mailbox's one writer)")
    app = App.open(data)
    try:
        unlocked = app.accounts.authenticate(args.user, lines.read(f"password of {args.user}"))
        box = Mailbox.open(app.accounts.mailbox_path(unlocked.user), unlocked.mailbox_key)
    except BaseException:
        app.close()
        raise
    return app, box


def cmd_import(args: argparse.Namespace) -> int:
    from postvern.backup.commands import progress_bar

    lines = _Lines(args.password_stdin)
    app, box = _open(args, lines)
    try:
        password = None
        if args.source.startswith(("imap://", "imaps://")):
            password = lines.read("password at the source")
        source = importer.open_source(args.source, password, args.folder)
        try:
            total = sum(source.count(f) for f in source.folders())
            with progress_bar("import", total) as advance:
                result = importer.import_into(box, source, advance)
        finally:
            source.close()
    finally:
        box.close()
        app.close()
    print(
        f"imported {result.imported} message(s) into {result.folders} folder(s)"
        + (f"; {result.skipped} done by an earlier run" if result.skipped else "")
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from postvern.backup.commands import progress_bar

    app, box = _open(args, _Lines(args.password_stdin))
    try:
        with progress_bar("export", exporter.count(box)) as advance:
            result = exporter.export(box, args.to, args.format, advance)
    finally:
        box.close()
        app.close()
    print(f"exported {result.messages} message(s) of {result.folders} folder(s) to {args.to}")
    return 0


def register(sub: Any, command: Callable[[Callable[[argparse.Namespace], int]], Any]) -> None:
    p = sub.add_parser("import", help="import mail from an mbox, a Maildir or an IMAP server")
    p.add_argument("user", metavar="USER", help="the address of the mailbox to fill")
    p.add_argument(
        "source", metavar="SOURCE", help="an mbox file, a Maildir, or imap[s]://USER@HOST"
    )
    p.add_argument("--folder", default=INBOX, help="the folder an mbox goes into (default INBOX)")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password (and then the source's) from standard input",
    )
    p.set_defaults(func=command(cmd_import))
    p = sub.add_parser("export", help="export a mailbox to mbox files or a Maildir")
    p.add_argument("user", metavar="USER")
    p.add_argument("--to", type=Path, required=True, help="the directory to write")
    p.add_argument("--format", choices=exporter.FORMATS, default="mbox")
    p.add_argument("--password-stdin", action="store_true")
    p.set_defaults(func=command(cmd_export))
