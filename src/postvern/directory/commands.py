"""``postvern directory status``, ``copy-to-postgres`` and ``load-export``.

``status`` says where the directory is (the SQLite file, or PostgreSQL's host and database),
its schema version, and how many users each mailbox node holds. ``copy-to-postgres`` is the
move from one machine to a cluster's directory: with ``[directory] url`` (and its CA and
password file) set, it copies the data directory's SQLite directory into the empty
PostgreSQL database, after which the server reads only PostgreSQL (docs/cluster.md).
``load-export`` loads the directory export that a whole ``backup restore`` left in a restored
data directory (directory/pgdump.py) once the database is right.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from postvern import config
from postvern.app import App, open_directory
from postvern.crypto.serverkey import ServerKey
from postvern.directory.copy import copy_directory
from postvern.directory.db import DB_NAME, Directory, DirectoryError


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "directory", help="where the directory is; copy it into PostgreSQL"
    ).add_subparsers(dest="directory_command", metavar="ACTION", required=True)
    p = group.add_parser("status", help="backend, schema version, users per mailbox node")
    p.set_defaults(func=cmd_directory_status)
    p = group.add_parser(
        "copy-to-postgres",
        help="copy this data directory's SQLite directory into the empty [directory] url",
    )
    p.set_defaults(func=cmd_directory_copy)
    p = group.add_parser(
        "load-export",
        help="load a restored snapshot's directory export into the [directory] url",
    )
    p.add_argument(
        "--replace-directory",
        action="store_true",
        help="overwrite the database even if it holds a directory",
    )
    p.set_defaults(func=cmd_directory_load)


def _where(settings: config.Settings) -> str:
    if not settings.directory.url:
        return f"SQLite, {settings.data_dir / DB_NAME}"
    from postvern.directory.pg import PostgresTarget

    return f"PostgreSQL, {PostgresTarget(settings.directory.url).describe()} (TLS verify-full)"


def cmd_directory_status(args: argparse.Namespace) -> int:
    app = App.open(Path(args.data))
    try:
        print(f"directory: {_where(app.settings)}")
        version = app.directory.schema_version()
        print(f"schema version: {version}")
        print(f"domains: {len(app.directory.domains())}, users: {len(app.directory.users())}")
        for node, count in app.directory.mailbox_nodes().items():
            print(f"node {node}: {count} user(s)")
    finally:
        app.close()
    return 0


def cmd_directory_copy(args: argparse.Namespace) -> int:
    data = Path(args.data)
    settings = config.load(data)
    if not settings.directory.url:
        raise DirectoryError("set [directory] url (with ca and password_file) first")
    server_key = ServerKey.load(data)
    source = Directory.open(data, server_key.derive("directory database"))
    try:
        target = open_directory(settings, server_key, None)
        try:
            counts = copy_directory(source, target)
        finally:
            target.close()
    finally:
        source.close()
    copied = ", ".join(f"{n} {table}" for table, n in counts.items() if n)
    print(f"copied into {_where(settings)}: {copied}")
    print(f"the server now reads PostgreSQL only; {DB_NAME} can be kept as a copy or removed")
    return 0


def cmd_directory_load(args: argparse.Namespace) -> int:
    """The export a whole restore could not load (the database was not empty, or [directory]
    was not set yet): load it now."""
    from postvern.backup.restore import RestoreError, load_directory

    try:
        loaded = load_directory(Path(args.data), replace=args.replace_directory)
    except RestoreError as e:
        raise DirectoryError(str(e)) from None
    if loaded is None:
        raise DirectoryError(f"no directory export in {args.data} (nothing to load)")
    print(loaded)
    return 0
