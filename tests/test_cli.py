"""The `postvern` command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import TEST_KDF, set_config

POSTVERN = [sys.executable, "-m", "postvern.cli"]


def run(data: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
    return subprocess.run(
        [*POSTVERN, "--data", str(data), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def initialised(tmp_path: Path) -> Path:
    data = tmp_path / "d"
    r = run(data, "init", "--hostname", "mx.example.test", "--domain", "example.test")
    assert r.returncode == 0, r.stderr
    set_config(data, "kdf", TEST_KDF)
    return data


def test_init_creates_layout_and_refuses_overwrite(initialised: Path) -> None:
    assert (initialised / "postvern.toml").is_file()
    key = initialised / "server.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (initialised / "tls" / "cert.pem").is_file()
    assert (initialised / "tls" / "key.pem").stat().st_mode & 0o077 == 0
    assert (initialised / "directory.sqlite").is_file()
    r = run(initialised, "init", "--hostname", "x", "--domain", "example.org")
    assert r.returncode != 0
    assert "refusing to overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["init"],
        ["serve"],
        ["demo"],
        ["domain"],
        ["domain", "add"],
        ["domain", "list"],
        ["domain", "remove"],
        ["domain", "policy"],
        ["user"],
        ["user", "add"],
        ["user", "list"],
        ["user", "passwd"],
        ["user", "remove"],
        ["user", "recover"],
        ["alias"],
        ["alias", "add"],
        ["alias", "list"],
        ["alias", "remove"],
        ["app-password"],
        ["app-password", "add"],
        ["app-password", "list"],
        ["app-password", "revoke"],
        ["dkim", "list"],
        ["dkim", "rotate"],
        ["dkim", "remove"],
        ["dns"],
        ["queue", "list"],
        ["queue", "show"],
        ["queue", "retry"],
        ["queue", "delete"],
        ["ban", "list"],
        ["ban", "add"],
        ["ban", "remove"],
        ["tls"],
        ["tls", "status"],
    ],
)
def test_every_command_has_help(tmp_path: Path, command: list[str]) -> None:
    r = run(tmp_path, *command, "--help")
    assert r.returncode == 0
    assert "usage: postvern" in r.stdout


def test_errors_are_one_line_and_nonzero(tmp_path: Path, initialised: Path) -> None:
    r = run(tmp_path / "nowhere", "domain", "list")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    r = run(
        initialised,
        "user",
        "add",
        "x@unknown.test",
        "--password-stdin",
        stdin="longenough-pass\nlongenough-pass\n",
    )
    assert r.returncode != 0
    assert (
        r.stderr.strip() == "postvern: domain unknown.test is not configured (postvern domain add)"
    )
    r = run(
        initialised, "user", "add", "x@example.test", "--password-stdin", stdin="short\nshort\n"
    )
    assert r.returncode != 0 and "at least 10 characters" in r.stderr


def test_domains_users_aliases(initialised: Path) -> None:
    assert run(initialised, "domain", "add", "Example.ORG").returncode == 0
    assert run(initialised, "domain", "list").stdout.split() == ["example.org", "example.test"]
    r = run(
        initialised,
        "user",
        "add",
        "Carol@Example.org",
        "--password-stdin",
        stdin="carol-password-1\ncarol-password-1\n",
    )
    assert r.returncode == 0, r.stderr
    assert "created carol@example.org" in r.stdout
    assert "recovery key: " in r.stdout
    r = run(initialised, "user", "add", "dave@example.org", "--generate")
    assert r.returncode == 0 and "password: " in r.stdout
    users = run(initialised, "user", "list").stdout
    assert "carol@example.org" in users and "dave@example.org" in users
    r = run(initialised, "domain", "remove", "example.org")
    assert r.returncode != 0 and "still has 2 user(s)" in r.stderr
    r = run(
        initialised, "alias", "add", "team@example.org", "carol@example.org", "x@elsewhere.test"
    )
    assert r.returncode == 0, r.stderr
    r = run(initialised, "alias", "add", "@example.org", "dave@example.org")
    assert r.returncode == 0, r.stderr
    listing = run(initialised, "alias", "list").stdout
    assert "team@example.org\tcarol@example.org, x@elsewhere.test" in listing
    assert "@example.org\tdave@example.org" in listing
    assert run(initialised, "alias", "remove", "team@example.org").returncode == 0
    assert "team@" not in run(initialised, "alias", "list").stdout
    r = run(initialised, "user", "remove", "dave@example.org")
    assert r.returncode != 0 and "--yes" in r.stderr
    assert run(initialised, "user", "remove", "dave@example.org", "--yes").returncode == 0
    assert "dave@" not in run(initialised, "user", "list").stdout


def _recovery(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("recovery key: ") or line.startswith("new recovery key: "):
            return line.split(": ", 1)[1].split()[0]
    raise AssertionError(stdout)


def test_passwd_recover_and_app_passwords(initialised: Path) -> None:
    r = run(
        initialised,
        "user",
        "add",
        "eve@example.test",
        "--password-stdin",
        stdin="first-password\nfirst-password\n",
    )
    recovery = _recovery(r.stdout)
    # passwd needs the current password
    r = run(
        initialised,
        "user",
        "passwd",
        "eve@example.test",
        "--password-stdin",
        stdin="not-the-password\nsecond-password\nsecond-password\n",
    )
    assert r.returncode != 0 and "wrong address or password" in r.stderr
    r = run(
        initialised,
        "user",
        "passwd",
        "eve@example.test",
        "--password-stdin",
        stdin="first-password\nsecond-password\nsecond-password\n",
    )
    assert r.returncode == 0, r.stderr
    # app password with the new password; the old one no longer works
    r = run(
        initialised,
        "app-password",
        "add",
        "eve@example.test",
        "phone",
        "--password-stdin",
        stdin="first-password\n",
    )
    assert r.returncode != 0
    r = run(
        initialised,
        "app-password",
        "add",
        "eve@example.test",
        "phone",
        "--password-stdin",
        stdin="second-password\n",
    )
    assert r.returncode == 0, r.stderr
    app_password = r.stdout.split(": ", 1)[1].split()[0]
    assert "phone\tcreated" in run(initialised, "app-password", "list", "eve@example.test").stdout
    # the app password can change the account password (it opens the same mailbox key)
    r = run(
        initialised,
        "user",
        "passwd",
        "eve@example.test",
        "--password-stdin",
        stdin=f"{app_password.upper()}\nthird-password\nthird-password\n",
    )
    assert r.returncode == 0, r.stderr
    r = run(initialised, "app-password", "revoke", "eve@example.test", "phone")
    assert r.returncode == 0
    r = run(
        initialised,
        "user",
        "passwd",
        "eve@example.test",
        "--password-stdin",
        stdin=f"{app_password}\nfourth-password\nfourth-password\n",
    )
    assert r.returncode != 0
    # recovery resets the password and rotates the recovery key
    r = run(
        initialised,
        "user",
        "recover",
        "eve@example.test",
        "--password-stdin",
        stdin="aaaa-bbbb-cccc-dddd-eeee-ffff-gggg-hhhh\nnew-password-1\nnew-password-1\n",
    )
    assert r.returncode != 0 and "does not open" in r.stderr
    r = run(
        initialised,
        "user",
        "recover",
        "eve@example.test",
        "--password-stdin",
        stdin=f"{recovery}\nnew-password-1\nnew-password-1\n",
    )
    assert r.returncode == 0, r.stderr
    fresh = _recovery(r.stdout)
    assert fresh != recovery
    r = run(
        initialised,
        "user",
        "recover",
        "eve@example.test",
        "--password-stdin",
        stdin=f"{recovery}\nnew-password-2\nnew-password-2\n",
    )
    assert r.returncode != 0
    r = run(
        initialised,
        "user",
        "passwd",
        "eve@example.test",
        "--password-stdin",
        stdin="new-password-1\nnew-password-3\nnew-password-3\n",
    )
    assert r.returncode == 0, r.stderr


def test_server_key_must_be_private(initialised: Path) -> None:
    os.chmod(initialised / "server.key", 0o644)
    r = run(initialised, "domain", "list")
    assert r.returncode != 0 and "must not be readable" in r.stderr
