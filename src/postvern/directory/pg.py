"""The directory in PostgreSQL (issue #20; docs/cluster.md, "Directory in PostgreSQL").

Several nodes share one directory; the embedded SQLite file stays the default for one
machine. :class:`~postvern.directory.db.Directory` keeps its API and its SQL: this module
gives it a connection with the same small face as the apsw one it uses —
``execute(sql, args).fetchall()``, ``changes()``, and ``with conn:`` as a (nested)
transaction — and the PostgreSQL spelling of the schema. The SQL is written to run on both:
``?`` placeholders (turned into psycopg's ``%s`` here), ``ON CONFLICT`` upserts, ``RETURNING``
for new ids, integer flags compared as ``=1``.

Connections cross a network, so they are TLS with ``sslmode=verify-full`` against a
configured root CA, always: a URL that asks for less (``disable``, ``allow``, ``prefer``,
``require``, ``verify-ca``) is refused, even to 127.0.0.1. The one exception is a Unix socket
(``host=/run/postgresql``), which never leaves the machine. The password comes from a file
(``[directory] password_file``, mode 0600) or the certificate is the credential
(``client_cert``/``client_key``); neither the URL nor any password is ever put in a message.

What is secret stays encrypted as it is in SQLite, where the whole file is encrypted: TOTP
secrets are sealed under their own server subkey, recovery codes, API tokens and invitations
are keyed hashes, e2e keys are public. What the SQLite file protected by its own encryption
is sealed here before it is written (ChaCha20-Poly1305 under a subkey of the directory key,
bound to the row it belongs to): DKIM private keys, and the wrapped mailbox key of every key
slot — wrapped already under an Argon2id-derived key, but readable it would let whoever holds
a dump guess users' passwords offline, which a stolen SQLite file without the server key does
not. Addresses, aliases and forwards are not secret but are visible to whoever can read the
database, as in any mail server's directory.

Writers on different nodes are serialised as SQLite serialises its writers: every
transaction first takes one advisory lock (``pg_advisory_xact_lock``), so the check-then-write
sequences of the directory (a name is neither a user nor an alias, then insert) stay atomic
across nodes. Reads take no lock. Calls are synchronous, like the SQLite directory's: the
server makes them from worker threads, never on the event loop. A process keeps a small pool
of connections (directory/pgpool.py, ``[directory] pool``), so its callers do not wait out
each other's round trips.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from psycopg import conninfo

from postvern import config
from postvern.directory.nodes import V8

if TYPE_CHECKING:
    from postvern.directory.pgpool import PGPool

log = logging.getLogger(__name__)

SCHEMES = ("postgresql://", "postgres://")
TLS_MODE = "verify-full"
# A node that cannot reach the directory should say so soon, not hang a login: libpq's
# default is to wait forever.
CONNECT_TIMEOUT_S = 10
# TCP keepalives find a directory server that vanished (failover, a cut link) within about
# a minute instead of the kernel's two hours.
KEEPALIVES_IDLE_S = 30
KEEPALIVES_INTERVAL_S = 10
KEEPALIVES_COUNT = 3
# A transaction waits this long for another node's to finish before it fails: directory
# transactions last milliseconds, so a wait this long means a stuck node, not load.
LOCK_TIMEOUT = "30s"
# The key of the advisory lock every directory transaction takes ("pvdir" in ASCII): one
# number that no other user of the database is likely to pick.
ADVISORY_LOCK = 0x7076646972
# The longest password file read: a password is a line, not a file of any size.
MAX_PASSWORD_FILE = 4096
NONCE_BYTES = 12
# A process's connections at most ([directory] pool): far beyond any worker thread count;
# a typo should not open a thousand.
MAX_POOL = 32
# Schema versions are the SQLite directory's: version N holds the same tables in both.
SCHEMA_TABLE = "postvern_schema"


class InsecureDirectory(ValueError):
    """The PostgreSQL settings would not give an encrypted, verified connection."""


class SchemaTooNew(Exception):
    """The database was written by a newer Postvern; refusing to guess its layout."""


@dataclass(frozen=True, slots=True)
class PostgresTarget:
    """Where the directory is and how to reach it safely ([directory] settings)."""

    url: str
    ca: Path | None = None  # root CA of the server's certificate ("system": the OS store)
    client_cert: Path | None = None
    client_key: Path | None = None
    password_file: Path | None = None
    # Connections a process keeps at most (directory/pgpool.py); 1: one, calls in turn. Four
    # took most of the measured gain with the server's 6 worker threads on 2 cores
    # (docs/cluster.md); the database sees nodes × worker processes × this at most.
    pool: int = 4

    def describe(self) -> str:
        """Host, port and database, for messages: never the user's password."""
        try:
            p = conninfo.conninfo_to_dict(self.url)
        except psycopg.ProgrammingError:
            return "an unparsable URL"
        return f"{p.get('host', '?')}:{p.get('port', '5432')}/{p.get('dbname', '?')}"


def target_from_settings(settings: config.Settings) -> PostgresTarget | None:
    """The [directory] settings as a target (paths relative to the data directory); None
    when the directory is the SQLite file."""
    db = settings.directory
    if not db.url:
        return None
    if not 1 <= db.pool <= MAX_POOL:
        raise config.ConfigError(f"[directory] pool must be between 1 and {MAX_POOL}")

    def path(value: str | None) -> Path | None:
        return None if value is None else settings.path(value)

    return PostgresTarget(
        db.url,
        ca=None if db.ca is None else (Path("system") if db.ca == "system" else path(db.ca)),
        client_cert=path(db.client_cert),
        client_key=path(db.client_key),
        password_file=path(db.password_file),
        pool=db.pool,
    )


def _unix_socket(host: str) -> bool:
    return host.startswith("/") or host.startswith("@")


def connection_params(target: PostgresTarget) -> dict[str, Any]:
    """libpq parameters for ``target``, with TLS forced; :class:`InsecureDirectory` if the
    URL asks for less, names no host, or no root CA is configured."""
    if not target.url.startswith(SCHEMES):
        raise InsecureDirectory("the directory URL must start with postgresql://")
    try:
        params: dict[str, Any] = dict(conninfo.conninfo_to_dict(target.url))
    except psycopg.ProgrammingError:
        raise InsecureDirectory("the directory URL cannot be parsed") from None
    if params.get("password"):
        # A URL is shown, logged and pasted into tickets; a password belongs in a 0600 file.
        raise InsecureDirectory("put the password in [directory] password_file, not the URL")
    hosts = [h for h in str(params.get("host", "")).split(",") if h]
    if not hosts or params.get("hostaddr"):
        # libpq's default host may be a socket or localhost depending on how it was built;
        # a cluster's directory is named, not guessed. hostaddr would skip the name check.
        raise InsecureDirectory("the directory URL must name its host (and no hostaddr)")
    if not all(_unix_socket(h) for h in hosts):
        mode = params.get("sslmode")
        if mode not in (None, TLS_MODE):
            raise InsecureDirectory(
                f"the directory URL asks for sslmode={mode}: only {TLS_MODE} is accepted "
                "over a network (a Unix socket needs none)"
            )
        ca = target.ca or params.get("sslrootcert")
        if not ca:
            raise InsecureDirectory(
                "a PostgreSQL directory over TCP needs [directory] ca, the root CA that "
                "signed the server's certificate"
            )
        params.update(sslmode=TLS_MODE, sslrootcert=str(ca))
    if target.client_cert is not None:
        params.update(sslcert=str(target.client_cert), sslkey=str(target.client_key or ""))
    if target.password_file is not None:
        params["password"] = read_password(target.password_file)
    params.update(
        connect_timeout=CONNECT_TIMEOUT_S,
        keepalives=1,
        keepalives_idle=KEEPALIVES_IDLE_S,
        keepalives_interval=KEEPALIVES_INTERVAL_S,
        keepalives_count=KEEPALIVES_COUNT,
        gssencmode="disable",  # TLS is the encryption; no Kerberos probe first
        application_name="postvern",
        options=f"-c lock_timeout={LOCK_TIMEOUT}",
    )
    return params


def read_password(path: Path) -> str:
    """The first line of a password file that only its owner can read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            raise InsecureDirectory(f"{path}: readable by others; chmod 600 it")
        data = os.read(fd, MAX_PASSWORD_FILE)
    finally:
        os.close(fd)
    return data.decode().splitlines()[0] if data.strip() else ""


@functools.lru_cache(maxsize=512)
def to_psycopg(sql: str) -> str:
    """``?`` placeholders → ``%s``, and a literal ``%`` doubled, outside quoted strings."""
    out = []
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "%":
            out.append("%%")
        elif ch == "?" and not quoted:
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


class Rows:
    """An executed statement's result, as apsw's cursor gives it: ``fetchall()``."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self._cursor.description is None:
            return []  # INSERT/UPDATE/DELETE without RETURNING: apsw gives no rows either
        return list(self._cursor.fetchall())


class PGConnection:
    """One PostgreSQL connection with the face :class:`Directory` uses (see the module doc).

    Not thread-safe by itself: the directory holds its lock around every use, as it does
    for the apsw connection. A connection the server dropped (a restart, a failover) is
    replaced at the next statement outside a transaction; the statement that met the
    failure raises, as any database error does.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._conn = connect()
        self._transactions: list[AbstractContextManager[Any]] = []
        self._changes = 0

    def _usable(self) -> psycopg.Connection[Any]:
        if not self._transactions and (self._conn.closed or self._conn.broken):
            self._conn = self._connect()
        return self._conn

    def _once_more(self, error: psycopg.OperationalError) -> bool:
        """Whether a statement that failed may run again on a new connection: only outside
        a transaction (there it is a read: the directory writes only in transactions), and
        only when the connection itself broke (a restart, a failover), not the statement."""
        if self._transactions or not self._conn.broken:
            return False
        log.warning("directory connection lost (%s); reconnecting", type(error).__name__)
        return True

    def execute(self, sql: str, args: Sequence[object] = ()) -> Rows:
        try:
            return self._execute(sql, args)
        except psycopg.OperationalError as e:
            if not self._once_more(e):
                raise
        return self._execute(sql, args)

    def _execute(self, sql: str, args: Sequence[object]) -> Rows:
        conn = self._usable()
        if args:
            cursor = conn.execute(to_psycopg(sql), tuple(args))
        else:
            cursor = conn.execute(sql)  # our own constant SQL: no placeholders to convert
        self._changes = max(cursor.rowcount, 0)
        return Rows(cursor)

    def changes(self) -> int:
        """Rows the last statement changed (apsw's ``changes()``)."""
        return self._changes

    def __enter__(self) -> PGConnection:
        conn = self._usable()
        transaction = conn.transaction()  # the outermost is BEGIN, the inner ones SAVEPOINTs
        try:
            transaction.__enter__()
        except psycopg.OperationalError as e:
            if not self._once_more(e):
                raise
            conn = self._usable()
            transaction = conn.transaction()
            transaction.__enter__()
        self._transactions.append(transaction)
        if len(self._transactions) == 1:
            try:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
            except BaseException as e:
                self.__exit__(type(e), e, e.__traceback__)
                raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        transaction = self._transactions.pop()
        transaction.__exit__(kind, value, tb)

    def close(self) -> None:
        self._conn.close()


def connect(target: PostgresTarget) -> PGConnection | PGPool:
    """Connect (TLS verified, see :func:`connection_params`) and bring the schema up to date;
    a pool of up to ``target.pool`` connections when that is over 1 (directory/pgpool.py)."""
    from postvern.directory.pgpool import PGPool

    params = connection_params(target)

    def fresh() -> psycopg.Connection[Any]:
        # autocommit: a lone read is its own statement; transactions are explicit (``with``).
        return psycopg.connect(autocommit=True, **params)

    conn = PGConnection(fresh)
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    if target.pool == 1:
        return conn
    return PGPool(conn, lambda: PGConnection(fresh), target.pool)


# -- the schema ------------------------------------------------------------------------

# The directory as the SQLite migrations 1 to 7 leave it, in PostgreSQL's types: BIGINT for
# every integer (quotas and times outgrow 32 bits), BYTEA for blobs, identity columns for
# SQLite's INTEGER PRIMARY KEY. Flags stay integers so the same SQL ("enabled=1") runs on
# both. users.rowid stands in for SQLite's implicit rowid: the creation order that breaks
# ties of ``created`` (the first user receives postmaster@ mail).
BASELINE_V7 = """
CREATE TABLE domains(
    name TEXT PRIMARY KEY,
    created BIGINT NOT NULL,
    attachment_policy TEXT
);
CREATE TABLE users(
    id TEXT PRIMARY KEY,
    localpart TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name),
    quota BIGINT NOT NULL DEFAULT 0,
    spool_public BYTEA NOT NULL,
    created BIGINT NOT NULL,
    usage_hint BIGINT NOT NULL DEFAULT 0,
    rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    UNIQUE(localpart, domain)
);
CREATE TABLE keyslots(
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK(kind IN ('password', 'app', 'recovery', 'passkey')),
    label TEXT,
    tag BYTEA,
    salt BYTEA NOT NULL,
    nonce BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL,
    params TEXT NOT NULL,
    created BIGINT NOT NULL,
    last_used BIGINT
);
CREATE INDEX keyslots_user ON keyslots(user_id, kind);
CREATE UNIQUE INDEX keyslots_tag ON keyslots(tag) WHERE tag IS NOT NULL;
CREATE TABLE aliases(
    localpart TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    targets TEXT NOT NULL,
    PRIMARY KEY(localpart, domain)
);
-- private_key and keyslots.ciphertext are sealed (pg.py): the database is not encrypted as
-- the SQLite file is.
CREATE TABLE dkim_keys(
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    selector TEXT NOT NULL,
    algorithm TEXT NOT NULL CHECK(algorithm IN ('rsa-sha256', 'ed25519-sha256')),
    private_key BYTEA NOT NULL,
    created BIGINT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY(domain, selector)
);
CREATE TABLE e2e_keys(
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    openpgp BYTEA,
    smime BYTEA,
    encrypt TEXT CHECK(encrypt IN ('openpgp', 'smime')),
    subject TEXT NOT NULL DEFAULT 'kept' CHECK(subject IN ('kept', 'hidden')),
    publish INTEGER NOT NULL DEFAULT 0,
    updated BIGINT NOT NULL
);
CREATE TABLE totp(
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    secret BYTEA NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 0,
    last_step BIGINT NOT NULL DEFAULT 0,
    created BIGINT NOT NULL
);
CREATE TABLE recovery_codes(
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    digest BYTEA NOT NULL UNIQUE,
    created BIGINT NOT NULL
);
CREATE TABLE passkeys(
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    credential_id BYTEA NOT NULL UNIQUE,
    public_key BYTEA NOT NULL,
    sign_count BIGINT NOT NULL,
    name TEXT NOT NULL,
    prf_salt BYTEA,
    created BIGINT NOT NULL,
    last_used BIGINT
);
CREATE TABLE api_tokens(
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    digest BYTEA NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    created BIGINT NOT NULL,
    last_used BIGINT,
    UNIQUE(user_id, name)
);
CREATE TABLE account_settings(
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL DEFAULT 'user' CHECK(role IN ('user', 'admin')),
    disabled INTEGER NOT NULL DEFAULT 0,
    junk_threshold DOUBLE PRECISION
);
CREATE TABLE sender_lists(
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK(kind IN ('allow', 'block')),
    entry TEXT NOT NULL,
    PRIMARY KEY(user_id, kind, entry)
);
CREATE TABLE login_history(
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    at BIGINT NOT NULL,
    network TEXT NOT NULL,
    method TEXT NOT NULL
);
CREATE INDEX login_history_user ON login_history(user_id, at);
CREATE TABLE invitations(
    digest BYTEA PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    quota BIGINT NOT NULL,
    expires BIGINT NOT NULL
);
CREATE TABLE forwards(
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    targets TEXT NOT NULL,
    keep_copy INTEGER NOT NULL DEFAULT 1,
    updated BIGINT NOT NULL
);
"""

# version reached → the SQL that reaches it from the version before. A PostgreSQL directory
# starts at 7 in one step (there was none before); every later migration is written for both
# dialects under the SQLite migration's number. A shipped migration never changes.
MIGRATIONS: dict[int, str] = {7: BASELINE_V7, 8: V8}
LATEST = max(MIGRATIONS)


def schema_version(conn: PGConnection | PGPool) -> int:
    rows = conn.execute(f"SELECT version FROM {SCHEMA_TABLE}").fetchall()
    return int(rows[0][0]) if rows else 0


def migrate(conn: PGConnection) -> None:
    """Bring the schema up to :data:`LATEST`, each step in its own transaction.

    Every step holds the advisory lock, so nodes starting together migrate once: the second
    finds the version already moved on.
    """
    with conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE}(version INTEGER NOT NULL)")
        if not conn.execute(f"SELECT 1 FROM {SCHEMA_TABLE}").fetchall():
            conn.execute(f"INSERT INTO {SCHEMA_TABLE}(version) VALUES(0)")
    while True:
        with conn:
            version = schema_version(conn)
            if version > LATEST:
                raise SchemaTooNew(
                    f"directory schema version {version} is newer than this Postvern"
                )
            steps = [v for v in sorted(MIGRATIONS) if v > version]
            if not steps:
                return
            conn.execute(MIGRATIONS[steps[0]])
            conn.execute(f"UPDATE {SCHEMA_TABLE} SET version=?", (steps[0],))


# -- sealed columns --------------------------------------------------------------------


class ColumnSeal:
    """ChaCha20-Poly1305 for the secret columns the SQLite file protected by itself alone
    (DKIM private keys, key slots' wrapped keys), under a subkey of the directory key, bound
    to what the value is for (``context``): a sealed value copied to another row does not
    open there."""

    def __init__(self, directory_key: bytes) -> None:
        subkey = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=b"postvern directory columns v1",
            info=b"sealed columns",
        ).derive(directory_key)
        self._aead = ChaCha20Poly1305(subkey)

    def seal(self, value: bytes, context: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, value, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
