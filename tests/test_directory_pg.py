"""The directory in PostgreSQL behaves as the SQLite one, over TLS it verifies, or not at all.

The directory-level cases (aliases and their invariant, key slots and app passwords through
real Argon2id, users' forwarding, the accounts tables, DKIM keys, the mailbox-node map) run
on both backends from one parametrised fixture. Then what only PostgreSQL has: the TLS rules
(a plaintext URL refused, verify-full failing against a wrong CA, a Unix socket allowed), the
sealed DKIM column, versioned migrations, two nodes writing at once, a server restart. And a
real ``postvern serve`` whose directory is in PostgreSQL, receiving SMTP and serving IMAP LOGIN
to Python's own clients. PostgreSQL is a real private instance (tests/pg_server.py).
"""

from __future__ import annotations

import imaplib
import os
import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.exceptions import InvalidTag

from e2e_kit import smime_identity
from harness import (
    PASSWORDS,
    TEST_KDF,
    DataDir,
    ServerProcess,
    client_tls_context,
    mailbox_messages,
    set_config,
)
from pg_server import CERT_ROLE, PgDatabase, PostgresTestServer, make_pg_data_dir
from postvern import cli
from postvern.accounts import policy
from postvern.accounts.history import LoginHistory
from postvern.accounts.recovery_codes import RecoveryCodes
from postvern.accounts.settings import Settings as AccountSettings
from postvern.accounts.store import AccountStore
from postvern.accounts.tokens import APITokens
from postvern.accounts.totp import TOTP
from postvern.app import App
from postvern.crypto.keyslots import KDFParams
from postvern.crypto.serverkey import ServerKey
from postvern.directory import Directory, DirectoryError
from postvern.directory.accounts import Accounts, AuthFailed
from postvern.directory.copy import copy_directory
from postvern.directory.db import DKIMKey
from postvern.directory.forwarding import ForwardingPolicy
from postvern.directory.pg import (
    LATEST,
    InsecureDirectory,
    PostgresTarget,
    SchemaTooNew,
    connection_params,
    to_psycopg,
)
from postvern.e2e.keys import Format, KeyStore
from postvern.emailauth import signing

DOMAIN = "example.test"
KDF = KDFParams(TEST_KDF["time_cost"], TEST_KDF["memory_kib"], TEST_KDF["parallelism"])
BACKENDS = ["sqlite", "postgres"]


class Env:
    """One directory on one backend, with the accounts operations over it."""

    def __init__(self, directory: Directory, data: Path, server_key: ServerKey) -> None:
        self.directory = directory
        self.server_key = server_key
        self.accounts = Accounts(data, directory, server_key, KDF)
        directory.add_domain(DOMAIN)

    def user(self, name: str, password: str = "correct-horse-battery") -> str:
        return self.accounts.create_user(f"{name}@{DOMAIN}", password).user.id


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    server_key = ServerKey.generate()
    key = server_key.derive("directory database")
    policy_ = ForwardingPolicy(True, 3)
    if request.param == "sqlite":
        directory = Directory.open(tmp_path, key, create=True, forwarding=policy_)
    else:
        database: PgDatabase = request.getfixturevalue("pg_database")
        directory = Directory.open_postgres(database.target(), key, forwarding=policy_)
    yield Env(directory, tmp_path, server_key)
    directory.close()


# -- the same behaviour on both --------------------------------------------------------------


def test_aliases_never_lead_nowhere(env: Env) -> None:
    d = env.directory
    alice, bob = env.user("alice"), env.user("bob")
    d.add_alias(f"team@{DOMAIN}", [f"alice@{DOMAIN}", f"bob@{DOMAIN}", "ext@outside.test"])
    d.add_alias(f"all@{DOMAIN}", [f"team@{DOMAIN}"])
    with pytest.raises(DirectoryError, match="does not exist"):
        d.add_alias(f"ghost@{DOMAIN}", [f"nobody@{DOMAIN}"])
    with pytest.raises(DirectoryError, match="loop"):
        d.add_alias(f"loop@{DOMAIN}", [f"loop@{DOMAIN}"])
    d.add_alias(f"@{DOMAIN}", [f"alice@{DOMAIN}"])
    with pytest.raises(DirectoryError, match="already a user or an alias"):
        d.add_alias(f"alice@{DOMAIN}", [f"bob@{DOMAIN}"])
    with pytest.raises(DirectoryError, match="already exists"):
        env.user("team")
    assert d.alias_problems(d.aliases()[0]) == []

    everyone = d.resolve(f"all@{DOMAIN}")
    assert everyone is not None
    assert {u.id for u in everyone.users} == {alice, bob}
    assert everyone.external == ("ext@outside.test",)
    tagged = d.resolve(f"Alice+Lists@{DOMAIN}")
    assert tagged is not None and [u.id for u in tagged.users] == [alice]
    caught = d.resolve(f"whoever@{DOMAIN}")
    assert caught is not None and [u.id for u in caught.users] == [alice]
    # postmaster@ reaches the first user created, which needs creation order on both.
    role = d.resolve(f"postmaster@{DOMAIN}")
    assert role is not None and [u.id for u in role.users] == [alice]

    # Removing bob takes him out of every alias that named him.
    d.remove_alias(f"@{DOMAIN}")  # (with a catch-all, bob@ would still lead somewhere)
    changes = env.accounts.remove_user(f"bob@{DOMAIN}")
    assert [(c.alias, c.dropped, c.removed) for c in changes] == [
        (f"team@{DOMAIN}", (f"bob@{DOMAIN}",), False)
    ]
    assert d.resolve(f"whoever@{DOMAIN}") is None
    # Removing the alias that all@ relies on removes all@ too (it would lead nowhere).
    removed = d.remove_alias(f"team@{DOMAIN}")
    assert [(c.alias, c.removed) for c in removed] == [(f"all@{DOMAIN}", True)]
    assert d.aliases() == []


def test_key_slots_and_app_passwords(env: Env) -> None:
    accounts, d = env.accounts, env.directory
    address = f"carol@{DOMAIN}"
    new = accounts.create_user(address, "first-password-1")
    assert accounts.authenticate(address, "first-password-1").user.id == new.user.id
    with pytest.raises(AuthFailed):
        accounts.authenticate(address, "wrong-password-1")

    secret = accounts.add_app_password(address, "first-password-1", "phone")
    unlocked = accounts.authenticate(address, secret)
    assert unlocked.slot.kind == "app" and unlocked.slot.label == "phone"
    assert d.confirm_slot(unlocked.slot)
    assert d.slots(new.user.id, "app")[0].last_used is not None
    with pytest.raises(DirectoryError, match="already exists"):
        accounts.add_app_password(address, "first-password-1", "phone")

    accounts.change_password(address, "first-password-1", "second-password-2")
    with pytest.raises(AuthFailed):
        accounts.authenticate(address, "first-password-1")
    # The app password wraps the same mailbox key and outlives the password change.
    assert accounts.authenticate(address, secret).mailbox_key == unlocked.mailbox_key

    fresh_recovery = accounts.recover(address, new.recovery_key, "third-password-3")
    assert accounts.authenticate(address, "third-password-3").mailbox_key == unlocked.mailbox_key
    with pytest.raises(AuthFailed):
        accounts.recover(address, new.recovery_key, "fourth-password-4")
    assert fresh_recovery != new.recovery_key

    accounts.revoke_app_password(address, "phone")
    assert not d.confirm_slot(unlocked.slot)
    with pytest.raises(AuthFailed):
        accounts.authenticate(address, secret)
    assert {s.kind for s in d.slots(new.user.id)} == {"password", "recovery"}


def test_forwarding(env: Env) -> None:
    d = env.directory
    dave = env.user("dave")
    with pytest.raises(DirectoryError, match="own address"):
        d.set_forwarding(dave, [f"alice@{DOMAIN}"], keep_copy=True)
    with pytest.raises(DirectoryError, match="at most 3"):
        d.set_forwarding(dave, [f"x{i}@outside.test" for i in range(4)], keep_copy=True)
    d.set_forwarding(dave, ["Dave@Outside.test"], keep_copy=False)
    forwarded = d.resolve(f"dave@{DOMAIN}")
    assert forwarded is not None
    assert forwarded.users == () and forwarded.external == ("dave@outside.test",)
    d.set_forwarding(dave, ["dave@outside.test"], keep_copy=True)
    both = d.resolve(f"dave@{DOMAIN}")
    assert both is not None and [u.id for u in both.users] == [dave]
    assert d.forwarding(dave).keep_copy
    d.set_forwarding(dave, [], keep_copy=True)
    assert d.forwarding(dave).targets == ()


def test_mailbox_node_map(env: Env) -> None:
    d = env.directory
    erin, frank = env.user("erin"), env.user("frank")
    assert d.mailbox_node(erin) is None and d.node_state(erin) is not None
    assert d.node_state("no-such-user") is None and d.mailbox_node("no-such-user") is None
    d.set_mailbox_node(erin, "mbox-1")
    d.set_mailbox_node(frank, "mbox-1")
    assert d.mailbox_node(erin) == "mbox-1"
    assert [u.id for u in d.users_on_node("mbox-1")] == [erin, frank]
    assert d.mailbox_nodes() == {"mbox-1": 2}

    d.set_user_moving(erin, True)
    assert d.user_moving(erin) and not d.user_moving(frank)
    # A move finishes only from the node it started on; a racing failover loses.
    assert not d.move_mailbox_node(erin, "mbox-3", "mbox-2")
    assert d.move_mailbox_node(erin, "mbox-1", "mbox-2")
    state = d.node_state(erin)
    assert state is not None and state.node == "mbox-2" and not state.moving
    assert d.mailbox_nodes() == {"mbox-1": 1, "mbox-2": 1}
    assert d.move_mailbox_node(erin, "mbox-2", None) and d.mailbox_node(erin) is None
    assert d.move_mailbox_node(erin, None, "mbox-2")

    with pytest.raises(DirectoryError, match="no such user"):
        d.set_mailbox_node("no-such-user", "mbox-1")
    with pytest.raises(DirectoryError, match="no such user"):
        d.set_user_moving("no-such-user", True)
    with pytest.raises(DirectoryError, match="not a node name"):
        d.set_mailbox_node(erin, "two words")
    env.accounts.remove_user(f"frank@{DOMAIN}")
    assert d.users_on_node("mbox-1") == [] and d.mailbox_nodes() == {"mbox-2": 1}


def test_accounts_tables(env: Env, tmp_path: Path) -> None:
    d, key = env.directory, env.server_key
    user = env.user("grace")
    store = AccountStore(d)

    totp = TOTP(store, key.derive("totp secrets"), "mx.test")
    totp.begin(user, f"grace@{DOMAIN}")
    totp.begin(user, f"grace@{DOMAIN}")  # a second pending enrolment replaces the first
    assert not totp.enabled(user) and not policy.two_factor_on(d, user)
    store.execute("UPDATE totp SET enabled=1 WHERE user_id=?", (user,))
    assert totp.enabled(user) and policy.two_factor_on(d, user)
    assert policy.login_allowed(d, user, "app", "imap")
    assert not policy.login_allowed(d, user, "password", "imap")

    settings = AccountSettings(store)
    settings.set_disabled(user, True)
    settings.set_role(user, "admin")  # the row exists: ON CONFLICT DO NOTHING, then UPDATE
    assert settings.get(user).disabled and settings.get(user).admin
    assert policy.disabled(d, user) and not policy.login_allowed(d, user, "app", "imap")
    settings.set_junk_threshold(user, 7.5)
    assert settings.get(user).junk_threshold == 7.5
    settings.add_sender(user, "block", "Spam@Outside.test")
    settings.add_sender(user, "block", "spam@outside.test")
    assert settings.sender_list(user, "block") == ["spam@outside.test"]

    codes = RecoveryCodes(store, key.derive("rc"))
    issued = codes.generate(user)
    assert codes.use(user, issued[0]) and not codes.use(user, issued[0])
    tokens = APITokens(store, key.derive("t"))
    secret = tokens.create(user, "script", {"aliases:read"}, admin=False)
    found = tokens.authenticate(secret)
    assert found is not None and found.allows("aliases:read")
    history = LoginHistory(store)
    history.record(user, "192.0.2.17", "imap")
    assert [(r.network, r.method) for r in history.recent(user)] == [("192.0.2.0/24", "imap")]

    cert, _ = smime_identity(tmp_path, f"grace@{DOMAIN}")
    keys = KeyStore(d)
    grace = d.user_by_id(user)
    assert grace is not None
    keys.import_smime(grace, cert.read_bytes())
    keys.set_encrypt(grace, Format.SMIME)
    stored = keys.get(user)
    assert stored is not None and stored.encrypt is Format.SMIME
    assert keys.remove(grace, Format.SMIME)
    stored = keys.get(user)
    assert stored is not None and stored.smime is None and stored.encrypt is None

    d.set_quota(user, 50 * 2**30)  # 50 GiB: past 32 bits
    again = d.user_by_id(user)
    assert again is not None and again.quota == 50 * 2**30
    env.accounts.remove_user(f"grace@{DOMAIN}")  # every accounts row goes with the user
    for table in ("totp", "account_settings", "recovery_codes", "api_tokens", "e2e_keys"):
        assert d._rows(f"SELECT count(*) FROM {table}")[0][0] == 0


def test_dkim_keys(env: Env) -> None:
    d = env.directory
    first = signing.new_key_pair(d, DOMAIN)
    assert {k.algorithm for k in first} == {"rsa-sha256", "ed25519-sha256"}
    second = signing.new_key_pair(d, DOMAIN)
    active = d.dkim_keys(DOMAIN, active_only=True)
    assert {k.selector for k in active} == {k.selector for k in second}
    assert {k.private_key for k in d.dkim_keys(DOMAIN)} == {k.private_key for k in first + second}
    with pytest.raises(DirectoryError, match="still signs"):
        d.remove_dkim_key(DOMAIN, second[0].selector)
    d.remove_dkim_key(DOMAIN, first[0].selector)
    assert len(d.dkim_keys(DOMAIN)) == 3


# -- PostgreSQL only -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode", ["disable", "allow", "prefer", "require", "verify-ca"], ids=lambda m: m
)
def test_a_url_that_asks_for_less_than_verify_full_is_refused(
    pg_database: PgDatabase, mode: str
) -> None:
    target = pg_database.target(url=f"{pg_database.url}?sslmode={mode}")
    with pytest.raises(InsecureDirectory, match=f"sslmode={mode}"):
        Directory.open_postgres(target, os.urandom(32))


def test_tls_needs_a_root_ca_and_a_named_host(pg_database: PgDatabase) -> None:
    with pytest.raises(InsecureDirectory, match="root CA"):
        connection_params(pg_database.target(ca=None))
    with pytest.raises(InsecureDirectory, match="name its host"):
        connection_params(pg_database.target(url=f"postgresql:///{pg_database.name}"))
    with pytest.raises(InsecureDirectory, match="password_file"):
        connection_params(pg_database.target(url=pg_database.url.replace("@", ":secret@")))
    with pytest.raises(InsecureDirectory, match="postgresql://"):
        connection_params(pg_database.target(url="mysql://127.0.0.1/x"))
    params = connection_params(pg_database.target())
    assert params["sslmode"] == "verify-full" and params["sslrootcert"] == str(pg_database.ca)


def test_the_server_itself_refuses_plaintext(pg_database: PgDatabase) -> None:
    """Belt and braces: were the client check bypassed, the test server (as docs/cluster.md
    tells operators to configure theirs) refuses a connection without TLS."""
    password = pg_database.password_file.read_text().strip()
    with pytest.raises(psycopg.OperationalError, match=r"no encryption|reject"):
        psycopg.connect(pg_database.url, password=password, sslmode="disable").close()


def test_verify_full_fails_against_a_wrong_ca(pg_database: PgDatabase) -> None:
    target = pg_database.target(ca=pg_database.wrong_ca)
    # The other CA bears the same name as the right one (an impostor): its signature fails.
    with pytest.raises(psycopg.OperationalError, match="SSL error") as failure:
        Directory.open_postgres(target, os.urandom(32))
    assert pg_database.password_file.read_text().strip() not in str(failure.value)


def test_a_unix_socket_needs_no_tls(pg_database: PgDatabase) -> None:
    target = PostgresTarget(pg_database.socket_url, password_file=pg_database.password_file)
    assert "sslmode" not in connection_params(target)
    directory = Directory.open_postgres(target, os.urandom(32))
    try:
        assert directory.add_domain("socket.test") in directory.domains()
    finally:
        directory.close()


def test_a_client_certificate_instead_of_a_password(pg_server: PostgresTestServer) -> None:
    database = pg_server.new_database(owner=CERT_ROLE)
    url = f"postgresql://{CERT_ROLE}@127.0.0.1:{database.port}/{database.name}"
    certified = PostgresTarget(
        url, ca=database.ca, client_cert=pg_server.client_cert, client_key=pg_server.client_key
    )
    directory = Directory.open_postgres(certified, os.urandom(32))
    try:
        assert directory.add_domain("cert.test") in directory.domains()
    finally:
        directory.close()
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        Directory.open_postgres(PostgresTarget(url, ca=database.ca), os.urandom(32))


def test_a_password_file_others_can_read_is_refused(
    pg_database: PgDatabase, tmp_path: Path
) -> None:
    loose = tmp_path / "password"
    loose.write_text(pg_database.password_file.read_text())
    loose.chmod(0o644)
    with pytest.raises(InsecureDirectory, match="chmod 600"):
        connection_params(pg_database.target(password_file=loose))


def test_placeholders_outside_quotes_only() -> None:
    assert to_psycopg("SELECT '?', 10%2 FROM t WHERE a=? AND b='x?'") == (
        "SELECT '?', 10%%2 FROM t WHERE a=%s AND b='x?'"
    )


def test_dkim_private_keys_are_sealed_in_postgres(pg_database: PgDatabase) -> None:
    key = os.urandom(32)
    directory = Directory.open_postgres(pg_database.target(), key)
    try:
        directory.add_domain(DOMAIN)
        private = b"-----BEGIN PRIVATE KEY----- not really"
        directory.add_dkim_key(
            DKIMKey(DOMAIN, "s1", "ed25519-sha256", private, 1), retire_others=False
        )
        stored = bytes(directory._rows("SELECT private_key FROM dkim_keys")[0][0])
        assert private not in stored and len(stored) > len(private)
        assert directory.dkim_keys(DOMAIN)[0].private_key == private
    finally:
        directory.close()
    # Bound to its row: copied under another selector, it no longer opens.
    other = Directory.open_postgres(pg_database.target(), key)
    try:
        other._rows("UPDATE dkim_keys SET selector='s2'")
        with pytest.raises(InvalidTag):
            other.dkim_keys(DOMAIN)
    finally:
        other.close()


def test_key_slots_are_sealed_in_postgres(pg_database: PgDatabase, tmp_path: Path) -> None:
    """A dump of the database alone does not even allow guessing a password offline: the
    wrapped key of every slot is sealed under the server key, and bound to its row."""
    server_key = ServerKey.generate()
    directory = Directory.open_postgres(
        pg_database.target(), server_key.derive("directory database")
    )
    try:
        directory.add_domain(DOMAIN)
        accounts = Accounts(tmp_path, directory, server_key, KDF)
        one = accounts.create_user(f"one@{DOMAIN}", "one-password-1").user.id
        two = accounts.create_user(f"two@{DOMAIN}", "two-password-2").user.id
        wrapped = {s.id: s.wrapped.ciphertext for s in directory.slots(one)}
        stored = dict(
            directory._rows("SELECT id, ciphertext FROM keyslots WHERE user_id=?", (one,))
        )
        assert wrapped.keys() == stored.keys()
        assert all(wrapped[i] not in bytes(stored[i]) for i in wrapped)
        # Moved to another user, a slot no longer opens (AAD: user, kind, salt).
        directory._rows("UPDATE keyslots SET user_id=? WHERE user_id=?", (two, one))
        with pytest.raises(InvalidTag):
            directory.slots(two)
    finally:
        directory.close()


def test_migrations_are_versioned_and_run_once(pg_database: PgDatabase) -> None:
    first = Directory.open_postgres(pg_database.target(), os.urandom(32))
    try:
        assert first._rows("SELECT version FROM postvern_schema") == [(LATEST,)]
        first.add_domain(DOMAIN)
    finally:
        first.close()
    again = Directory.open_postgres(pg_database.target(), os.urandom(32))
    try:
        assert again.domains() == [DOMAIN]  # nothing was created twice or dropped
        again._rows("UPDATE postvern_schema SET version=99")
    finally:
        again.close()
    with pytest.raises(SchemaTooNew):
        Directory.open_postgres(pg_database.target(), os.urandom(32))


def test_two_nodes_writing_at_once_keep_names_unique(pg_database: PgDatabase) -> None:
    """Each name is claimed at once as a user by one node and as an alias by another: the
    advisory lock makes the check-then-insert atomic, so exactly one of them wins."""
    key = os.urandom(32)
    nodes = [Directory.open_postgres(pg_database.target(), key) for _ in range(2)]
    try:
        nodes[0].add_domain(DOMAIN)
        target_id = nodes[0].new_user_id()
        nodes[0].insert_user(target_id, f"target@{DOMAIN}", 0, b"k" * 32, [])
        names = [f"name{i}@{DOMAIN}" for i in range(40)]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def as_users() -> None:
            barrier.wait()
            for name in names:
                try:
                    nodes[0].insert_user(nodes[0].new_user_id(), name, 0, b"k" * 32, [])
                except DirectoryError:
                    pass
                except BaseException as e:
                    errors.append(e)

        def as_aliases() -> None:
            barrier.wait()
            for name in names:
                try:
                    nodes[1].add_alias(name, [f"target@{DOMAIN}"])
                except DirectoryError:
                    pass
                except BaseException as e:
                    errors.append(e)

        threads = [threading.Thread(target=as_users), threading.Thread(target=as_aliases)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        users = {u.address for u in nodes[0].users()} - {f"target@{DOMAIN}"}
        aliases = {a.address for a in nodes[1].aliases()}
        assert users | aliases == set(names) and not users & aliases
    finally:
        for node in nodes:
            node.close()


def test_the_directory_reconnects_after_a_postgres_restart(
    pg_server: PostgresTestServer, pg_database: PgDatabase
) -> None:
    directory = Directory.open_postgres(pg_database.target(), os.urandom(32))
    try:
        directory.add_domain(DOMAIN)
        pg_server.restart()
        assert directory.domains() == [DOMAIN]  # a read retries once on a new connection
        directory.add_domain("after.test")  # and a transaction begins on it
        assert directory.has_domain("after.test")
    finally:
        directory.close()


# -- a real server ---------------------------------------------------------------------------


@pytest.fixture
def pg_data(tmp_path: Path, pg_database: PgDatabase) -> DataDir:
    """A data directory whose directory is in PostgreSQL (``init --directory-url``): no
    directory.sqlite, so the server can only have the users from PostgreSQL."""
    return make_pg_data_dir(tmp_path / "data", pg_database)


def test_a_server_on_the_postgres_directory_takes_mail_and_imap_logins(pg_data: DataDir) -> None:
    alice, bob = list(PASSWORDS)
    with ServerProcess(pg_data):
        host, port = pg_data.addr("smtp")
        with smtplib.SMTP(host, port, timeout=30) as smtp:
            refused = smtp.sendmail(
                "sender@outside.test",
                [alice],
                b"From: sender@outside.test\r\nTo: alice@example.test\r\n"
                b"Subject: through PostgreSQL\r\n\r\nHello.\r\n",
            )
            assert refused == {}
            smtp.mail("sender@outside.test")
            code, _ = smtp.rcpt("nobody@example.test")
            assert code == 550
            smtp.rset()
        host, port = pg_data.addr("imaps")
        with imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30) as imap:
            imap.login(alice, PASSWORDS[alice])
            imap.select("INBOX")
            _, found = imap.search(None, 'SUBJECT "through PostgreSQL"')
            assert len(found[0].split()) == 1
        host, port = pg_data.addr("imap")
        with imaplib.IMAP4(host, port, timeout=30) as imap:
            imap.starttls(client_tls_context())
            with pytest.raises(imaplib.IMAP4.error):
                imap.login(bob, "not-bobs-password")
    assert not (pg_data.path / "directory.sqlite").exists()
    assert any(b"through PostgreSQL" in m for m in mailbox_messages(pg_data, alice))


# -- from one machine to PostgreSQL ----------------------------------------------------------


def test_copy_a_sqlite_directory_into_postgres(
    data_dir: DataDir, pg_database: PgDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, bob = list(PASSWORDS)
    app = data_dir.app()
    try:
        phone = app.accounts.add_app_password(alice, PASSWORDS[alice], "phone")
        app.directory.add_alias(f"team@{DOMAIN}", [alice, bob])
        alice_id = app.accounts.authenticate(alice, PASSWORDS[alice]).user.id
        app.directory.set_forwarding(alice_id, ["alice@outside.test"], keep_copy=True)
        app.directory.set_mailbox_node(alice_id, "mbox-1")
        dkim = {k.selector: k.private_key for k in app.directory.dkim_keys(DOMAIN)}
        keys = app.accounts.authenticate(alice, PASSWORDS[alice]).mailbox_key
    finally:
        app.close()
    assert cli.main(["directory", "status", "--data", str(data_dir.path)]) == 0
    status = capsys.readouterr().out
    assert "SQLite" in status and f"schema version: {LATEST}" in status
    set_config(data_dir.path, "directory", pg_database.settings())
    assert cli.main(["directory", "copy-to-postgres", "--data", str(data_dir.path)]) == 0
    assert "copied into PostgreSQL" in capsys.readouterr().out

    app = data_dir.app()  # now on PostgreSQL
    try:
        assert app.directory.backend == "postgresql"
        assert app.accounts.authenticate(alice, PASSWORDS[alice]).mailbox_key == keys
        assert app.accounts.authenticate(alice, phone).slot.label == "phone"
        assert app.accounts.authenticate(bob, PASSWORDS[bob]).user.address == bob
        team = app.directory.resolve(f"team@{DOMAIN}")
        assert team is not None and {u.address for u in team.users} == {alice, bob}
        assert team.external == ("alice@outside.test",)
        assert app.directory.mailbox_node(alice_id) == "mbox-1"
        assert {k.selector: k.private_key for k in app.directory.dkim_keys(DOMAIN)} == dkim
        # New rows take ids past the copied ones.
        app.accounts.add_app_password(alice, PASSWORDS[alice], "laptop")
        with pytest.raises(DirectoryError, match="not empty"):
            copy_directory(app.directory, app.directory)
    finally:
        app.close()
    assert cli.main(["directory", "status", "--data", str(data_dir.path)]) == 0
    status = capsys.readouterr().out
    assert "PostgreSQL" in status and f"schema version: {LATEST}" in status
    assert "node mbox-1: 1 user(s)" in status


def test_init_creates_an_installation_whose_directory_is_in_postgres(
    tmp_path: Path, pg_database: PgDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    def init(data: Path, ca: Path) -> int:
        return cli.main([
            "init", "--data", str(data), "--hostname", "mx.example.test", "--domain", DOMAIN,
            "--ports", "high", "--clamd", "none", "--directory-url", pg_database.url,
            "--directory-ca", str(ca),
            "--directory-password-file", str(pg_database.password_file),
        ])  # fmt: skip

    # A CA that did not sign the server's certificate: refused before any file is written.
    assert init(tmp_path / "wrong", pg_database.wrong_ca) != 0
    assert not (tmp_path / "wrong").exists()
    assert init(tmp_path / "data", pg_database.ca) == 0
    assert "directory is in PostgreSQL" in capsys.readouterr().out
    assert not (tmp_path / "data" / "directory.sqlite").exists()
    app = App.open(tmp_path / "data")
    try:
        assert app.directory.backend == "postgresql" and app.directory.domains() == [DOMAIN]
        assert {k.algorithm for k in app.directory.dkim_keys(DOMAIN)} == {
            "rsa-sha256",
            "ed25519-sha256",
        }
    finally:
        app.close()
    # A second installation on the same database would hold another server key: refused.
    assert init(tmp_path / "second", pg_database.ca) != 0
    assert "already holds domains or users" in capsys.readouterr().err
    assert not (tmp_path / "second").exists()


def test_a_pooled_directory_serves_a_reader_while_another_thread_writes(
    pg_database: PgDatabase,
) -> None:
    """With one connection, a read waited for any transaction of the process to end; with
    the pool it runs beside it, and writers still take the advisory lock one at a time."""
    directory = Directory.open_postgres(pg_database.target(pool=3), os.urandom(32))
    try:
        directory.add_domain(DOMAIN)
        in_transaction, read_done = threading.Event(), threading.Event()

        def writer() -> None:
            with directory._tx() as c:
                c.execute("INSERT INTO domains(name, created) VALUES('held.test', 1)")
                in_transaction.set()
                assert read_done.wait(30)  # the read finished while this transaction is open

        thread = threading.Thread(target=writer)
        thread.start()
        assert in_transaction.wait(30)
        assert directory.domains() == [DOMAIN]  # not the uncommitted row: another connection
        read_done.set()
        thread.join()
        assert directory.has_domain("held.test")

        # Eight threads of one process claim the same names at once: one wins each.
        names = [f"p{i}@{DOMAIN}" for i in range(12)]
        barrier = threading.Barrier(8)
        won: list[str] = []
        errors: list[BaseException] = []

        def claim() -> None:
            barrier.wait()
            for name in names:
                try:
                    directory.insert_user(directory.new_user_id(), name, 0, b"k" * 32, [])
                    won.append(name)
                except DirectoryError:
                    pass  # "already exists": the check under the advisory lock saw the winner
                except BaseException as e:  # a unique violation: the lock did not hold
                    errors.append(e)

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and sorted(won) == sorted(names)
        pool = directory._conn
        assert 1 < pool.opened <= 3  # type: ignore[attr-defined]
    finally:
        directory.close()
