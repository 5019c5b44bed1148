"""Shared test set-up: data directories with users, free ports, in-process services.

Tests use the real code paths (``postvern init`` logic, the directory, the key slots); the
only concession to speed is a cheaper Argon2id cost in test data directories (8 MiB, t=1),
set through the config file exactly as an operator would.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from postvern import config
from postvern.app import App
from postvern.cli import init_data_dir
from postvern.login import LoginService
from postvern.server import READY_LINE
from postvern.store.mailbox import Mailbox
from postvern.store.service import MailboxRegistry
from postvern.store.spool import import_spool


def _corpora_root() -> Path:
    """The shared test corpora: $POSTVERN_CORPORA, ``shared/corpora`` beside the checkout, or
    the workplace's /work/shared/corpora."""
    candidates = [Path(os.environ["POSTVERN_CORPORA"])] if "POSTVERN_CORPORA" in os.environ else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "corpora")
    candidates.append(Path("/work/shared/corpora"))  # this workplace's layout, from anywhere
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise RuntimeError("test corpora not found: set POSTVERN_CORPORA to shared/corpora")


CORPORA = _corpora_root()
DOMAIN = "example.test"
PASSWORDS = {
    f"alice@{DOMAIN}": "alice-correct-horse",
    f"bob@{DOMAIN}": "bob-battery-staple",
}
TEST_KDF = {"time_cost": 1, "memory_kib": 8192, "parallelism": 1}


# Listening ports are drawn below the kernel's ephemeral range (ip_local_port_range,
# 32768-60999 by default), from which every outgoing connection takes its source port: a
# port the kernel hands out for "any free port" can be taken by a client socket between
# this check and the server's bind, and the server then fails to start.
LISTEN_PORTS = range(20000, 32000)
_port_picker = random.Random()
_handed_out: set[int] = set()  # never the same port twice in one run: servers come and go


def free_port() -> int:
    """A loopback port nothing listens on, outside the ephemeral range, not given before."""
    for _ in range(200):
        port = _port_picker.choice(LISTEN_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def free_ports(names: list[str]) -> dict[str, str]:
    return {name: f"127.0.0.1:{free_port()}" for name in names}


def set_config(data: Path, section: str, values: dict[str, object]) -> None:
    """Rewrite one [section] of postvern.toml (as an operator editing the file would)."""
    settings = config.load(data, environ={})
    obj = getattr(settings, section)
    for key, value in values.items():
        setattr(obj, key, value)
    (data / config.CONFIG_NAME).write_text(config.render(settings))


@dataclass
class DataDir:
    path: Path
    domain: str
    listen: dict[str, str]
    passwords: dict[str, str] = field(default_factory=dict)
    recovery: dict[str, str] = field(default_factory=dict)

    def addr(self, name: str) -> tuple[str, int]:
        return config.parse_hostport(self.listen[name])

    def app(self) -> App:
        return App.open(self.path)


def make_data_dir(
    path: Path,
    *,
    domain: str = DOMAIN,
    passwords: dict[str, str] | None = None,
    listeners: tuple[str, ...] = (
        "smtp",
        "submission",
        "submissions",
        "imap",
        "imaps",
        "pop3",
        "pop3s",
    ),
    hostname: str = "mx.example.test",
    directory: dict[str, str] | None = None,
) -> DataDir:
    """``directory``: [directory] settings, for a directory in PostgreSQL (pg_server.py)."""
    passwords = dict(PASSWORDS if passwords is None else passwords)
    listen = free_ports(list(listeners))
    init_data_dir(path, hostname, domain, listen, directory=directory)
    set_config(path, "kdf", TEST_KDF)
    set_config(path, "limits", {"auth_failure_delay": 0.05})
    # Tests connect from loopback hundreds of times; the abuse tests that need limits on
    # loopback take this allowlist away again.
    set_config(path, "abuse", {"allowlist": ["127.0.0.0/8", "::1"]})
    # One process, as before [server] workers existed: tests of several workers
    # (test_workers.py) ask for them.
    set_config(path, "server", {"workers": 1})
    data = DataDir(path, domain, listen, passwords)
    app = App.open(path)
    try:
        for address, password in passwords.items():
            data.recovery[address] = app.accounts.create_user(address, password).recovery_key
    finally:
        app.close()
    return data


def client_tls_context() -> ssl.SSLContext:
    """Trusts anything: tests talk to the self-signed certificate of a fresh data dir."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class Services:
    """In-process pieces a protocol test needs: app, registry, login service."""

    app: App
    registry: MailboxRegistry
    login: LoginService

    async def close(self) -> None:
        await self.registry.close()
        self.app.close()


def services(data: DataDir) -> Services:
    app = data.app()
    registry = MailboxRegistry(app.accounts)
    login = LoginService(app.accounts, registry, failure_delay=0.05)
    return Services(app, registry, login)


@dataclass
class SocketActivated:
    """``postvern serve`` under ``systemd-socket-activate``, which holds the listening
    sockets and starts the server at the first connection, as a .socket unit does. ``lines``
    fills with the output as it comes; ``ready`` is set at the server's ready line."""

    proc: subprocess.Popen[bytes]
    lines: list[str]
    ready: threading.Event

    @classmethod
    def start(cls, data: Path, listens: list[str], names: str) -> SocketActivated:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
        command = [
            "systemd-socket-activate",
            *(f"--listen={address}" for address in listens),
            f"--fdname={names}",
            sys.executable,
            *("-m", "postvern.cli", "--data", str(data), "serve"),
        ]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started = cls(proc, [], threading.Event())
        threading.Thread(target=started._pump, daemon=True).start()
        return started

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip())
            if self.lines[-1] == READY_LINE:
                self.ready.set()

    def listening(self) -> int:
        """How many sockets systemd-socket-activate says it listens on."""
        return sum("Listening on" in line for line in self.lines)


class ServerProcess:
    """``postvern serve`` as a real subprocess; waits for the ready line, stops with SIGTERM.

    ``command`` runs another long-lived command instead (``("demo",)``); ``umask`` is set in
    the child before it starts, as the caller's shell would have it.
    """

    def __init__(
        self,
        data: DataDir,
        env: dict[str, str] | None = None,
        *,
        command: tuple[str, ...] = ("serve",),
        umask: int | None = None,
    ) -> None:
        self.data = data
        self.env = env or {}
        self.command = command
        self.umask = umask
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 60.0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
        made = (self.data.path / config.CONFIG_NAME).exists()  # `demo` makes it when absent
        if not made or config.load(self.data.path, environ={}).server.workers == 0:
            # A data dir made by `postvern init` or `demo` (one worker per core by default):
            # one process, unless the test asks for more.
            env["POSTVERN_SERVER__WORKERS"] = "1"
        env.update(self.env)
        umask = self.umask
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postvern.cli", "--data", str(self.data.path), *self.command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=None if umask is None else lambda: os.umask(umask),
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                text = line.decode(errors="replace").rstrip()
                self.output.append(text)
                if text == READY_LINE:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + "\n".join(self.output[-30:]))
        return self

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as a crash or power cut would leave things."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mailbox_messages(data: DataDir, address: str, folder: str | None = "INBOX") -> list[bytes]:
    """Log in (importing the spool) and return the raw messages of one folder (None: all)."""
    app = data.app()
    try:
        unlocked = app.accounts.authenticate(address, data.passwords[address])
        with Mailbox.open(app.accounts.mailbox_path(unlocked.user), unlocked.mailbox_key) as box:
            import_spool(box, app.accounts.spool, unlocked.user.id)
            folders = box.folders() if folder is None else [box.folder(folder)]
            return [box.raw(f.id, uid) for f in folders for uid in box.uids(f.id)]
    finally:
        app.close()
