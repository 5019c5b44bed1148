"""Shared test set-up: data directories with users, free ports, in-process services.

Tests use the real code paths (``postvern init`` logic, the directory, the key slots); the
only concession to speed is a cheaper Argon2id cost in test data directories (8 MiB, t=1),
set through the config file exactly as an operator would.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from postvern import config
from postvern.app import App
from postvern.cli import init_data_dir
from postvern.login import LoginService
from postvern.store.service import MailboxRegistry

DOMAIN = "example.test"
PASSWORDS = {
    f"alice@{DOMAIN}": "alice-correct-horse",
    f"bob@{DOMAIN}": "bob-battery-staple",
}
TEST_KDF = {"time_cost": 1, "memory_kib": 8192, "parallelism": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        "smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s",
    ),
    hostname: str = "mx.example.test",
) -> DataDir:
    passwords = dict(PASSWORDS if passwords is None else passwords)
    listen = free_ports(list(listeners))
    init_data_dir(path, hostname, domain, listen)
    set_config(path, "kdf", TEST_KDF)
    set_config(path, "limits", {"auth_failure_delay": 0.05})
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
