"""Backups of a server whose directory is in PostgreSQL: snapshot, verify, wipe, restore, log in.

The directory is a real private PostgreSQL (tests/pg_server.py, TLS verify-full); the
snapshots go to SeaweedFS (tests/seaweed.py) as two regions. The snapshot holds the
directory's export (directory/pgdump.py), sealed and encrypted like every object; ``verify``
loads it into a scratch schema that it rolls back (or, without the right to make one, checks
it with the server key alone); ``restore`` loads it into the configured database, refusing
one that holds a directory unless told. The end-to-end test wipes the database and the data
directory, restores both, and the users log in over IMAP and read their mail.
"""

from __future__ import annotations

import imaplib
import json
import shutil
import time
from pathlib import Path

import psycopg
import pytest

from backup_kit import append, configure, deposit, init_key, message
from cli_kit import postvern
from harness import DataDir, ServerProcess, client_tls_context
from pg_server import PgDatabase, PostgresTestServer, make_pg_data_dir
from postvern.app import App
from postvern.backup.snapshot import DIRECTORY_EXPORT
from postvern.backup.targets import open_target
from postvern.crypto.serverkey import ServerKey
from postvern.directory import Directory, pgdump
from postvern.directory.pg import SCHEMA_TABLE, connection_params

ALICE = "alice@example.test"
BOB = "bob@example.test"


def _connect(database: PgDatabase) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(autocommit=True, **connection_params(database.target()))


def _wipe(database: PgDatabase) -> None:
    """What a lost database server leaves: nothing of the directory at all."""
    with _connect(database) as conn:
        conn.execute("DROP OWNED BY CURRENT_USER")
        assert not conn.execute(
            "SELECT 1 FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchall()


def _bucket(seaweed, tmp_path: Path) -> list[str]:  # type: ignore[no-untyped-def]
    a, b = seaweed
    name = f"pg-{tmp_path.name[-12:].lower().replace('_', '-')}-{time.time_ns() % 10**9}"
    return [a.url(name), b.url(name)]


def _read_inbox(data: DataDir, address: str, password: str) -> list[bytes]:
    host, port = data.addr("imaps")
    with imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30) as imap:
        imap.login(address, password)
        imap.select("INBOX")
        _, found = imap.search(None, "ALL")
        bodies = []
        for number in found[0].split():
            _, parts = imap.fetch(number, "(BODY.PEEK[])")
            item = parts[0]
            assert isinstance(item, tuple)
            bodies.append(item[1])
        return bodies


def test_the_export_holds_every_table_of_the_directory(pg_database: PgDatabase) -> None:
    """A migration that adds a table must add it to pgdump.TABLES too, or backups miss it."""
    opened = Directory.open_postgres(pg_database.target(), ServerKey.generate().derive("d"))
    opened.close()
    with _connect(pg_database) as conn:
        tables = {
            str(r[0])
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchall()
        }
    assert tables - {SCHEMA_TABLE} == set(pgdump.TABLES)


def test_wipe_the_database_restore_and_log_in_again(
    tmp_path: Path, pg_database: PgDatabase, seaweed
) -> None:  # type: ignore[no-untyped-def]
    data = make_pg_data_dir(tmp_path / "data", pg_database)
    targets = _bucket(seaweed, tmp_path)
    configure(data, targets)
    key_file = tmp_path / "offline.key"
    init_key(data, key_file)
    append(data, ALICE, [message("alice-in-the-mailbox-3141")])
    deposit(data, BOB, message("bob-in-the-spool-2718"))
    app = App.open(data.path)
    try:
        phone = app.accounts.add_app_password(ALICE, data.passwords[ALICE], "phone")
        app.directory.add_alias("team@example.test", [ALICE, BOB])
        dkim = {k.selector: k.private_key for k in app.directory.dkim_keys("example.test")}
    finally:
        app.close()
    assert not (data.path / "directory.sqlite").exists()

    run = postvern("--data", str(data.path), "backup", "run")
    assert run.returncode == 0, run.stderr
    # Nothing of the directory is readable in the bucket: no address, no domain.
    target = open_target(targets[0])
    for prefix in ("m/", "b/", "o/"):
        for name in target.list(prefix):
            blob = target.get(name)
            for needle in (b"alice", b"example.test", b"postvern-directory-dump", b"keyslots"):
                assert needle not in blob, (name, needle)
    # An unchanged directory is not exported anew: its stamp is that of the last export.
    again = postvern("--data", str(data.path), "backup", "run", "--kind", "delta")
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout

    verified = postvern("--data", str(data.path), "backup", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "loaded into a scratch schema" in verified.stdout
    assert "2 user(s)" in verified.stdout
    with _connect(pg_database) as conn:  # the scratch schema was rolled back with its rows
        assert not conn.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname LIKE %s", (pgdump.SCRATCH_PREFIX + "%",)
        ).fetchall()

    # Disaster: the database and the data directory are both gone.
    listen = data.listen
    _wipe(pg_database)
    shutil.rmtree(data.path)
    restored = tmp_path / "restored"
    done = postvern(
        "backup", "restore", "--key-file", str(key_file), "--to", str(restored),
        *[arg for url in targets[:1] for arg in ("--target", url)],
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "directory loaded into PostgreSQL" in done.stdout and "2 user(s)" in done.stdout
    assert not (restored / DIRECTORY_EXPORT).exists()  # loaded, so no longer kept

    back = DataDir(restored, "example.test", listen, dict(data.passwords))
    with ServerProcess(back):
        assert any(b"alice-in-the-mailbox-3141" in m for m in _read_inbox(back, ALICE, phone))
        assert any(
            b"bob-in-the-spool-2718" in m for m in _read_inbox(back, BOB, data.passwords[BOB])
        )
    app = App.open(restored)
    try:
        team = app.directory.resolve("team@example.test")
        assert team is not None and {u.address for u in team.users} == {ALICE, BOB}
        restored_dkim = app.directory.dkim_keys("example.test")
        assert {k.selector: k.private_key for k in restored_dkim} == dkim
        # New rows take ids past the restored ones (identity sequences moved on).
        app.accounts.add_app_password(ALICE, data.passwords[ALICE], "laptop")
    finally:
        app.close()

    # The database holds a directory now: a second restore refuses to overwrite it ...
    twice = tmp_path / "twice"
    urls = [arg for url in targets[1:] for arg in ("--target", url)]
    refused = postvern("backup", "restore", "--key-file", str(key_file), "--to", str(twice), *urls)
    assert refused.returncode != 0 and "already holds a directory" in refused.stderr
    assert (twice / DIRECTORY_EXPORT).exists()  # kept, to load once the database is right
    # ... until told to, and then the export replaces it whole.
    loaded = postvern("--data", str(twice), "directory", "load-export", "--replace-directory")
    assert loaded.returncode == 0, loaded.stderr
    app = App.open(twice)
    try:
        assert [s.label for s in app.directory.slots(app.directory.user(ALICE).id, "app")] == [  # type: ignore[union-attr]
            "phone"
        ]
    finally:
        app.close()


def test_verify_names_a_key_slot_that_no_longer_opens(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    """A row altered in the database (a slot moved to another user) is backed up as it is;
    verify opens every sealed slot with the server key and names the one that fails."""
    data = make_pg_data_dir(tmp_path / "data", pg_database)
    configure(data, [f"file://{tmp_path / 'backups'}"])
    init_key(data, tmp_path / "offline.key")
    app = App.open(data.path)
    try:
        alice, bob = app.directory.user(ALICE), app.directory.user(BOB)
        assert alice is not None and bob is not None
        app.directory._rows(
            "UPDATE keyslots SET user_id=? WHERE user_id=? AND kind='recovery'", (bob.id, alice.id)
        )
    finally:
        app.close()
    assert postvern("--data", str(data.path), "backup", "run").returncode == 0
    verified = postvern("--data", str(data.path), "backup", "verify")
    assert verified.returncode == 1
    assert "FAILED directory.pgdump: a recovery key slot does not open" in verified.stdout


def test_verify_without_the_right_to_a_scratch_schema_checks_the_export_alone(
    tmp_path: Path, pg_server: PostgresTestServer, pg_database: PgDatabase
) -> None:
    data = make_pg_data_dir(tmp_path / "data", pg_database)
    configure(data, [f"file://{tmp_path / 'backups'}"])
    init_key(data, tmp_path / "offline.key")
    with _connect(pg_database) as conn:  # the owner gives up its right to make schemas
        conn.execute(f"REVOKE CREATE ON DATABASE {pg_database.name} FROM CURRENT_USER")
    assert postvern("--data", str(data.path), "backup", "run").returncode == 0
    verified = postvern("--data", str(data.path), "backup", "verify")
    assert verified.returncode == 0, verified.stdout
    assert "checked with the server key; no scratch schema" in verified.stdout
    assert "2 user(s)" in verified.stdout


def test_a_sealed_export_cut_short_or_altered_does_not_open(tmp_path: Path) -> None:
    key = ServerKey.generate()
    plain = b'{"format":"x"}\n' + b"y" * (pgdump.CHUNK_BYTES + 10)
    path = tmp_path / "export"
    pgdump.write_sealed(path, pgdump.dump_key(key), plain)
    assert plain not in path.read_bytes() and b"format" not in path.read_bytes()
    assert pgdump.read_sealed(path, pgdump.dump_key(key)) == plain
    whole = path.read_bytes()
    first_chunk_end = len(pgdump.SEAL_MAGIC) + pgdump.FILE_ID_BYTES + 4 + 12 + pgdump.CHUNK_BYTES
    first_chunk_end += pgdump.TAG_BYTES
    path.write_bytes(whole[:first_chunk_end])  # the last chunk dropped
    with pytest.raises(pgdump.DumpError, match="does not open"):
        pgdump.read_sealed(path, pgdump.dump_key(key))
    path.write_bytes(whole)
    with pytest.raises(pgdump.DumpError, match="does not open"):
        pgdump.read_sealed(path, pgdump.dump_key(ServerKey.generate()))


def test_the_running_server_replicates_and_verifies_its_postgres_directory(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    """The server's own schedule: replication points carry the directory's changes (a user
    added on another node, say) within seconds, and the scheduled test restore loads the
    export into a scratch schema."""
    data = make_pg_data_dir(tmp_path / "data", pg_database)
    configure(data, [f"file://{tmp_path / 'region'}"], replicate_seconds=1.0,
              verify_interval_hours=2 / 3600)  # fmt: skip
    init_key(data, tmp_path / "offline.key")
    server = ServerProcess(data).start()
    try:
        _wait(data, "a verified backup", lambda s: s.get("verify_ok") is True)
        app = App.open(data.path)  # as an administrator's command on another node would
        try:
            app.accounts.create_user("carol@example.test", "carol-correct-horse")
        finally:
            app.close()
        added = time.time()
        # A snapshot that started after carol was committed holds her (verify shows it).
        _wait(
            data,
            "a replication point after the directory changed",
            lambda s: float(str(s.get("backup_started") or 0)) > added,
        )
    finally:
        server.stop()
    verified = postvern("--data", str(data.path), "backup", "verify")
    assert verified.returncode == 0, verified.stdout
    assert "3 user(s)" in verified.stdout and "scratch schema" in verified.stdout


def _wait(data: DataDir, what: str, check) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """The server's backup status once ``check`` holds (tests/test_backup_schedule.py's way)."""
    deadline = time.monotonic() + 90
    while True:
        try:
            status = dict(json.loads((data.path / "backup" / "status.json").read_text()))
        except (FileNotFoundError, ValueError):
            status = {}
        if check(status):
            return status
        assert time.monotonic() < deadline, f"waited in vain for {what}: {status}"
        time.sleep(0.2)
