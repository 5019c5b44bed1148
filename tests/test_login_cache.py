"""The warm-login cache: a repeated login skips Argon2id; a changed secret stops at once.

Unit tests of :class:`LoginCache` with a hand-driven clock, then the real server: IMAP logins
counted through ``/metrics`` (Argon2id runs against warm logins), and the administrator's
CLI changing a password and revoking an app password while the server keeps its cache.
"""

from __future__ import annotations

import http.client
import imaplib
import subprocess
import sys
import time
from pathlib import Path

import pyotp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    DataDir,
    ServerProcess,
    Services,
    client_tls_context,
    make_data_dir,
    services,
)
from postvern.accounts.settings import Settings
from postvern.accounts.store import AccountStore
from postvern.accounts.totp import DIGITS, PERIOD, TOTP
from postvern.crypto.keyslots import KDFParams, WrappedKey
from postvern.directory.accounts import Unlocked
from postvern.directory.db import KeySlot, User
from postvern.login import LoginRefused
from postvern.login_cache import MAX_ENTRIES, LoginCache

ALICE = "alice@example.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake_unlock(user_id: str) -> Unlocked:
    user = User(user_id, "alice", "example.test", 0, b"")
    wrapped = WrappedKey(b"salt", b"nonce", b"ciphertext", KDFParams(1, 8192, 1))
    return Unlocked(user, b"k" * 32, KeySlot(1, user_id, "password", None, wrapped, 0, None))


def test_cache_finds_only_the_same_secret_and_forgets() -> None:
    cache = LoginCache(60, clock=Clock())
    unlocked = fake_unlock("u1")
    cache.store(ALICE, "right", unlocked)
    assert cache.lookup(ALICE, "right", lambda _: False) is unlocked
    assert cache.lookup(ALICE, "wrong", lambda _: False) is None
    assert cache.lookup("bob@example.test", "right", lambda _: False) is None
    cache.forget(ALICE)
    assert cache.lookup(ALICE, "right", lambda _: False) is None


def test_entries_expire_when_idle_unless_a_session_is_open() -> None:
    clock = Clock()
    cache = LoginCache(60, clock=clock)
    unlocked = fake_unlock("u1")
    cache.store(ALICE, "right", unlocked)
    clock.now += 59
    assert cache.lookup(ALICE, "right", lambda _: False) is unlocked  # and refreshed
    clock.now += 59
    assert cache.lookup(ALICE, "right", lambda _: False) is unlocked
    clock.now += 61
    assert cache.lookup(ALICE, "right", lambda uid: uid == "u1") is unlocked  # in use
    clock.now += 61
    assert cache.lookup(ALICE, "right", lambda _: False) is None
    assert len(cache) == 0


def test_cache_is_bounded_and_off_at_zero() -> None:
    cache = LoginCache(60, clock=Clock())
    for i in range(MAX_ENTRIES + 5):
        cache.store(f"u{i}@example.test", "pw", fake_unlock(str(i)))
    assert len(cache) == MAX_ENTRIES
    assert cache.lookup("u0@example.test", "pw", lambda _: False) is None  # oldest went
    off = LoginCache(0)
    off.store(ALICE, "pw", fake_unlock("u1"))
    assert off.lookup(ALICE, "pw", lambda _: False) is None


def test_the_key_is_per_process_and_nothing_secret_is_kept() -> None:
    a, b = LoginCache(60), LoginCache(60)
    assert a._mac(ALICE, "pw") != b._mac(ALICE, "pw")
    a.store(ALICE, "correct-horse-battery", fake_unlock("u1"))
    assert b"correct-horse-battery" not in repr(a._accounts).encode()


def cached_services(tmp_path: Path) -> tuple[DataDir, Services]:
    data = make_data_dir(tmp_path / "d")
    svc = services(data)
    svc.login.cache.idle_seconds = 300
    return data, svc


async def test_login_service_warm_path_and_changed_secrets(tmp_path: Path) -> None:
    data, svc = cached_services(tmp_path)
    try:
        password = data.passwords[ALICE]
        first = await svc.login.verify(ALICE, password, "127.0.0.1", "imap")
        again = await svc.login.verify("Alice@Example.TEST", password, "127.0.0.1", "imap")
        assert again.mailbox_key == first.mailbox_key
        assert (svc.login.kdf_runs, svc.login.warm_logins) == (1, 1)
        with pytest.raises(LoginRefused):
            await svc.login.verify(ALICE, "not-the-password", "127.0.0.1", "imap")
        assert svc.login.kdf_runs == 2  # a failure always pays, and is never cached

        # The password is changed elsewhere (the CLI is another process with its own App).
        other = data.app()
        try:
            other.accounts.change_password(ALICE, password, "a-brand-new-password")
        finally:
            other.close()
        with pytest.raises(LoginRefused):
            await svc.login.verify(ALICE, password, "127.0.0.1", "imap")
        fresh = await svc.login.verify(ALICE, "a-brand-new-password", "127.0.0.1", "imap")
        assert fresh.mailbox_key == first.mailbox_key
    finally:
        await svc.close()


async def test_the_normal_form_of_an_address_is_remembered_within_bounds(tmp_path: Path) -> None:
    """Warm logins skip IDNA and Unicode normalisation for an address seen before; the table
    keeps no overlong string and is emptied when full, and an address that is not one is
    refused whether remembered or not."""
    from postvern.login import MAX_ADDRESS_KEPT, NORMAL_FORMS_KEPT

    data, svc = cached_services(tmp_path)
    try:
        login = svc.login
        password = data.passwords[ALICE]
        for spelling in ("Alice@Example.TEST", "Alice@Example.TEST", ALICE):
            await login.verify(spelling, password, "127.0.0.1", "imap")
        assert (login.kdf_runs, login.warm_logins) == (1, 2)
        assert login._normal_forms["Alice@Example.TEST"] == ALICE
        for _ in range(2):  # the second time from the table: still refused
            with pytest.raises(LoginRefused):
                await login.verify("no-at-sign", password, "127.0.0.1", "imap")
        assert login._normal_forms["no-at-sign"] is None
        overlong = "a" * MAX_ADDRESS_KEPT + "@example.test"
        with pytest.raises(LoginRefused):
            await login.verify(overlong, password, "127.0.0.1", "imap")
        assert overlong not in login._normal_forms
        for i in range(NORMAL_FORMS_KEPT):
            login._account(f"user{i}@example.test")
        assert len(login._normal_forms) <= NORMAL_FORMS_KEPT
    finally:
        await svc.close()


async def test_warm_logins_ask_the_directory_only_after_it_changed(tmp_path: Path) -> None:
    """While nothing is committed to the directory, a warm login makes no trip to its
    thread; any commit — here an administrator disabling the account from another process,
    then turning two-factor authentication on in this one — is seen by the next login."""
    data, svc = cached_services(tmp_path)
    try:
        password = data.passwords[ALICE]
        cold = await svc.login.verify(ALICE, password, "127.0.0.1", "imap")
        for _ in range(3):
            assert await svc.login.verify(ALICE, password, "127.0.0.1", "imap") is cold
        assert (svc.login.kdf_runs, svc.login.warm_logins, svc.login.directory_checks) == (1, 3, 0)
        # Another protocol was never checked for this entry: one trip, then none.
        await svc.login.verify(ALICE, password, "127.0.0.1", "pop3")
        await svc.login.verify(ALICE, password, "127.0.0.1", "pop3")
        assert svc.login.directory_checks == 1

        other = data.app()
        try:
            Settings(AccountStore(other.accounts.directory)).set_disabled(cold.user.id, True)
        finally:
            other.close()
        with pytest.raises(LoginRefused):
            await svc.login.verify(ALICE, password, "127.0.0.1", "imap")
        Settings(AccountStore(svc.app.accounts.directory)).set_disabled(cold.user.id, False)
        fresh = await svc.login.verify(ALICE, password, "127.0.0.1", "imap")
        assert fresh.user.id == cold.user.id

        totp = TOTP(AccountStore(svc.app.accounts.directory), bytes(32), "example.test")
        enrolment = totp.begin(cold.user.id, ALICE)
        code = pyotp.TOTP(enrolment.secret, digits=DIGITS, interval=PERIOD).now()
        assert totp.confirm(cold.user.id, code, time.time())
        with pytest.raises(LoginRefused) as refused:
            await svc.login.verify(ALICE, password, "127.0.0.1", "imap")
        assert refused.value.reason == "app-password"
    finally:
        await svc.close()


def metrics(data: DataDir) -> dict[str, float]:
    host, port = data.addr("https")
    conn = http.client.HTTPSConnection(host, port, context=client_tls_context(), timeout=10)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if not sample.labels
    }


def imap_login(data: DataDir, secret: str) -> bool:
    host, port = data.addr("imaps")
    client = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=10)
    try:
        client.login(ALICE, secret)
    except imaplib.IMAP4.error:
        return False
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            pass
    return True


def cli(data: DataDir, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postvern.cli", "--data", str(data.path), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_running_server_warm_logins_and_revocation(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", listeners=("imaps", "https"))
    password = data.passwords[ALICE]
    app = data.app()
    try:
        secret = app.accounts.add_app_password(ALICE, password, "phone")
    finally:
        app.close()
    with ServerProcess(data):
        assert all(imap_login(data, password) for _ in range(5))
        assert all(imap_login(data, secret) for _ in range(5))
        m = metrics(data)
        assert m["postvern_kdf_runs_total"] == 2  # one cold login per secret
        assert m["postvern_warm_logins_total"] == 8

        revoked = cli(data, "app-password", "revoke", ALICE, "phone")
        assert revoked.returncode == 0, revoked.stderr
        assert not imap_login(data, secret)  # at once, though it was warm

        changed = cli(
            data,
            "user",
            "passwd",
            ALICE,
            "--password-stdin",
            stdin=f"{password}\nanother-long-password\nanother-long-password\n",
        )
        assert changed.returncode == 0, changed.stderr
        assert not imap_login(data, password)
        assert imap_login(data, "another-long-password")
