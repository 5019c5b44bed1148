"""The key hierarchy: slots, password changes, recovery, and isolation between users."""

from __future__ import annotations

import asyncio

import pytest

from harness import DataDir
from postvern.crypto import seal
from postvern.crypto.keyslots import KDFParams, WrongSecret, new_mailbox_key, unwrap, wrap
from postvern.directory.accounts import AuthFailed
from postvern.encdb import WrongKey
from postvern.store.mailbox import Mailbox
from postvern.store.spool import Spool, SpoolItem, _info

ALICE, BOB = "alice@example.test", "bob@example.test"


def test_default_kdf_is_argon2id_64mib() -> None:
    params = KDFParams()
    assert params.memory_kib >= 65536 and params.time_cost >= 1
    mk = new_mailbox_key()
    slot = wrap(mk, b"secret", params, b"ctx")
    assert unwrap(slot, b"secret", b"ctx") == mk
    with pytest.raises(WrongSecret):
        unwrap(slot, b"Secret", b"ctx")
    with pytest.raises(WrongSecret):
        unwrap(slot, b"secret", b"other user")  # slots are bound to user and purpose


def test_wrong_secret_refused_right_one_opens(data_dir: DataDir) -> None:
    app = data_dir.app()
    try:
        with pytest.raises(AuthFailed):
            app.accounts.authenticate(ALICE, "not-her-password")
        with pytest.raises(AuthFailed):
            app.accounts.authenticate("nobody@example.test", "whatever-password")
        with pytest.raises(AuthFailed):  # the recovery key is not a login secret
            app.accounts.authenticate(ALICE, data_dir.recovery[ALICE])
        unlocked = app.accounts.authenticate("ALICE@Example.Test", data_dir.passwords[ALICE])
        assert unlocked.user.address == ALICE
        assert "mailbox_key" not in repr(unlocked)
    finally:
        app.close()


def _put(app, address: str, password: str, subject: str) -> None:
    unlocked = app.accounts.authenticate(address, password)
    with Mailbox.open(app.accounts.mailbox_path(unlocked.user), unlocked.mailbox_key) as box:
        box.append(box.folder("INBOX").id, f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def _subjects(app, address: str, password: str) -> int:
    unlocked = app.accounts.authenticate(address, password)
    with Mailbox.open(app.accounts.mailbox_path(unlocked.user), unlocked.mailbox_key) as box:
        return len(box.uids(box.folder("INBOX").id))


def test_passwd_recover_app_passwords_keep_mail(data_dir: DataDir) -> None:
    app = data_dir.app()
    try:
        pw = data_dir.passwords[ALICE]
        for i in range(3):
            _put(app, ALICE, pw, f"m{i}")
        app.accounts.change_password(ALICE, pw, "second-password")
        with pytest.raises(AuthFailed):
            app.accounts.authenticate(ALICE, pw)
        assert _subjects(app, ALICE, "second-password") == 3
        token = app.accounts.add_app_password(ALICE, "second-password", "laptop")
        assert _subjects(app, ALICE, token) == 3
        assert _subjects(app, ALICE, token.upper().replace("-", " ")) == 3
        with pytest.raises(AuthFailed):  # an app password never opens another account
            app.accounts.authenticate(BOB, token)
        app.accounts.revoke_app_password(ALICE, "laptop")
        with pytest.raises(AuthFailed):
            app.accounts.authenticate(ALICE, token)
        fresh = app.accounts.recover(ALICE, data_dir.recovery[ALICE], "third-password")
        assert _subjects(app, ALICE, "third-password") == 3
        with pytest.raises(AuthFailed):
            app.accounts.recover(ALICE, data_dir.recovery[ALICE], "fourth-password")
        app.accounts.recover(ALICE, fresh, "fourth-password")
        assert _subjects(app, ALICE, "fourth-password") == 3
    finally:
        app.close()


def test_user_a_cannot_open_user_b(data_dir: DataDir) -> None:
    app = data_dir.app()
    try:
        alice = app.accounts.authenticate(ALICE, data_dir.passwords[ALICE])
        bob_user = app.directory.user(BOB)
        # A's key does not open B's mailbox file
        with pytest.raises(WrongKey):
            Mailbox.open(app.accounts.mailbox_path(bob_user), alice.mailbox_key)
        # A's password against B's slots
        with pytest.raises(AuthFailed):
            app.accounts.authenticate(BOB, data_dir.passwords[ALICE])
        # mail sealed to B's spool does not open with A's spool key, even under B's name
        spool = Spool(data_dir.path)
        spool_id = spool.deposit(
            bob_user.id, bob_user.spool_public, SpoolItem(b"Subject: x\r\n\r\ny")
        )
        with Mailbox.open(app.accounts.mailbox_path(alice.user), alice.mailbox_key) as box:
            opener = seal.Opener(box.spool_private_key())
        ((item, sealed),) = spool.read(bob_user.id, spool_id.partition("/")[0])
        assert item == spool_id
        with pytest.raises(seal.SealError):
            opener.open(sealed, _info(bob_user.id, item))
        with pytest.raises(seal.SealError):
            opener.open(sealed, _info(alice.user.id, item))
    finally:
        app.close()


def test_login_service_opens_and_imports(data_dir: DataDir) -> None:
    from harness import services

    async def main() -> None:
        s = services(data_dir)
        try:
            bob = s.app.directory.user(BOB)
            assert await s.registry.deliver(bob, SpoolItem(b"Subject: hi\r\n\r\nx\r\n")) == "spool"
            logged = await s.login.login(BOB, data_dir.passwords[BOB], "127.0.0.1", "test")
            box = logged.mailbox.box
            assert len(box.uids(box.folder("INBOX").id)) == 1
            assert await s.registry.deliver(bob, SpoolItem(b"Subject: 2\r\n\r\nx\r\n")) == "mailbox"
            assert len(box.uids(box.folder("INBOX").id)) == 2
            await logged.mailbox.release()
            assert not s.registry.is_unlocked(bob.id)
        finally:
            await s.close()

    asyncio.run(main())
