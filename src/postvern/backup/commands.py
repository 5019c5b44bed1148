"""``postvern backup …``, ``postvern import`` and ``postvern export``: the command-line side.

Each command prints one line per result on stdout, progress bars (rich) on stderr, and any
failure as one ``postvern: …`` line on stderr with a non-zero exit, like every other command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from postvern import config
from postvern.backup import importer, keys
from postvern.backup.catalog import Catalog
from postvern.backup.manifest import ManifestError, Opening
from postvern.backup.restore import RestoreError, load_directory, restore_all, restore_user
from postvern.backup.service import BackupBusy, BackupService
from postvern.backup.snapshot import BackupError
from postvern.backup.targets import TargetError, Targets
from postvern.crypto.serverkey import ServerKey, ServerKeyError
from postvern.directory.accounts import AuthFailed

FAILURES = (
    importer.ImportError_,
    AuthFailed,
    BackupError,
    BackupBusy,
    TargetError,
    ManifestError,
    RestoreError,
    keys.BackupKeyError,
    ServerKeyError,
    config.ConfigError,
    FileNotFoundError,
    PermissionError,
    ValueError,
)


class CommandError(Exception):
    pass


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except AuthFailed:
            print("postvern: wrong address or password", file=sys.stderr)
            return 1
        except (CommandError, *FAILURES) as e:
            print(f"postvern: {e}", file=sys.stderr)
            return 1

    return run


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (hidden when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _data_dir(args: argparse.Namespace) -> Path:
    data: Path = args.data
    if not (data / config.CONFIG_NAME).exists():
        raise CommandError(f"no data directory at {data}")
    return data


def _service(args: argparse.Namespace) -> BackupService:
    data = _data_dir(args)
    settings = config.load(data)
    urls = args.target or settings.backup.targets
    if not urls:
        raise CommandError("no backup target: set [backup] targets in postvern.toml or --target")
    return BackupService(data, settings, ServerKey.load(data), targets=Targets.from_urls(urls))


def _when(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as the operator reads a clock
    return moment.timestamp()


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


# -- backup ------------------------------------------------------------------------------


@_command
def cmd_backup_init(args: argparse.Namespace) -> int:
    data = _data_dir(args)
    if (data / keys.BACKUP_DIR / keys.OFFLINE_PUBLIC_FILE).exists() and not args.replace:
        raise CommandError("an offline backup key exists already (--replace makes a new one)")
    offline, public = keys.generate(ServerKey.load(data))
    keys.save_public(data, public)
    text = offline.encode()
    if args.key_file is not None:
        fd = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        print(f"offline backup key written to {args.key_file}: move it off this machine")
    else:
        print(text)
    print(
        "This key is shown once and not kept here. Without it, a backup cannot be restored"
        " on a new machine. Store it offline (paper, a USB stick in a safe).",
        file=sys.stderr,
    )
    return 0


@_command
def cmd_backup_run(args: argparse.Namespace) -> int:
    service = _service(args)
    service.refuse_if_serving()
    with service.locked(wait=False), progress_bar("snapshot", None) as advance:
        result = service.run(args.kind, advance)
    if result is None:
        print("nothing changed since the last snapshot")
        return 0
    m = result.manifest
    print(
        f"snapshot {m.id} ({m.kind}): {result.files_read} file(s) read,"
        f" {result.uploaded_bytes} bytes uploaded to {len(service.targets.targets)} target(s)"
        f" in {result.seconds:.1f} s"
    )
    return 0


@_command
def cmd_backup_list(args: argparse.Namespace) -> int:
    service = _service(args)
    catalog = Catalog(service.targets.targets[0], service.opening())
    summaries, problems = catalog.summaries()
    for problem in problems:
        print(f"postvern: {problem}", file=sys.stderr)
    for s in summaries:
        base = f" (on {s.base})" if s.base else ""
        print(f"{s.id}  {_iso(s.created)}  {s.kind}{base}")
    if not summaries:
        print("postvern: no snapshots", file=sys.stderr)
    return 1 if problems else 0


@_command
def cmd_backup_verify(args: argparse.Namespace) -> int:
    service = _service(args)
    with progress_bar("verify", None) as advance:
        report = service.verify(args.snapshot, advance)
    for problem in report.problems:
        print(f"FAILED {problem}")
    for note in report.notes:
        print(note)
    if report.ok:
        print(
            f"snapshot {report.snapshot} verified on {len(service.targets.targets)} target(s):"
            f" {report.files} file(s), {report.users} user(s), {report.objects} object(s)"
            f" in {report.seconds:.1f} s"
        )
        return 0
    return 1


@_command
def cmd_backup_restore(args: argparse.Namespace) -> int:
    if args.user:
        return _restore_user(args)
    if args.key_file is None or args.to is None:
        raise CommandError("a whole restore needs --key-file (the offline key) and --to DIR")
    offline = keys.OfflineKey.load(args.key_file)
    urls: list[str] = args.target
    if not urls:
        raise CommandError("name the target(s) to restore from with --target")
    targets = Targets.from_urls(urls)
    problems: list[str] = []
    for target in targets.targets:  # the first target that restores cleanly wins
        catalog = Catalog(target, Opening(offline=offline))
        try:
            point = catalog.point(args.snapshot) if args.snapshot else catalog.at(_when(args.at))
            total = len({p.obj for e in point.files.values() for p in e.pieces})
            with progress_bar("restore", total) as advance:
                report = restore_all(
                    catalog,
                    point,
                    args.to,
                    server_root=catalog.opening.server_root(point.header),
                    progress=advance,
                )
        except (ManifestError, TargetError) as e:
            problems.append(f"{target.url}: {e}")
            continue
        if report.problems:
            problems += [f"{target.url}: {p}" for p in report.problems]
            continue
        print(
            f"restored snapshot {point.summary.id} of {_iso(point.summary.created)} into"
            f" {args.to}: {report.files} file(s), {report.bytes} bytes in {report.seconds:.1f} s"
        )
        loaded = load_directory(args.to, replace=args.replace_directory)
        if loaded is not None:
            print(loaded)
        return 0
    for problem in problems:
        print(f"FAILED {problem}")
    return 1


def _restore_user(args: argparse.Namespace) -> int:
    from postvern.app import App

    service = _service(args)
    service.refuse_if_serving()
    app = App.open(service.data_dir)
    try:
        user = app.directory.user(args.user)
        if user is None:
            raise CommandError(f"no user {args.user}")
        with service.locked(wait=False):
            catalog = Catalog(service.targets.targets[0], service.opening())
            point = catalog.point(args.snapshot) if args.snapshot else catalog.at(_when(args.at))
            report = restore_user(catalog, point, service.data_dir, user.id)
    finally:
        app.close()
    if report.problems:
        for problem in report.problems:
            print(f"FAILED {problem}")
        return 1
    print(f"restored the mailbox of {args.user} as of {_iso(point.summary.created)}")
    return 0


# -- registration --------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add the ``backup`` group and the ``import``/``export`` commands to the CLI."""
    p = sub.add_parser("backup", help="encrypted snapshots: init, run, list, verify, restore")
    g = p.add_subparsers(dest="backup_command", metavar="ACTION", required=True)
    p = g.add_parser("init", help="make the offline backup key; prints its private half once")
    p.add_argument("--key-file", type=Path, help="write the key to this new file instead")
    p.add_argument("--replace", action="store_true", help="replace an existing offline key")
    p.set_defaults(func=cmd_backup_init)
    for name, fn, text in (
        ("run", cmd_backup_run, "take a snapshot now (the server must be stopped)"),
        ("list", cmd_backup_list, "list the snapshots of the first target"),
        ("verify", cmd_backup_verify, "download, check and test-restore a snapshot"),
    ):
        p = g.add_parser(name, help=text)
        p.add_argument("--target", action="append", default=[], metavar="URL",
                       help="instead of [backup] targets (repeatable)")  # fmt: skip
        if name == "run":
            p.add_argument("--kind", choices=("full", "delta"), default="full")
        if name == "verify":
            p.add_argument("snapshot", nargs="?", help="snapshot id (default: the newest)")
        p.set_defaults(func=fn)
    p = g.add_parser("restore", help="restore a whole server, or one user's mailbox")
    p.add_argument("--target", action="append", default=[], metavar="URL")
    p.add_argument("--key-file", type=Path, help="the offline backup key (whole restore)")
    p.add_argument("--to", type=Path, help="the new data directory (whole restore)")
    p.add_argument("--user", metavar="ADDRESS", help="restore only this user's mailbox")
    p.add_argument("--at", metavar="TIME", help="ISO 8601 time (default: the newest snapshot)")
    p.add_argument("--snapshot", metavar="ID")
    p.add_argument(
        "--replace-directory",
        action="store_true",
        help="overwrite the PostgreSQL database [directory] names even if it holds a directory",
    )
    p.set_defaults(func=cmd_backup_restore)
    from postvern.backup import transfer

    transfer.register(sub, _command)
