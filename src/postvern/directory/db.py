"""The directory database: who exists, where their mail goes, and the slots that hold their keys.

It is encrypted with a key derived from the server key, because it holds secrets (wrapped
mailbox keys, later TOTP seeds and DKIM private keys). It never holds a mailbox key or a
plaintext password. Methods are synchronous and thread-safe; the server calls them from a
worker thread.

Two backends, one class and one SQL: the encrypted SQLite file (:meth:`Directory.open`, one
machine, the default) and PostgreSQL for several nodes (:meth:`Directory.open_postgres`,
``[directory] url``; directory/pg.py says how the seam works and what it seals). In a cluster
the directory also says which mailbox node holds each user — ``mailbox_node(user_id)``,
``set_mailbox_node(user_id, node)``, ``move_mailbox_node(user_id, from_node, to_node)``,
``users_on_node(node)``, ``mailbox_nodes()``, ``set_user_moving(user_id, moving)``,
``user_moving(user_id)``, ``node_state(user_id)`` (directory/nodes.py documents each).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import apsw

from postvern.accounts.schema import migrate_v6
from postvern.crypto.keyslots import KDFParams, WrappedKey
from postvern.directory.addresses import (
    AddressError,
    base_localpart,
    normalise_address,
    normalise_domain,
    split_address,
)
from postvern.directory.forwarding import Forwarding, ForwardingPolicy, migrate_v7
from postvern.directory.nodes import V8, NodeState, valid_node_name
from postvern.encdb import open_encrypted

if TYPE_CHECKING:
    from postvern.directory.pg import ColumnSeal, PostgresTarget

DB_NAME = "directory.sqlite"
# An alias pointing at an alias pointing at … is followed this deep, then refused: a loop
# or a chain this long is a configuration mistake, not a mail route.
MAX_ALIAS_DEPTH = 10
MAX_ALIAS_TARGETS = 1000
# Addresses every hosted domain must have without any set-up: postmaster (RFC 5321 §4.5.1)
# and abuse (RFC 2142 §4). Unless a user or alias of that name exists in the domain, they
# reach the administrator: the configured ``postmaster`` address, else the first user created.
ROLE_LOCALPARTS = ("postmaster", "abuse")


class DirectoryError(Exception):
    """An administrative request that cannot be carried out (message says why)."""


class Result(Protocol):
    def fetchall(self) -> list[tuple[Any, ...]]: ...


class Connection(Protocol):
    """What the directory needs of its database connection: apsw's, or the PostgreSQL one
    in directory/pg.py that has the same face. ``with conn:`` is a transaction (nested:
    a savepoint); ``changes()`` counts the rows the last statement changed."""

    def execute(self, statements: str, bindings: Any = None, /) -> Result: ...

    def changes(self) -> int: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, kind: Any, value: Any, tb: Any, /) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class User:
    id: str
    localpart: str
    domain: str
    quota: int
    spool_public: bytes = field(repr=False)
    created: int = 0

    @property
    def address(self) -> str:
        return f"{self.localpart}@{self.domain}"


@dataclass(frozen=True, slots=True)
class KeySlot:
    id: int
    user_id: str
    kind: str  # "password" | "app" | "recovery"
    label: str | None
    wrapped: WrappedKey
    created: int
    last_used: int | None


@dataclass(frozen=True, slots=True)
class Alias:
    localpart: str  # "" is the catch-all of the domain
    domain: str
    targets: tuple[str, ...]

    @property
    def address(self) -> str:
        return f"{self.localpart}@{self.domain}" if self.localpart else f"@{self.domain}"


@dataclass(frozen=True, slots=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: str
    private_key: bytes = field(repr=False)
    created: int = 0
    active: bool = True


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a recipient's mail goes: local mailboxes and outside addresses.

    ``problems`` names what the expansion met on the way — a local target that does not
    exist, an alias chain that loops back on itself or runs too deep. A resolution with no
    mailbox and no outside address is a dead end: the mail would go nowhere, so the caller
    must refuse it rather than accept it (``routing_loop`` says which refusal fits).
    """

    users: tuple[User, ...]
    external: tuple[str, ...]
    problems: tuple[str, ...] = ()
    routing_loop: bool = False

    @property
    def dead_end(self) -> bool:
        return not self.users and not self.external


@dataclass
class _Expansion:
    """The state of one alias expansion: what it found, and where it went wrong."""

    users: dict[str, User] = field(default_factory=dict)
    external: dict[str, None] = field(default_factory=dict)
    problems: dict[str, None] = field(default_factory=dict)
    routing_loop: bool = False
    done: set[str] = field(default_factory=set)  # aliases already expanded (a diamond is no loop)
    # Whether each domain met is one of ours, asked once per expansion: an alias of many
    # targets in one domain would otherwise ask for every target (a round trip each when
    # the directory is in PostgreSQL).
    ours: dict[str, bool] = field(default_factory=dict)

    def result(self) -> Resolution:
        return Resolution(
            tuple(self.users.values()),
            tuple(self.external),
            tuple(self.problems),
            self.routing_loop,
        )


@dataclass(frozen=True, slots=True)
class AliasChange:
    """What removing a user or an alias did to another alias that reached it."""

    alias: str
    dropped: tuple[str, ...]  # its targets that no longer exist
    removed: bool  # they were all it had, so the alias went too


def _v1(conn: apsw.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE domains(
            name TEXT PRIMARY KEY,
            created INTEGER NOT NULL
        );
        CREATE TABLE users(
            id TEXT PRIMARY KEY,
            localpart TEXT NOT NULL,
            domain TEXT NOT NULL REFERENCES domains(name),
            quota INTEGER NOT NULL DEFAULT 0,
            spool_public BLOB NOT NULL,
            created INTEGER NOT NULL,
            UNIQUE(localpart, domain)
        );
        CREATE TABLE keyslots(
            id INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            kind TEXT NOT NULL CHECK(kind IN ('password', 'app', 'recovery')),
            label TEXT,
            tag BLOB,
            salt BLOB NOT NULL,
            nonce BLOB NOT NULL,
            ciphertext BLOB NOT NULL,
            params TEXT NOT NULL,
            created INTEGER NOT NULL,
            last_used INTEGER
        );
        CREATE INDEX keyslots_user ON keyslots(user_id, kind);
        CREATE UNIQUE INDEX keyslots_tag ON keyslots(tag) WHERE tag IS NOT NULL;
        CREATE TABLE aliases(
            localpart TEXT NOT NULL,
            domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
            targets TEXT NOT NULL,
            PRIMARY KEY(localpart, domain)
        );
        """
    )


def _v2(conn: apsw.Connection) -> None:
    # What the user's mail took when the mailbox was last locked: lets the MX enforce the
    # quota at RCPT time without being able to open the mailbox.
    conn.execute("ALTER TABLE users ADD COLUMN usage_hint INTEGER NOT NULL DEFAULT 0")


def _v3(conn: apsw.Connection) -> None:
    # DKIM signing keys: private keys are secrets, which is why this database is encrypted.
    conn.execute(
        """
        CREATE TABLE dkim_keys(
            domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
            selector TEXT NOT NULL,
            algorithm TEXT NOT NULL CHECK(algorithm IN ('rsa-sha256', 'ed25519-sha256')),
            private_key BLOB NOT NULL,
            created INTEGER NOT NULL,
            active INTEGER NOT NULL DEFAULT 1,
            PRIMARY KEY(domain, selector)
        );
        """
    )


def _v4(conn: apsw.Connection) -> None:
    # Per-domain policy for dangerous attachments: NULL follows [filters] attachment_policy.
    conn.execute("ALTER TABLE domains ADD COLUMN attachment_policy TEXT")


def _v5(conn: apsw.Connection) -> None:
    # End-to-end encryption (postvern.e2e): each user's OpenPGP certificate and S/MIME
    # certificate (public parts only, never a private key), whether incoming mail is encrypted
    # to one of them ('openpgp' | 'smime', NULL for off), the outer Subject policy, and whether
    # the OpenPGP key is published (WKD, Autocrypt).
    conn.execute(
        """
        CREATE TABLE e2e_keys(
            user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            openpgp BLOB,
            smime BLOB,
            encrypt TEXT CHECK(encrypt IN ('openpgp', 'smime')),
            subject TEXT NOT NULL DEFAULT 'kept' CHECK(subject IN ('kept', 'hidden')),
            publish INTEGER NOT NULL DEFAULT 0,
            updated INTEGER NOT NULL
        );
        """
    )


def _v6(conn: apsw.Connection) -> None:
    # Accounts (postvern.accounts): second factors, passkeys (and 'passkey' key slots), API
    # tokens, portal settings, sender lists, login history, invitations.
    migrate_v6(conn)


def _v7(conn: apsw.Connection) -> None:
    # Users' own forwarding to outside addresses (directory/forwarding.py).
    migrate_v7(conn)


def _v8(conn: apsw.Connection) -> None:
    # The user → mailbox-node map of a cluster (directory/nodes.py).
    conn.execute(V8)


MIGRATIONS = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8]
ATTACHMENT_POLICIES = ("reject", "quarantine")


def _forwarding(row: Sequence[Any]) -> Forwarding:
    """A ``forwards`` row's (targets, keep_copy); NULLs (no row, through a LEFT JOIN): none."""
    if row[0] is None:
        return Forwarding()
    return Forwarding(tuple(json.loads(str(row[0]))), bool(row[1]))


def _pooled(conn: Connection) -> bool:
    from postvern.directory.pgpool import PGPool

    return isinstance(conn, PGPool)


def _dkim_context(domain: str, selector: str) -> str:
    return f"postvern dkim v1|{domain}|{selector}"


def _slot_context(user_id: str, kind: str, salt: bytes) -> str:
    # The salt is new with every wrap, so a sealed slot opens only in the row it was made for.
    return f"postvern keyslot column v1|{user_id}|{kind}|{salt.hex()}"


class Directory:
    def __init__(
        self,
        conn: Connection,
        *,
        postmaster: str | None = None,
        forwarding: ForwardingPolicy | None = None,
        seal: ColumnSeal | None = None,
        backend: str = "sqlite",
    ) -> None:
        self._conn = conn
        self.backend = backend  # "sqlite" | "postgresql"
        # Secret columns that the database's own encryption does not cover (PostgreSQL):
        # sealed before they are written. None for the encrypted SQLite file.
        self._seal = seal
        # One caller at a time on one connection; a pool (PostgreSQL, directory/pgpool.py)
        # gives each caller a connection of its own and needs no lock here.
        self._lock: AbstractContextManager[Any] = (
            nullcontext() if backend == "postgresql" and _pooled(conn) else threading.RLock()
        )
        # Where role addresses (ROLE_LOCALPARTS) go when a domain defines none of its own;
        # None means the first user created.
        self.postmaster = postmaster
        # What users may forward ([accounts] forwarding, max_forwards).
        self.forwarding_policy = forwarding or ForwardingPolicy()

    @classmethod
    def open(
        cls,
        data_dir: Path,
        key: bytes,
        *,
        create: bool = False,
        postmaster: str | None = None,
        forwarding: ForwardingPolicy | None = None,
    ) -> Directory:
        conn = open_encrypted(data_dir / DB_NAME, key, MIGRATIONS, create=create)
        return cls(conn, postmaster=postmaster, forwarding=forwarding)

    @classmethod
    def open_postgres(
        cls,
        target: PostgresTarget,
        key: bytes,
        *,
        postmaster: str | None = None,
        forwarding: ForwardingPolicy | None = None,
    ) -> Directory:
        """The directory in PostgreSQL (directory/pg.py): TLS verified, schema migrated."""
        from postvern.directory import pg  # psycopg is loaded only by those who use it

        return cls(
            pg.connect(target),
            postmaster=postmaster,
            forwarding=forwarding,
            seal=pg.ColumnSeal(key),
            backend="postgresql",
        )

    def schema_version(self) -> int:
        """The migration the schema is at; the same number means the same tables on both."""
        if self.backend == "postgresql":
            from postvern.directory import pg

            with self._lock:
                return pg.schema_version(self._conn)  # type: ignore[arg-type]
        return int(self._rows("PRAGMA user_version")[0][0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._lock, self._conn:
            yield self._conn

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- domains -----------------------------------------------------------------------

    def add_domain(self, name: str) -> str:
        name = normalise_domain(name)
        with self._tx() as c:
            if c.execute("SELECT 1 FROM domains WHERE name=?", (name,)).fetchall():
                raise DirectoryError(f"domain {name} already exists")
            c.execute("INSERT INTO domains(name, created) VALUES(?, ?)", (name, int(time.time())))
        return name

    def domains(self) -> list[str]:
        return [str(r[0]) for r in self._rows("SELECT name FROM domains ORDER BY name")]

    def has_domain(self, name: str) -> bool:
        try:
            name = normalise_domain(name)
        except AddressError:
            return False
        return bool(self._rows("SELECT 1 FROM domains WHERE name=?", (name,)))

    def attachment_policy(self, name: str) -> str | None:
        """The domain's own policy for dangerous attachments, or None for the default."""
        rows = self._rows(
            "SELECT attachment_policy FROM domains WHERE name=?", (normalise_domain(name),)
        )
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    def set_attachment_policy(self, name: str, policy: str | None) -> None:
        if policy is not None and policy not in ATTACHMENT_POLICIES:
            raise DirectoryError(
                f"attachment policy must be one of {', '.join(ATTACHMENT_POLICIES)}"
            )
        name = normalise_domain(name)
        with self._tx() as c:
            c.execute("UPDATE domains SET attachment_policy=? WHERE name=?", (policy, name))
            if not c.changes():
                raise DirectoryError(f"no such domain: {name}")

    def remove_domain(self, name: str) -> None:
        name = normalise_domain(name)
        with self._tx() as c:
            if not c.execute("SELECT 1 FROM domains WHERE name=?", (name,)).fetchall():
                raise DirectoryError(f"no such domain: {name}")
            users = c.execute("SELECT count(*) FROM users WHERE domain=?", (name,)).fetchall()
            if users[0][0]:
                raise DirectoryError(f"domain {name} still has {users[0][0]} user(s)")
            c.execute("DELETE FROM domains WHERE name=?", (name,))

    # -- users -------------------------------------------------------------------------

    _USER_COLS = "id, localpart, domain, quota, spool_public, created"

    @staticmethod
    def _user(row: tuple[Any, ...]) -> User:
        return User(
            id=str(row[0]),
            localpart=str(row[1]),
            domain=str(row[2]),
            quota=int(row[3]),
            spool_public=bytes(row[4]),
            created=int(row[5]),
        )

    def new_user_id(self) -> str:
        # Random, not sequential: a mailbox file name should reveal neither order nor count.
        return secrets.token_hex(16)

    def insert_user(
        self,
        user_id: str,
        address: str,
        quota: int,
        spool_public: bytes,
        slots: Sequence[tuple[str, str | None, bytes | None, WrappedKey]],
    ) -> User:
        """Create the user and its key slots in one transaction."""
        local, domain = split_address(address)
        now = int(time.time())
        with self._tx() as c:
            if not c.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchall():
                raise DirectoryError(f"domain {domain} is not configured (postvern domain add)")
            if self._exists(c, local, domain):
                raise DirectoryError(f"{local}@{domain} already exists")
            c.execute(
                "INSERT INTO users(id, localpart, domain, quota, spool_public, created)"
                " VALUES(?, ?, ?, ?, ?, ?)",
                (user_id, local, domain, quota, spool_public, now),
            )
            for kind, label, tag, wrapped in slots:
                self._insert_slot(c, user_id, kind, label, tag, wrapped)
        return User(user_id, local, domain, quota, spool_public, now)

    @staticmethod
    def _exists(c: Connection, local: str, domain: str) -> bool:
        return bool(
            c.execute(
                "SELECT 1 FROM users WHERE localpart=? AND domain=? "
                "UNION ALL SELECT 1 FROM aliases WHERE localpart=? AND domain=?",
                (local, domain, local, domain),
            ).fetchall()
        )

    def user(self, address: str) -> User | None:
        try:
            local, domain = split_address(address)
        except AddressError:
            return None
        rows = self._rows(
            f"SELECT {self._USER_COLS} FROM users WHERE localpart=? AND domain=?", (local, domain)
        )
        return self._user(rows[0]) if rows else None

    def user_by_id(self, user_id: str) -> User | None:
        rows = self._rows(f"SELECT {self._USER_COLS} FROM users WHERE id=?", (user_id,))
        return self._user(rows[0]) if rows else None

    def users(self, domain: str | None = None) -> list[User]:
        if domain is None:
            rows = self._rows(f"SELECT {self._USER_COLS} FROM users ORDER BY domain, localpart")
        else:
            rows = self._rows(
                f"SELECT {self._USER_COLS} FROM users WHERE domain=? ORDER BY localpart",
                (normalise_domain(domain),),
            )
        return [self._user(r) for r in rows]

    def set_quota(self, user_id: str, quota: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE users SET quota=? WHERE id=?", (quota, user_id))

    def usage_hint(self, user_id: str) -> int:
        rows = self._rows("SELECT usage_hint FROM users WHERE id=?", (user_id,))
        return int(rows[0][0]) if rows else 0

    def set_usage_hint(self, user_id: str, usage: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE users SET usage_hint=? WHERE id=?", (usage, user_id))

    def delete_user(self, user_id: str) -> list[AliasChange]:
        """Delete the user and take them out of every alias that reached them, in one step.

        Returns what that did to aliases (see :meth:`_prune_aliases`).
        """
        with self._tx() as c:
            c.execute("DELETE FROM users WHERE id=?", (user_id,))
            return self._prune_aliases(c) if c.changes() else []

    # -- the user → mailbox-node map (directory/nodes.py) ------------------------------------

    def node_state(self, user_id: str) -> NodeState | None:
        rows = self._rows("SELECT node, moving FROM users WHERE id=?", (user_id,))
        if not rows:
            return None
        return NodeState(None if rows[0][0] is None else str(rows[0][0]), bool(rows[0][1]))

    def mailbox_node(self, user_id: str) -> str | None:
        state = self.node_state(user_id)
        return None if state is None else state.node

    def user_moving(self, user_id: str) -> bool:
        state = self.node_state(user_id)
        return state is not None and state.moving

    @staticmethod
    def _check_node(node: str | None) -> None:
        if node is not None and not valid_node_name(node):
            raise DirectoryError(f"not a node name: {node[:80]!r}")

    def set_mailbox_node(self, user_id: str, node: str | None) -> None:
        self._check_node(node)
        with self._tx() as c:
            c.execute("UPDATE users SET node=? WHERE id=?", (node, user_id))
            if not c.changes():
                raise DirectoryError("no such user")

    def move_mailbox_node(self, user_id: str, from_node: str | None, to_node: str | None) -> bool:
        self._check_node(to_node)
        with self._tx() as c:
            # "IS ?" would compare NULLs in SQLite only; spelled out, it runs on both.
            if from_node is None:
                c.execute(
                    "UPDATE users SET node=?, moving=0 WHERE id=? AND node IS NULL",
                    (to_node, user_id),
                )
            else:
                c.execute(
                    "UPDATE users SET node=?, moving=0 WHERE id=? AND node=?",
                    (to_node, user_id, from_node),
                )
            return bool(c.changes())

    def set_user_moving(self, user_id: str, moving: bool) -> None:
        with self._tx() as c:
            c.execute("UPDATE users SET moving=? WHERE id=?", (int(moving), user_id))
            if not c.changes():
                raise DirectoryError("no such user")

    def users_on_node(self, node: str) -> list[User]:
        rows = self._rows(
            f"SELECT {self._USER_COLS} FROM users WHERE node=? ORDER BY domain, localpart", (node,)
        )
        return [self._user(r) for r in rows]

    def mailbox_nodes(self) -> dict[str, int]:
        rows = self._rows(
            "SELECT node, count(*) FROM users WHERE node IS NOT NULL GROUP BY node ORDER BY node"
        )
        return {str(r[0]): int(r[1]) for r in rows}

    # -- key slots ---------------------------------------------------------------------

    def _insert_slot(
        self,
        c: Connection,
        user_id: str,
        kind: str,
        label: str | None,
        tag: bytes | None,
        w: WrappedKey,
    ) -> int:
        # RETURNING rather than last_insert_rowid(): the same statement runs on PostgreSQL.
        rows = c.execute(
            "INSERT INTO keyslots(user_id, kind, label, tag, salt, nonce, ciphertext, params,"
            " created) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                user_id,
                kind,
                label,
                tag,
                w.salt,
                w.nonce,
                self._seal_slot(user_id, kind, w.salt, w.ciphertext),
                w.params.to_json(),
                int(time.time()),
            ),
        ).fetchall()
        return int(rows[0][0])

    def add_slot(
        self, user_id: str, kind: str, label: str | None, tag: bytes | None, w: WrappedKey
    ) -> int:
        with self._tx() as c:
            return self._insert_slot(c, user_id, kind, label, tag, w)

    def replace_slots(
        self, user_id: str, kind: str, label: str | None, tag: bytes | None, w: WrappedKey
    ) -> None:
        """Swap every slot of ``kind`` for a new one, atomically (passwd, recover)."""
        with self._tx() as c:
            c.execute("DELETE FROM keyslots WHERE user_id=? AND kind=?", (user_id, kind))
            self._insert_slot(c, user_id, kind, label, tag, w)

    _SLOT_COLS = "id, user_id, kind, label, salt, nonce, ciphertext, params, created, last_used"

    def _seal_slot(self, user_id: str, kind: str, salt: bytes, ciphertext: bytes) -> bytes:
        """In PostgreSQL the wrapped key is sealed as well: the SQLite file keeps its slots
        inside its encryption, so a stolen copy without the server key cannot even be used
        to guess passwords offline; a database dump must not allow that either."""
        if self._seal is None:
            return ciphertext
        return self._seal.seal(ciphertext, _slot_context(user_id, kind, salt))

    def _slot(self, row: tuple[Any, ...]) -> KeySlot:
        user_id, kind, salt, ciphertext = str(row[1]), str(row[2]), bytes(row[4]), bytes(row[6])
        if self._seal is not None:
            ciphertext = self._seal.open(ciphertext, _slot_context(user_id, kind, salt))
        return KeySlot(
            id=int(row[0]),
            user_id=user_id,
            kind=kind,
            label=None if row[3] is None else str(row[3]),
            wrapped=WrappedKey(salt, bytes(row[5]), ciphertext, KDFParams.from_json(str(row[7]))),
            created=int(row[8]),
            last_used=None if row[9] is None else int(row[9]),
        )

    def slots(self, user_id: str, kind: str | None = None) -> list[KeySlot]:
        if kind is None:
            rows = self._rows(
                f"SELECT {self._SLOT_COLS} FROM keyslots WHERE user_id=? ORDER BY id", (user_id,)
            )
        else:
            rows = self._rows(
                f"SELECT {self._SLOT_COLS} FROM keyslots WHERE user_id=? AND kind=? ORDER BY id",
                (user_id, kind),
            )
        return [self._slot(r) for r in rows]

    def slot_by_tag(self, user_id: str, kind: str, tag: bytes) -> KeySlot | None:
        rows = self._rows(
            f"SELECT {self._SLOT_COLS} FROM keyslots WHERE user_id=? AND kind=? AND tag=?",
            (user_id, kind, tag),
        )
        return self._slot(rows[0]) if rows else None

    def touch_slot(self, slot_id: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE keyslots SET last_used=? WHERE id=?", (int(time.time()), slot_id))

    def confirm_slot(self, slot: KeySlot, *, touch_interval: int = 60) -> bool:
        """Whether ``slot`` still stands as it was read: not replaced (a new password wraps
        with a new salt) nor deleted (a revoked app password, a removed user).

        An app password's "last used" is brought up to date on the way, at most once per
        ``touch_interval`` seconds, so a warm login does not write on every use.
        """
        rows = self._rows(
            "SELECT last_used FROM keyslots WHERE id=? AND user_id=? AND salt=?",
            (slot.id, slot.user_id, slot.wrapped.salt),
        )
        if not rows:
            return False
        last_used = rows[0][0]
        if slot.kind == "app" and (last_used is None or last_used < time.time() - touch_interval):
            self.touch_slot(slot.id)
        return True

    def delete_slot(self, user_id: str, kind: str, label: str) -> bool:
        with self._tx() as c:
            c.execute(
                "DELETE FROM keyslots WHERE user_id=? AND kind=? AND label=?",
                (user_id, kind, label),
            )
            return bool(c.changes())

    # -- DKIM keys ---------------------------------------------------------------------

    def add_dkim_key(self, key: DKIMKey, *, retire_others: bool) -> None:
        """Store a signing key; with ``retire_others`` older keys of that algorithm stop
        signing but stay listed (and published) until removed."""
        with self._tx() as c:
            if retire_others:
                c.execute(
                    "UPDATE dkim_keys SET active=0 WHERE domain=? AND algorithm=?",
                    (key.domain, key.algorithm),
                )
            self._insert_dkim(c, key)

    def _insert_dkim(self, c: Connection, key: DKIMKey) -> None:
        private = key.private_key
        if self._seal is not None:
            private = self._seal.seal(private, _dkim_context(key.domain, key.selector))
        c.execute(
            "INSERT INTO dkim_keys(domain, selector, algorithm, private_key, created, active)"
            " VALUES(?, ?, ?, ?, ?, ?)",
            (key.domain, key.selector, key.algorithm, private, key.created, int(key.active)),
        )

    def dkim_keys(self, domain: str, *, active_only: bool = False) -> list[DKIMKey]:
        rows = self._rows(
            "SELECT domain, selector, algorithm, private_key, created, active FROM dkim_keys"
            " WHERE domain=?" + (" AND active=1" if active_only else "") + " ORDER BY created, 2",
            (normalise_domain(domain),),
        )
        return [DKIMKey(r[0], r[1], r[2], self._dkim_private(r), r[4], bool(r[5])) for r in rows]

    def _dkim_private(self, row: tuple[Any, ...]) -> bytes:
        if self._seal is None:
            return bytes(row[3])
        return self._seal.open(bytes(row[3]), _dkim_context(str(row[0]), str(row[1])))

    def remove_dkim_key(self, domain: str, selector: str) -> None:
        with self._tx() as c:
            active = c.execute(
                "SELECT active FROM dkim_keys WHERE domain=? AND selector=?",
                (normalise_domain(domain), selector),
            ).fetchall()
            if active and active[0][0]:
                raise DirectoryError(
                    f"selector {selector} still signs; rotate first (postvern dkim rotate)"
                )
            c.execute(
                "DELETE FROM dkim_keys WHERE domain=? AND selector=?",
                (normalise_domain(domain), selector),
            )
            if not c.changes():
                raise DirectoryError(f"no DKIM selector {selector} for {domain}")

    # -- aliases -----------------------------------------------------------------------

    def add_alias(self, address: str, targets: list[str]) -> Alias:
        """``address`` is ``name@domain`` or ``@domain`` (catch-all)."""
        local, domain = self._alias_key(address)
        if not targets or len(targets) > MAX_ALIAS_TARGETS:
            raise DirectoryError(f"an alias needs 1 to {MAX_ALIAS_TARGETS} targets")
        clean = tuple(dict.fromkeys(normalise_address(t) for t in targets))
        alias = Alias(local, domain, clean)
        with self._tx() as c:
            if not c.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchall():
                raise DirectoryError(f"domain {domain} is not configured")
            if self._exists(c, local, domain):
                raise DirectoryError(f"{local or ''}@{domain} is already a user or an alias")
            c.execute(
                "INSERT INTO aliases(localpart, domain, targets) VALUES(?, ?, ?)",
                (local, domain, json.dumps(clean)),
            )
            # Checked with the alias in place, so a loop through it is seen; raising rolls
            # the insert back. Mail must never be accepted for an alias that leads nowhere.
            problems = self.alias_problems(alias)
            if problems:
                raise DirectoryError(f"{alias.address}: {'; '.join(problems)}")
        return alias

    @staticmethod
    def _alias_key(address: str) -> tuple[str, str]:
        address = address.strip()
        if address.startswith("@"):
            return "", normalise_domain(address[1:])
        return split_address(address)

    def aliases(self) -> list[Alias]:
        rows = self._rows("SELECT localpart, domain, targets FROM aliases ORDER BY domain, 1")
        return [Alias(str(r[0]), str(r[1]), tuple(json.loads(str(r[2])))) for r in rows]

    def remove_alias(self, address: str) -> list[AliasChange]:
        """Remove an alias; returns what that did to other aliases that pointed at it."""
        local, domain = self._alias_key(address)
        with self._tx() as c:
            c.execute("DELETE FROM aliases WHERE localpart=? AND domain=?", (local, domain))
            if not c.changes():
                raise DirectoryError(f"no such alias: {address}")
            return self._prune_aliases(c)

    def _prune_aliases(self, c: Connection) -> list[AliasChange]:
        """Drop alias targets of ours that no longer exist, until none is left.

        Called inside the transaction that removed a user or an alias: an alias left pointing
        at an address that is gone would accept mail for nobody. An alias whose every target
        went is removed in turn, which may leave others pointing at nothing — hence the loop
        (it ends: each round removes at least one target).
        """
        changes: list[AliasChange] = []
        while True:
            round_changes = []
            for alias in self.aliases():
                kept = tuple(t for t in alias.targets if self._target_exists(t))
                if kept == alias.targets:
                    continue
                if kept:
                    c.execute(
                        "UPDATE aliases SET targets=? WHERE localpart=? AND domain=?",
                        (json.dumps(kept), alias.localpart, alias.domain),
                    )
                else:
                    c.execute(
                        "DELETE FROM aliases WHERE localpart=? AND domain=?",
                        (alias.localpart, alias.domain),
                    )
                dropped = tuple(t for t in alias.targets if t not in kept)
                round_changes.append(AliasChange(alias.address, dropped, removed=not kept))
            if not round_changes:
                return changes
            changes.extend(round_changes)

    def _target_exists(self, target: str) -> bool:
        """An outside address, or an address of ours that reaches a user or an alias."""
        local, domain = split_address(target)
        return not self.has_domain(domain) or self._expand(local, domain, _Expansion(), path=())

    def _alias_targets(self, local: str, domain: str) -> tuple[str, ...] | None:
        rows = self._rows(
            "SELECT targets FROM aliases WHERE localpart=? AND domain=?", (local, domain)
        )
        return tuple(json.loads(str(rows[0][0]))) if rows else None

    # -- users' own forwarding ------------------------------------------------------------

    def forwarding(self, user_id: str) -> Forwarding:
        """The user's forwarding as they set it (whether it applies: :meth:`_forwards_of`)."""
        rows = self._rows("SELECT targets, keep_copy FROM forwards WHERE user_id=?", (user_id,))
        return _forwarding(rows[0]) if rows else Forwarding()

    def set_forwarding(self, user_id: str, targets: Sequence[str], keep_copy: bool) -> Forwarding:
        """Replace the user's forwarding; no targets turns it off. Only outside addresses,
        at most the policy's number, and only while the administrator allows forwarding."""
        policy = self.forwarding_policy
        clean = tuple(dict.fromkeys(normalise_address(t) for t in targets if t.strip()))
        if clean and not policy.allowed:
            raise DirectoryError("forwarding is turned off on this server")
        if len(clean) > policy.max_targets:
            raise DirectoryError(f"at most {policy.max_targets} forwarding addresses")
        for target in clean:
            if self.has_domain(split_address(target)[1]):
                raise DirectoryError(
                    f"{target} is this server's own address: forward only to outside "
                    "addresses (an alias reaches local users)"
                )
        with self._tx() as c:
            if not c.execute("SELECT 1 FROM users WHERE id=?", (user_id,)).fetchall():
                raise DirectoryError("no such user")
            c.execute("DELETE FROM forwards WHERE user_id=?", (user_id,))
            if clean:
                c.execute(
                    "INSERT INTO forwards(user_id, targets, keep_copy, updated) VALUES(?, ?, ?, ?)",
                    (user_id, json.dumps(clean), int(keep_copy), int(time.time())),
                )
        return Forwarding(clean, keep_copy) if clean else Forwarding()

    def _forwards_of(self, stored: Forwarding, walk: _Expansion) -> Forwarding:
        """The forwarding that applies now: none while the administrator forbids it, and
        only targets still outside our domains, at most the policy's number."""
        policy = self.forwarding_policy
        if not policy.allowed:
            return Forwarding()
        live = tuple(t for t in stored.targets if not self._ours(split_address(t)[1], walk))
        return Forwarding(live[: policy.max_targets], stored.keep_copy)

    def _ours(self, domain: str, walk: _Expansion) -> bool:
        known = walk.ours.get(domain)
        if known is None:
            known = walk.ours[domain] = self.has_domain(domain)
        return known

    # -- routing -----------------------------------------------------------------------

    def resolve(self, address: str) -> Resolution | None:
        """Where mail for ``address`` goes; None if it is not one of ours (unknown user).

        Order, as Postfix's virtual maps: exact user or alias, then the same without
        ``+tag``, then a role address (postmaster, abuse) the domain does not define, then
        the domain's catch-all. Aliases expand recursively. A result may be a dead end
        (every target gone, or a loop): see :class:`Resolution`.
        """
        try:
            local, domain = split_address(address)
        except AddressError:
            return None
        walk = _Expansion()
        if not self._ours(domain, walk):
            return None
        if not self._expand(local, domain, walk, path=()):
            return None
        return walk.result()

    def alias_problems(self, alias: Alias) -> list[str]:
        """Why mail to ``alias`` would not all arrive: missing targets, loops, a dead end."""
        walk = _Expansion()
        self._expand_alias(alias.localpart, alias.domain, alias.targets, walk, path=())
        problems = list(walk.problems)
        if walk.routing_loop:
            problems.append("its targets loop back to it or nest too deep")
        elif not walk.users and not walk.external and not problems:
            problems.append("it leads to no mailbox and no outside address")
        return problems

    def _expand(self, local: str, domain: str, walk: _Expansion, path: tuple[str, ...]) -> bool:
        """Add where ``local@domain`` leads to ``walk``; False if the address is not ours."""
        for candidate in dict.fromkeys((local, base_localpart(local), "")):
            if candidate:
                # The user and their forwarding in one query (one round trip, not two).
                rows = self._rows(
                    "SELECT u.id, u.localpart, u.domain, u.quota, u.spool_public, u.created,"
                    " f.targets, f.keep_copy FROM users u LEFT JOIN forwards f"
                    " ON f.user_id = u.id WHERE u.localpart=? AND u.domain=?",
                    (candidate, domain),
                )
                if rows:
                    self._reach_user(self._user(rows[0]), _forwarding(rows[0][6:]), walk)
                    return True
            targets = self._alias_targets(candidate, domain)
            if targets is not None:
                self._expand_alias(candidate, domain, targets, walk, path)
                return True
            if candidate in ROLE_LOCALPARTS:
                self._expand_role(candidate, domain, walk, path)
                return True
        return False

    def _reach_user(self, user: User, stored: Forwarding, walk: _Expansion) -> None:
        """The user's mailbox and their own forwards. Without a kept copy the mailbox is
        left out — unless no forward applies, so the mail never goes nowhere."""
        forwards = self._forwards_of(stored, walk)
        for target in forwards.targets:
            walk.external.setdefault(target, None)
        if forwards.keep_copy or not forwards.targets:
            walk.users.setdefault(user.id, user)

    def _expand_alias(
        self,
        local: str,
        domain: str,
        targets: Sequence[str],
        walk: _Expansion,
        path: tuple[str, ...],
    ) -> None:
        key = f"{local}@{domain}"
        if key in path or len(path) >= MAX_ALIAS_DEPTH:
            walk.routing_loop = True
            return
        if key in walk.done:
            return  # reached again by another branch: its targets are already in
        walk.done.add(key)
        for target in targets:
            t_local, t_domain = split_address(target)
            if not self._ours(t_domain, walk):
                walk.external.setdefault(target, None)
            elif not self._expand(t_local, t_domain, walk, (*path, key)):
                walk.problems.setdefault(f"{target} does not exist", None)

    def _expand_role(
        self, local: str, domain: str, walk: _Expansion, path: tuple[str, ...]
    ) -> None:
        admin = self.postmaster or self._first_user_address()
        if admin is None:
            walk.problems.setdefault(f"no user to receive {local}@ mail", None)
            return
        a_local, a_domain = split_address(admin)
        if (a_local, a_domain) == (local, domain) or not self._ours(a_domain, walk):
            walk.problems.setdefault(f"the postmaster address {admin} is not a local user", None)
        elif not self._expand(a_local, a_domain, walk, (*path, f"{local}@{domain}")):
            walk.problems.setdefault(f"the postmaster address {admin} does not exist", None)

    def _first_user_address(self) -> str | None:
        rows = self._rows("SELECT localpart, domain FROM users ORDER BY created, rowid LIMIT 1")
        return f"{rows[0][0]}@{rows[0][1]}" if rows else None

    def may_send_as(self, user: User, address: str) -> bool:
        """The user's own address (with any +tag), or an alias that lists the user."""
        try:
            local, domain = split_address(address)
        except AddressError:
            return False
        if domain == user.domain and base_localpart(local) == user.localpart:
            return True
        for candidate in dict.fromkeys((local, base_localpart(local))):
            targets = self._alias_targets(candidate, domain)
            if targets is not None:
                return user.address in targets
        return False
