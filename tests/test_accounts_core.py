"""accounts/: TOTP (RFC 6238) with replay protection and a sealed secret, recovery codes,
scoped tokens, sessions, and the second-factor rule the mail protocols obey — including
through the warm-login cache."""

from __future__ import annotations

import poplib
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest

from harness import PASSWORDS, DataDir, ServerProcess, client_tls_context, make_data_dir
from portal_kit import imap_login
from postvern.accounts import policy
from postvern.accounts.recovery_codes import CODE_COUNT, RecoveryCodes
from postvern.accounts.sessions import FULL, SessionStore
from postvern.accounts.store import AccountStore
from postvern.accounts.tokens import APITokens, TokenError
from postvern.accounts.totp import TOTP
from postvern.app import App

ALICE = "alice@example.test"


@pytest.fixture
def app(data_dir: DataDir) -> Iterator[App]:
    app = data_dir.app()
    yield app
    app.close()


def _totp(app: App) -> TOTP:
    return TOTP(AccountStore(app.directory), app.server_key.derive("totp secrets"), "mx.test")


def test_totp_enrolment_needs_a_first_code_and_allows_one_step_of_skew(app: App) -> None:
    user = app.directory.user(ALICE)
    assert user is not None
    totp = _totp(app)
    enrolment = totp.begin(user.id, ALICE)
    assert enrolment.uri.startswith("otpauth://totp/") and "<svg" in enrolment.qr_svg
    otp = pyotp.TOTP(enrolment.secret)
    now = 1_800_000_000.0
    assert not totp.enabled(user.id)
    assert not totp.verify(user.id, otp.at(now), now)  # not on before confirmation
    assert not totp.confirm(user.id, "000000" if otp.at(now) != "000000" else "111111", now)
    assert totp.confirm(user.id, otp.at(now), now)
    assert totp.enabled(user.id)
    # One step either side is accepted; two steps are not.
    assert totp.verify(user.id, otp.at(now + 30), now)
    assert not totp.verify(user.id, otp.at(now + 90), now + 30)
    assert totp.verify(user.id, otp.at(now + 60), now + 90)


def test_a_totp_code_is_never_accepted_twice(app: App) -> None:
    user = app.directory.user(ALICE)
    assert user is not None
    totp = _totp(app)
    otp = pyotp.TOTP(totp.begin(user.id, ALICE).secret)
    now = 1_800_000_000.0
    assert totp.confirm(user.id, otp.at(now), now)
    later = now + 30
    code = otp.at(later)
    assert totp.verify(user.id, code, later)
    assert not totp.verify(user.id, code, later)  # replayed within its window
    assert not totp.verify(user.id, otp.at(now), later)  # an older code, still in the skew


def test_the_totp_secret_is_sealed_in_the_directory(app: App) -> None:
    user = app.directory.user(ALICE)
    assert user is not None
    enrolment = _totp(app).begin(user.id, ALICE)
    stored = app.directory._rows("SELECT secret FROM totp WHERE user_id=?", (user.id,))[0][0]
    assert enrolment.secret.encode() not in bytes(stored)
    # Bound to the user: another user's row cannot be swapped in.
    other = TOTP(AccountStore(app.directory), app.server_key.derive("other"), "mx.test")
    with pytest.raises(Exception):
        other._open(user.id, bytes(stored))


def test_recovery_codes_are_single_use_and_stored_hashed(app: App) -> None:
    user = app.directory.user(ALICE)
    assert user is not None
    codes_store = RecoveryCodes(AccountStore(app.directory), app.server_key.derive("rc"))
    codes = codes_store.generate(user.id)
    assert len(set(codes)) == CODE_COUNT
    rows = app.directory._rows("SELECT digest FROM recovery_codes WHERE user_id=?", (user.id,))
    assert all(c.encode() not in bytes(r[0]) for r in rows for c in codes)
    assert codes_store.use(user.id, codes[3].upper())  # typed in capitals: still the code
    assert not codes_store.use(user.id, codes[3])
    assert codes_store.remaining(user.id) == CODE_COUNT - 1
    assert not codes_store.use(user.id, "aaaaa-bbbbb")


def test_token_scopes(app: App) -> None:
    user = app.directory.user(ALICE)
    assert user is not None
    tokens = APITokens(AccountStore(app.directory), app.server_key.derive("t"))
    secret = tokens.create(user.id, "script", {"aliases:write"}, admin=False)
    found = tokens.authenticate(secret)
    assert found is not None and found.allows("aliases:read") and found.allows("aliases:write")
    assert not found.allows("spam:read")
    with pytest.raises(TokenError):
        tokens.create(user.id, "root", {"admin:write"}, admin=False)
    stored = app.directory._rows("SELECT digest FROM api_tokens")[0][0]
    assert secret.encode() not in bytes(stored)
    assert tokens.revoke(user.id, found.id) and tokens.authenticate(secret) is None


def test_session_tokens_rotate_and_expire() -> None:
    clock = [1000.0]
    store = SessionStore(clock=lambda: clock[0])
    token, session = store.new()
    assert store.get(token) is session
    session.stage = FULL
    rotated = store.rotate(session)
    assert store.get(token) is None and store.get(rotated) is session
    clock[0] += 31 * 60
    assert store.get(rotated) is None


def test_recent_authentication_is_a_window_from_the_last_proof() -> None:
    clock = [1000.0]
    store = SessionStore(clock=lambda: clock[0])
    _, session = store.new()
    assert not store.recently_authenticated(session, 600)  # not logged in
    session.stage = FULL
    store.mark_authenticated(session)
    clock[0] += 599
    assert store.recently_authenticated(session, 600)
    clock[0] += 1
    assert not store.recently_authenticated(session, 600)
    store.mark_authenticated(session)  # confirmed again
    assert store.recently_authenticated(session, 600)
    assert not store.recently_authenticated(session, 0)


def test_policy_rule() -> None:
    assert policy.secret_allowed("password", "imap", two_factor=False)
    assert not policy.secret_allowed("password", "imap", two_factor=True)
    assert policy.secret_allowed("app", "smtp", two_factor=True)
    assert policy.secret_allowed("password", "web", two_factor=True)
    assert not policy.secret_allowed("app", "web", two_factor=False)


# -- the rule over the real protocols ---------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    data = make_data_dir(
        tmp_path_factory.mktemp("core") / "data", listeners=("imaps", "pop3s", "submissions")
    )
    with ServerProcess(data):
        yield data


def _pop3(data: DataDir, user: str, secret: str) -> str:
    host, port = data.addr("pop3s")
    conn = poplib.POP3_SSL(host, port, context=client_tls_context(), timeout=20)
    try:
        conn.user(user)
        conn.pass_(secret)
    except poplib.error_proto as e:
        return str(e)
    finally:
        conn.close()
    return "OK"


def _smtp(data: DataDir, user: str, secret: str) -> str:
    host, port = data.addr("submissions")
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=20) as conn:
        try:
            conn.login(user, secret)
        except smtplib.SMTPAuthenticationError as e:
            return f"{e.smtp_code} {e.smtp_error.decode()}"
    return "OK"


def _turn_on_totp(data: DataDir, address: str) -> None:
    """As the portal does, from another process: enrol and confirm a first code."""
    app = data.app()
    try:
        user = app.directory.user(address)
        assert user is not None
        totp = TOTP(AccountStore(app.directory), app.server_key.derive("totp secrets"), "mx")
        secret = totp.begin(user.id, address).secret
        assert totp.confirm(user.id, pyotp.TOTP(secret).now(), time.time())
    finally:
        app.close()


def test_with_2fa_on_mail_protocols_take_only_app_passwords(server: DataDir) -> None:
    bob = "bob@example.test"
    password = PASSWORDS[bob]
    app = server.app()
    try:
        app_password = app.accounts.add_app_password(bob, password, "phone")
    finally:
        app.close()
    # Before: the password works everywhere, and is now in the warm-login cache.
    assert imap_login(server, bob, password) == "OK"
    assert _smtp(server, bob, password) == "OK"
    _turn_on_totp(server, bob)
    # After: a cached password is refused at once; the refusal says what to do.
    refused = imap_login(server, bob, password)
    assert "[AUTHENTICATIONFAILED] use an app password" in refused
    smtp = _smtp(server, bob, password)
    assert smtp.startswith("535 5.7.8") and "use an app password" in smtp
    assert "use an app password" in _pop3(server, bob, password)
    # A wrong password gets the same answer: the text is no oracle for the password.
    assert "[AUTHENTICATIONFAILED] use an app password" in imap_login(
        server, bob, "wrong-password-1"
    )
    for check in (imap_login, _smtp, _pop3):
        assert check(server, bob, app_password) == "OK"
    # An account without 2FA is not told about app passwords.
    assert "use an app password" not in imap_login(server, ALICE, "wrong-password-1")
    assert imap_login(server, ALICE, PASSWORDS[ALICE]) == "OK"


def test_migration_keeps_existing_slots(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", passwords={ALICE: PASSWORDS[ALICE]})
    app = data.app()
    try:
        assert app.accounts.authenticate(ALICE, PASSWORDS[ALICE]).slot.kind == "password"
        kinds = {s.kind for s in app.directory.slots(app.directory.user(ALICE).id)}  # type: ignore[union-attr]
        assert kinds == {"password", "recovery"}
    finally:
        app.close()
