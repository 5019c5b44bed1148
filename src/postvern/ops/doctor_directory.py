"""``postvern doctor``'s directory check: where the directory is, and whether it is sound.

For the SQLite file there is one line (the backend; the file's modes are the data check's).
For PostgreSQL ([directory] url, docs/cluster.md) each fact is its own line, looked at on a
connection of the check's own — not the server's — so that it says what a node starting now
would meet:

* ``directory``: the backend and where;
* ``directory reachable``: a connection opens (with the reason libpq gives when not);
* ``directory tls``: the settings ask for verify-full (or a Unix socket), and the server's
  certificate verified against [directory] ca — a failed verification is named as such,
  not as an unreachable server;
* ``directory schema``: the schema version is this Postvern's (older: not migrated yet;
  newer: a newer Postvern wrote it, and this one refuses to start on it);
* ``directory nodes`` (with [cluster] set, on either backend): users whose mailbox node is
  not a mailbox node of nodes.toml fail (their logins and deliveries fail); users without a
  node yet are a warning — a front places them at first use by rendezvous hashing, so it is
  not wrong, but a drained or failed node's users should not be among them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from postvern import config
from postvern.directory.db import DB_NAME, Directory
from postvern.ops.doctor import Result, Status

if TYPE_CHECKING:
    import psycopg

# How many node names a line names; the rest are counted.
SHOWN_NODES = 3


def check_directory(s: config.Settings) -> list[Result]:
    if not s.directory.url:
        return [Result("directory", Status.OK, f"SQLite, {s.data_dir / DB_NAME}")]
    from postvern.directory import pg  # loads psycopg: only for a PostgreSQL directory

    target = pg.target_from_settings(s)
    assert target is not None
    where = Result("directory", Status.OK, f"PostgreSQL, {target.describe()}")
    try:
        params = pg.connection_params(target)
    except pg.InsecureDirectory as e:
        return [where, Result("directory tls", Status.FAIL, str(e))]
    started = time.monotonic()
    try:
        conn = pg.psycopg.connect(autocommit=True, **params)
    except pg.psycopg.OperationalError as e:
        reason = " ".join(line.strip() for line in str(e).splitlines()) or type(e).__name__
        if "certificate" in reason or "SSL" in reason:
            detail = f"the server's certificate does not verify against [directory] ca: {reason}"
            return [where, Result("directory tls", Status.FAIL, detail)]
        return [where, Result("directory reachable", Status.FAIL, reason)]
    try:
        ms = (time.monotonic() - started) * 1000
        return [
            where,
            Result("directory reachable", Status.OK, f"connected in {ms:.0f} ms"),
            _tls(conn, params),
            _schema(conn),
        ]
    finally:
        conn.close()


def _tls(conn: psycopg.Connection[tuple[object, ...]], params: dict[str, object]) -> Result:
    if "sslmode" not in params:  # connection_params leaves it out for a Unix socket only
        return Result("directory tls", Status.OK, "a Unix socket: never leaves the machine")
    if not conn.pgconn.ssl_in_use:
        return Result("directory tls", Status.FAIL, "the connection is not encrypted")
    # The server's own view of this connection (its own row is visible to any role).
    rows = conn.execute(
        "SELECT version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    ).fetchall()
    protocol = " ".join(str(v) for v in rows[0]) if rows else "TLS"
    return Result(
        "directory tls",
        Status.OK,
        f"{protocol}, the server's certificate and name verified ({params['sslmode']})",
    )


def _schema(conn: psycopg.Connection[tuple[object, ...]]) -> Result:
    from postvern.directory.pg import LATEST, SCHEMA_TABLE

    try:
        rows = conn.execute(f"SELECT version FROM {SCHEMA_TABLE}").fetchall()
    except Exception as e:  # UndefinedTable: an empty database
        return Result("directory schema", Status.FAIL, f"no directory here ({type(e).__name__})")
    version = int(str(rows[0][0])) if rows else 0
    if version < LATEST:
        return Result(
            "directory schema",
            Status.FAIL,
            f"version {version}, this Postvern's is {LATEST}: not migrated yet (the server"
            " migrates it when it starts)",
        )
    if version > LATEST:
        return Result(
            "directory schema",
            Status.FAIL,
            f"version {version} was written by a newer Postvern (this one knows {LATEST})",
        )
    return Result("directory schema", Status.OK, f"version {version}, current")


def check_node_map(s: config.Settings, directory: Directory) -> list[Result]:
    """With [cluster]: every user's mailbox node is a mailbox node of nodes.toml."""
    if not s.cluster.role:
        return []
    from postvern.cluster import nodes
    from postvern.cluster.nodes import ClusterError

    try:
        known = {n.name for n in nodes.mailbox_nodes(nodes.load(s.path(nodes.CLUSTER_DIR)))}
    except (ClusterError, OSError) as e:
        return [Result("directory nodes", Status.FAIL, f"cannot read nodes.toml: {e}")]
    placed = directory.mailbox_nodes()
    total = len(directory.users())
    unplaced = total - sum(placed.values())
    stray = {node: n for node, n in placed.items() if node not in known}
    if stray:
        names = ", ".join(f"{node} ({n})" for node, n in sorted(stray.items())[:SHOWN_NODES])
        more = len(stray) - SHOWN_NODES
        names += f" and {more} more" if more > 0 else ""
        return [
            Result(
                "directory nodes",
                Status.FAIL,
                f"{sum(stray.values())} user(s) on node(s) that are not mailbox nodes of"
                f" nodes.toml: {names}",
            )
        ]
    spread = ", ".join(f"{node} {n}" for node, n in sorted(placed.items())) or "none"
    if unplaced:
        return [
            Result(
                "directory nodes",
                Status.WARN,
                f"{unplaced} of {total} user(s) have no mailbox node yet (placed at first"
                f" use); placed: {spread}",
            )
        ]
    return [Result("directory nodes", Status.OK, f"{total} user(s) placed: {spread}")]
