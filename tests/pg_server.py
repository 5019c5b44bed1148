"""A real, private PostgreSQL for tests: Debian's ``postgresql`` binaries, 127.0.0.1 only, TLS.

Once per test session (the ``pg_server`` fixture, in conftest.py) a cluster is made with
``initdb`` in a temporary directory and started with ``pg_ctl``; each test that wants a clean
directory takes a database of its own from it (``pg_database``). It accepts only TLS over TCP
(``hostssl`` … ``scram-sha-256``; plaintext TCP is rejected by pg_hba.conf) with a server
certificate for 127.0.0.1 signed by a test CA made here with ``cryptography``; a second,
unrelated CA (``wrong_ca``) is there for tests that verification fails against it. A Unix
socket beside the data takes password logins as well.

initdb and the server refuse to run as root, and tests here often run as root: then every
PostgreSQL command runs as the ``postgres`` system user that Debian's package creates
(``runuser -u postgres``), and the cluster's files are given to it. As any other user they run
as that user. Nothing is left behind: ``close()`` stops the server and removes the directory.

Usage in a test module::

    def test_x(pg_database: PgDatabase) -> None:
        directory = Directory.open_postgres(pg_database.target(), key)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness import DataDir, free_port, make_data_dir
from mta_kit import TestCA
from postvern.directory.pg import PostgresTarget

# pg_ctl waits this long for the server to accept connections: a few seconds here, more on
# a loaded 2-core machine; a broken install fails instead of hanging.
START_TIMEOUT_S = 120
SERVICE_USER = "postgres"  # created by Debian's postgresql-common
ADMIN = "postvern_admin"
ROLE = "postvern"
CERT_ROLE = "postvern_node"  # logs in with its client certificate, no password


def pg_bin() -> Path:
    """The newest installed PostgreSQL's binaries (Debian keeps them off PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        pytest.fail("PostgreSQL is not installed: `make test` installs it (install-system-deps)")
    return found[-1].parent


# -- certificates ------------------------------------------------------------------------


def issue(ca: TestCA, common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The server's certificate (CN and an IP address SAN 127.0.0.1, which libpq checks since
    14), or a client's: PostgreSQL's ``cert`` authentication takes the role from the CN."""
    server = common_name == "127.0.0.1"
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(common_name))])
        builder = builder.add_extension(san, critical=False)
    return key, builder.sign(ca.key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


# -- the server --------------------------------------------------------------------------


@dataclass(frozen=True)
class PgDatabase:
    """One database of the test server, owned by the ``postvern`` role."""

    name: str
    port: int
    ca: Path
    wrong_ca: Path
    password_file: Path
    socket_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{self.name}"

    @property
    def socket_url(self) -> str:
        return f"postgresql://{ROLE}@/{self.name}?host={self.socket_dir}&port={self.port}"

    def target(self, **changes: object) -> PostgresTarget:
        fields: dict[str, object] = {
            "url": self.url,
            "ca": self.ca,
            "password_file": self.password_file,
        }
        fields.update(changes)
        return PostgresTarget(**fields)

    def settings(self) -> dict[str, str]:
        """The [directory] table of postvern.toml for this database."""
        return {"url": self.url, "ca": str(self.ca), "password_file": str(self.password_file)}


class PostgresTestServer:
    """One private PostgreSQL cluster; see the module docstring."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="postvern-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.port = 0
        self.running = False
        self._admin_password = secrets.token_urlsafe(24)
        self._role_password = secrets.token_urlsafe(24)
        self._as_service = os.geteuid() == 0
        self._databases = 0

    # Files the server reads are the service user's; the test process (root, or that same
    # user) keeps the client side: the CA certificates and the password file.
    def _give(self, *paths: Path) -> None:
        if self._as_service:
            account = pwd.getpwnam(SERVICE_USER)
            for path in paths:
                os.chown(path, account.pw_uid, account.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(pg_bin() / args[0]), *args[1:]]
        if self._as_service:
            command = ["runuser", "-u", SERVICE_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if done.returncode:
            log = self.root / "postgres.log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {done.stderr[-2000:]}\n{tail}")

    def start(self) -> PostgresTestServer:
        # Others (the service user) must pass through the directory to reach their part.
        self.root.chmod(0o711)
        (self.root / "ca").mkdir(mode=0o700)
        (self.root / "other-ca").mkdir(mode=0o700)
        ca = TestCA(self.root / "ca")
        server_key, server_cert = issue(ca, "127.0.0.1")
        client_key, client_cert = issue(ca, CERT_ROLE)
        self.client_cert = _write(self.root / "client.crt", _pem(client_cert))
        self.client_key = _write(self.root / "client.key", _key_pem(client_key))
        self.ca = ca.path
        self.wrong_ca = TestCA(self.root / "other-ca").path  # a CA that signed nothing here
        self.password_file = _write(self.root / "password", self._role_password.encode() + b"\n")
        for folder in (self.data, self.sockets):
            folder.mkdir(mode=0o700)
            self._give(folder)
        pwfile = _write(self.root / "admin-password", self._admin_password.encode(), 0o600)
        self._give(pwfile)
        self._run(
            "initdb",
            "-D", str(self.data),
            "-U", ADMIN,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        self._give(
            _write(self.data / "server.crt", _pem(server_cert)),
            _write(self.data / "server.key", _key_pem(server_key)),
            _write(self.data / "root.crt", _pem(ca.cert)),  # verifies client certificates
        )
        self._configure()
        for _ in range(5):  # a port picked free may be taken before the server binds it
            self.port = free_port()
            try:
                self._pg_ctl_start()
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError("PostgreSQL did not start")
        self.running = True
        with self._admin() as conn:
            conn.execute(
                f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self._role_password}'"  # test secret
            )
            conn.execute(f"CREATE ROLE {CERT_ROLE} LOGIN")
        return self

    def _configure(self) -> None:
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                "\n# postvern tests\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.sockets}'\n"
                "ssl = on\n"
                "ssl_cert_file = 'server.crt'\n"
                "ssl_key_file = 'server.key'\n"
                "ssl_ca_file = 'root.crt'\n"
                "ssl_min_protocol_version = 'TLSv1.2'\n"
                "password_encryption = 'scram-sha-256'\n"
                # A test database is thrown away: durability costs time and buys nothing.
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "shared_buffers = 16MB\n"
                "max_connections = 100\n"
            )
        # TLS or nothing over TCP; the socket never leaves the machine.
        (self.data / "pg_hba.conf").write_text(
            "local all all scram-sha-256\n"
            f"hostssl all {CERT_ROLE} 127.0.0.1/32 cert\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )

    def _pg_ctl_start(self) -> None:
        log = self.root / "postgres.log"
        log.touch()
        self._give(log)
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(log), "-w", "-t", str(START_TIMEOUT_S),
            "-o", f"-p {self.port}", "start",
        )  # fmt: skip

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=ADMIN,
            password=self._admin_password,
            dbname="postgres",
            sslmode="verify-full",
            sslrootcert=str(self.ca),
            autocommit=True,
        )

    def new_database(self, owner: str = ROLE) -> PgDatabase:
        """A new empty database; ``owner`` CERT_ROLE for one reached by client certificate."""
        self._databases += 1
        name = f"postvern_{self._databases}"
        with self._admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {owner}")
        return PgDatabase(name, self.port, self.ca, self.wrong_ca, self.password_file, self.sockets)

    def restart(self) -> None:
        """Stop and start again on the same port (every client connection is cut)."""
        self.stop()
        self._pg_ctl_start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.running = False

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresTestServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_pg_data_dir(path: Path, database: PgDatabase) -> DataDir:
    """A data directory whose directory is in ``database`` (``init --directory-url``) with
    the test users: no directory.sqlite exists, so a server started on it can only have the
    users from PostgreSQL."""
    return make_data_dir(
        path, listeners=("smtp", "imap", "imaps", "https"), directory=database.settings()
    )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresTestServer]:
    """One PostgreSQL for the whole test session (imported by conftest.py)."""
    with PostgresTestServer() as server:
        yield server


@pytest.fixture
def pg_database(pg_server: PostgresTestServer) -> PgDatabase:
    """A fresh, empty database of the session's PostgreSQL for one test."""
    return pg_server.new_database()
