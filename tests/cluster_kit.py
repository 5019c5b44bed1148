"""A real Postvern cluster on loopback for tests and bench/cluster.py.

Two fronts and two mailbox nodes, each a ``postvern serve`` process with its own data
directory, set up the way docs/cluster.md tells an administrator to: ``postvern cluster init``
and ``add-node`` on an admin directory, then each node gets ca.crt, its node.crt/node.key and
nodes.toml in its ``cluster/`` folder and ``[cluster] role/node`` in its config. Every node
shares the server key and the directory: the SQLite directory of a seed data directory (each
node's ``directory.sqlite`` is a link to it — SQLite follows the link, so its WAL and locks are
shared) or, given a database of the private test PostgreSQL (tests/pg_server.py), the directory
in PostgreSQL over verified TLS, as a real cluster has it. Redis holds the shared abuse state;
:class:`TlsRedis` is a redis-server that takes TLS only (no plaintext port), with a
certificate from a test CA the nodes verify.
Each user's mailbox file starts on the node placement.py gives it. Given a replica URL per
mailbox node (SeaweedFS, tests/seaweed.py), each mailbox node replicates continuously to it
(``[backup] targets``, every REPLICATE_SECONDS) and nodes.toml names it, for failover.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    PASSWORDS,
    DataDir,
    ServerProcess,
    client_tls_context,
    free_port,
    free_ports,
    make_data_dir,
    set_config,
)
from mta_kit import TestCA
from pg_server import issue
from postvern import cli, config
from postvern.app import App
from postvern.backup import keys as backup_keys
from postvern.cluster import nodes, pki, placement
from postvern.crypto.serverkey import KEY_FILE
from postvern.directory.accounts import MAILBOX_DIR
from postvern.directory.db import DB_NAME
from postvern.emailauth import signing
from redis_server import REDIS_SERVER

FRONTS = ("front1", "front2")
# redis-server is up in well under a second; this bounds a broken install.
REDIS_START_TIMEOUT = 10.0
MAILBOX_NODES = ("mbx1", "mbx2")
FRONT_LISTENERS = ("smtp", "submission", "imap", "imaps", "pop3", "pop3s", "https")
OUTSIDE_SENDER = "sender@outside.test"
# A mailbox node ships its changes to its replica this often: short, so a failover test's
# fronts can see copies covered and dropped (the default is 15 s).
REPLICATE_SECONDS = 1.0


@dataclass
class ClusterKit:
    root: Path
    seed: DataDir
    admin: Path
    nodes: dict[str, DataDir] = field(default_factory=dict)
    procs: dict[str, ServerProcess] = field(default_factory=dict)
    node_list: dict[str, nodes.Node] = field(default_factory=dict)

    @property
    def passwords(self) -> dict[str, str]:
        return self.seed.passwords

    def front(self, name: str) -> DataDir:
        return self.nodes[name]

    def owner(self, address: str) -> str:
        """The mailbox node a user lives on now (the directory's map, else rendezvous)."""
        return self.owners([address])[address]

    def owners(self, addresses: Iterable[str]) -> dict[str, str]:
        """Each user's mailbox node now, the directory opened once for them all."""
        app = App.open(self.seed.path)
        try:
            where = placement.Placement(app.directory, self.node_list)
            found = {}
            for address in addresses:
                user = app.directory.user(address)
                assert user is not None
                found[address] = where.node_for(user.id).name
            return found
        finally:
            app.close()

    def users_on(self, node: str) -> list[str]:
        """The test users that live on ``node`` now."""
        return [a for a, n in self.owners(self.passwords).items() if n == node]

    def start(self, name: str) -> ServerProcess:
        proc = self.procs[name] = ServerProcess(self.nodes[name]).start()
        return proc

    def start_all(self, names: tuple[str, ...] = (*MAILBOX_NODES, *FRONTS)) -> None:
        """The nodes started side by side: each waits for its ready line, most of which is
        Python importing and the node opening its stores, so starting them one after the
        other only added up the waits. (No node needs another to be up to start.)"""
        with ThreadPoolExecutor(len(names)) as pool:
            started = [pool.submit(self.start, name) for name in names]
        for future in started:
            future.result()  # the first failure, once every start has ended

    def stop_all(self) -> None:
        """Every node stopped side by side (SIGTERM, then its own graceful shutdown)."""
        procs = list(self.procs.values())
        if procs:
            with ThreadPoolExecutor(len(procs)) as pool:
                list(pool.map(ServerProcess.stop, procs))

    @contextmanager
    def running(self) -> Iterator[ClusterKit]:
        """Every node started; all stopped at the end, whatever happened."""
        try:
            self.start_all()
            yield self
        finally:
            self.stop_all()


def _cli(*args: str) -> None:
    if cli.main([*args]) != 0:
        raise RuntimeError(f"postvern {' '.join(args)} failed")


def build(
    root: Path,
    *,
    redis_url: str | None = None,
    directory: dict[str, object] | None = None,
    replica: Callable[[str], str] | None = None,
) -> ClusterKit:
    """Make the admin CA, the four nodes' data directories, and place the users.

    ``directory`` is a ``[directory]`` table (PostgreSQL); without it the seed's SQLite file
    is shared. ``replica`` gives a mailbox node's replication target URL by its name."""
    if directory is None:
        seed = make_data_dir(root / "seed", listeners=())
    else:
        seed = make_data_dir(root / "seed", listeners=(), passwords={})
        _postgres_directory(seed, directory)
    # The administrator's machine is the seed: the CA and admin certificate beside a config
    # that reaches the directory, as `cluster move` needs.
    admin = seed.path
    _cli("--data", str(admin), "cluster", "init")
    kit = ClusterKit(root, seed, admin)
    for name in (*FRONTS, *MAILBOX_NODES):
        role = "front" if name in FRONTS else "mailbox"
        _cli("--data", str(admin), "cluster", "add-node", name, "--role", role,
             "--address", f"127.0.0.1:{free_port()}")  # fmt: skip
    kit.node_list = nodes.load(admin / nodes.CLUSTER_DIR)
    _users_on_every_node(kit)
    for name in (*FRONTS, *MAILBOX_NODES):
        kit.nodes[name] = _node_dir(kit, name, redis_url)
    for address in kit.seed.passwords:
        _move_mailbox(kit, address)
    if replica is not None:
        enable_replicas(kit, replica)
    return kit


def enable_replicas(
    kit: ClusterKit, replica: Callable[[str], str], seconds: float = REPLICATE_SECONDS
) -> None:
    """Every mailbox node replicates to ``replica(name)`` every ``seconds`` (its [backup]
    targets, the offline key's public half beside it), and nodes.toml names the replica, as
    docs/cluster.md tells an administrator; for nodes that are not running."""
    admin_cluster = kit.admin / nodes.CLUSTER_DIR
    public = kit.admin / backup_keys.BACKUP_DIR / backup_keys.OFFLINE_PUBLIC_FILE
    if not public.exists():  # the offline key pair; every mailbox node gets its public half
        _cli(
            "--data", str(kit.admin), "backup", "init", "--key-file", str(kit.root / "offline.key")
        )
    for name in MAILBOX_NODES:
        old = kit.node_list[name]
        kit.node_list[name] = nodes.Node(old.name, old.role, old.address, replica(name))
        path = kit.nodes[name].path
        (path / backup_keys.BACKUP_DIR).mkdir(mode=0o700, exist_ok=True)
        shutil.copy2(public, path / backup_keys.BACKUP_DIR / backup_keys.OFFLINE_PUBLIC_FILE)
        set_config(path, "backup", {"targets": [replica(name)], "replicate_seconds": seconds})
    nodes.save(admin_cluster, kit.node_list)
    for data in kit.nodes.values():
        shutil.copy2(
            admin_cluster / nodes.NODES_FILE, data.path / nodes.CLUSTER_DIR / nodes.NODES_FILE
        )


def _postgres_directory(seed: DataDir, directory: dict[str, object]) -> None:
    """Point the seed at PostgreSQL and create there what ``init`` and ``user add`` would."""
    set_config(seed.path, "directory", directory)
    app = App.open(seed.path)
    try:
        signing.new_key_pair(app.directory, app.directory.add_domain(seed.domain))
        for address, password in PASSWORDS.items():
            seed.recovery[address] = app.accounts.create_user(address, password).recovery_key
            seed.passwords[address] = password
    finally:
        app.close()


def _node_dir(kit: ClusterKit, name: str, redis_url: str | None) -> DataDir:
    path = kit.root / name
    path.mkdir(mode=0o700)
    for item in (config.CONFIG_NAME, KEY_FILE):
        shutil.copy2(kit.seed.path / item, path / item)
    shutil.copytree(kit.seed.path / "tls", path / "tls")
    if not config.load(path, environ={}).directory.url:
        os.symlink(kit.seed.path / DB_NAME, path / DB_NAME)
    cluster_dir = path / nodes.CLUSTER_DIR
    cluster_dir.mkdir(mode=0o700)
    admin_dir = kit.admin / nodes.CLUSTER_DIR
    shutil.copy2(admin_dir / pki.CA_CERT, cluster_dir / pki.CA_CERT)
    shutil.copy2(admin_dir / nodes.NODES_FILE, cluster_dir / nodes.NODES_FILE)
    for item in (pki.NODE_CERT, pki.NODE_KEY):
        shutil.copy2(admin_dir / pki.NODES_SUBDIR / name / item, cluster_dir / item)
    role = kit.node_list[name].role
    listen = free_ports(list(FRONT_LISTENERS)) if role == "front" else {}
    set_config(path, "listen", {k: listen.get(k) for k in config.Listen.__dataclass_fields__})
    set_config(path, "cluster", {"role": role, "node": name})
    if "workers" in config.Server.__dataclass_fields__:
        set_config(path, "server", {"workers": 1})  # a cluster node is one process (cluster.md)
    if redis_url is not None:
        set_config(path, "abuse", {"redis_url": redis_url})
    return DataDir(path, kit.seed.domain, listen, dict(kit.seed.passwords))


def _users_on_every_node(kit: ClusterKit, per_node: int = 2) -> None:
    """More users until every mailbox node owns ``per_node`` of them (placement is hashed)."""
    counts = dict.fromkeys(MAILBOX_NODES, 0)
    for address in kit.seed.passwords:
        counts[kit.owner(address)] += 1
    n = 0
    while min(counts.values()) < per_node:
        n += 1
        address, password = f"user{n}@{kit.seed.domain}", f"user{n}-long-password"
        app = App.open(kit.seed.path)
        try:
            app.accounts.create_user(address, password)
        finally:
            app.close()
        kit.seed.passwords[address] = password
        counts[kit.owner(address)] += 1


def _move_mailbox(kit: ClusterKit, address: str) -> None:
    """The user's mailbox file goes to the node that owns the user."""
    owner = kit.owner(address)
    app = App.open(kit.seed.path)
    try:
        user = app.directory.user(address)
        assert user is not None
    finally:
        app.close()
    target = kit.nodes[owner].path / MAILBOX_DIR
    target.mkdir(mode=0o700, exist_ok=True)
    shutil.move(kit.seed.path / MAILBOX_DIR / f"{user.id}.sqlite", target)


class TlsRedis:
    """redis-server on 127.0.0.1 with TLS only (``--port 0``): every client must verify it."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.ca = TestCA(directory)
        key, cert = issue(self.ca, "127.0.0.1")  # CN and an IP SAN, as hostname checks want
        self.cert = directory / "redis.crt"
        self.key = directory / "redis.key"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca.path}"

    def start(self) -> TlsRedis:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(self.port),
             "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
             "--tls-ca-cert-file", str(self.ca.path), "--tls-auth-clients", "no",
             "--dir", str(self.directory), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while True:
            try:
                if self.command(b"PING").startswith(b"+PONG"):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server with TLS did not start")
            time.sleep(0.05)

    def command(self, line: bytes) -> bytes:
        """One inline command over verified TLS; the reply's bytes."""
        ctx = ssl.create_default_context(cafile=str(self.ca.path))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(line + b"\r\n")
                return tls.recv(65536)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def message(to: str, subject: str, sender: str = OUTSIDE_SENDER) -> EmailMessage:
    """A small message with a unique Message-ID, for counting arrivals."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4()}@outside.test>"
    msg.set_content(f"body of {subject}\n")
    return msg


def send_mx(kit: ClusterKit, front: str, to: str, subject: str) -> str:
    """Sends through the front's MX; returns the Message-ID once the front said 250."""
    host, port = kit.front(front).addr("smtp")
    msg = message(to, subject)
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.send_message(msg)
    return str(msg["Message-ID"])


def inbox_subjects(kit: ClusterKit, front: str, address: str) -> list[str]:
    """The Subjects in the user's INBOX, read over IMAPS through ``front``."""
    host, port = kit.front(front).addr("imaps")
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30)
    imap.login(address, kit.passwords[address])
    try:
        imap.select("INBOX")
        _, data = imap.uid("SEARCH", "ALL")
        found = []
        for uid in data[0].split():
            _, parts = imap.uid("FETCH", uid, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            header = parts[0][1].decode()  # type: ignore[index]
            found.append(header.split(":", 1)[1].strip())
        return found
    finally:
        imap.logout()


def metrics(kit: ClusterKit, front: str) -> dict[str, float]:
    """The front's /metrics samples by name."""
    host, port = kit.front(front).addr("https")
    url = f"https://{host}:{port}/metrics"
    with urllib.request.urlopen(url, context=client_tls_context(), timeout=30) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
