"""The account portal over real HTTPS with a real HTTP client: login with and without a
second factor, the session cookie and its rotation, CSRF, the security headers, no account
enumeration, escaping, app passwords used over IMAP, the API's scoped tokens."""

from __future__ import annotations

import imaplib
import re
import time
from collections.abc import AsyncIterator, Iterator

import pyotp
import pytest

from harness import PASSWORDS, DataDir, ServerProcess, make_data_dir, set_config
from portal_kit import Browser, imap_login
from postvern.accounts.store import AccountStore
from postvern.accounts.totp import TOTP

ALICE = "alice@example.test"
BOB = "bob@example.test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    data = make_data_dir(tmp_path_factory.mktemp("portal") / "data", listeners=("https", "imaps"))
    with ServerProcess(data):
        yield data


@pytest.fixture
async def browser(server: DataDir) -> AsyncIterator[Browser]:
    b = Browser(server)
    yield b
    await b.close()


async def test_headers_cookie_and_login_rotation(browser: Browser) -> None:
    r = await browser.get("/account/login")
    assert r.status == 200
    csp = r.headers["Content-Security-Policy"]
    for part in (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ):
        assert part in csp
    assert "unsafe-inline" not in csp
    assert r.headers["Strict-Transport-Security"].startswith("max-age=")
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert r.headers["X-Frame-Options"] == "DENY"
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("__Host-postvern=")
    for flag in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert flag in cookie
    # No inline script or style anywhere on the page.
    assert "<script>" not in browser.last and "style=" not in browser.last
    before = cookie.split(";")[0]
    r = await browser.post(
        "/account/login", {"address": ALICE, "password": PASSWORDS[ALICE]}, allow_redirects=False
    )
    assert r.status == 303 and r.headers["Location"] == "/account/"
    after = r.headers["Set-Cookie"].split(";")[0]
    assert after != before  # a new session token at login
    r = await browser.get("/account/")
    assert r.status == 200 and "Recent logins" in browser.last


async def test_csrf_token_and_origin_are_checked(browser: Browser) -> None:
    await browser.login(ALICE, PASSWORDS[ALICE])
    await browser.get("/account/app-passwords")
    r = await browser.post("/account/app-passwords", {"label": "x", "csrf": "forged"})
    assert r.status == 403
    r = await browser.post(
        "/account/app-passwords", {"label": "evil"}, origin="https://evil.example"
    )
    assert r.status == 403
    await browser.get("/account/app-passwords")
    assert "evil" not in browser.last


async def test_no_account_enumeration(server: DataDir) -> None:
    answers = []
    for address in (ALICE, "nobody@example.test", "someone@elsewhere.test"):
        b = Browser(server)
        try:
            r = await b.login(address, "not-the-password-1")
            text = re.sub(r'(value|content)="[^"]*"', "", b.last)  # CSRF tokens, the address
            answers.append((r.status, text.replace(address, "")))
        finally:
            await b.close()
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 401


async def test_output_is_escaped(browser: Browser) -> None:
    await browser.login(BOB, PASSWORDS[BOB])
    await browser.get("/account/app-passwords")
    await browser.post("/account/app-passwords", {"label": "<script>alert(1)</script>"})
    assert "<script>alert(1)</script>" not in browser.last
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in browser.last


async def test_app_password_over_imap_then_revoked(server: DataDir, browser: Browser) -> None:
    await browser.login(ALICE, PASSWORDS[ALICE])
    await browser.get("/account/app-passwords")
    await browser.post("/account/app-passwords", {"label": "laptop"})
    found = re.search(r"data-new-app-password>([^<]+)<", browser.last)
    assert found
    secret = found.group(1)
    assert imap_login(server, ALICE, secret) == "OK"
    await browser.post("/account/app-passwords/revoke", {"label": "laptop"})
    assert "AUTHENTICATIONFAILED" in imap_login(server, ALICE, secret)


async def test_totp_second_factor_and_replay(server: DataDir) -> None:
    address = "carol@example.test"
    app = server.app()
    try:
        app.accounts.create_user(address, "carol-long-password")
    finally:
        app.close()
    b = Browser(server)
    try:
        await b.login(address, "carol-long-password")
        await b.get("/account/security")
        await b.post("/account/security/totp/start")
        secret = re.search(r"data-totp-secret>([A-Z2-7]+)<", b.last)
        assert secret
        otp = pyotp.TOTP(secret.group(1))
        code = otp.now()
        await b.post("/account/security/totp/confirm", {"code": code})
        assert "data-recovery-codes" in b.last
        codes = re.findall(r"<li><code>([a-z0-9-]+)</code></li>", b.last)
        assert len(codes) == 10
        await b.post("/account/logout")
        # The password alone no longer logs in: a second factor is owed.
        r = await b.login(address, "carol-long-password")
        assert str(r.url).endswith("/account/login/second-factor")
        r = await b.post("/account/login/second-factor", {"code": code})  # used at enrolment
        assert r.status == 401 and "already used" in b.last
        # A recovery code works once.
        r = await b.post("/account/login/second-factor", {"code": codes[0]})
        assert r.status == 200 and str(r.url).endswith("/account/")
        assert imap_login(server, address, "carol-long-password").endswith(
            "use an app password'"
        ) or "use an app password" in imap_login(server, address, "carol-long-password")
    finally:
        await b.close()


async def test_api_scoped_tokens(server: DataDir, browser: Browser) -> None:
    await browser.login(BOB, PASSWORDS[BOB])
    await browser.get("/account/tokens")
    r = await browser.http.post(
        browser.base + "/account/tokens",
        data=[("csrf", browser.csrf), ("name", "aliases bot"), ("scope", "aliases:write")],
        headers={"Origin": browser.base},
    )
    found = re.search(r"data-new-token>([^<]+)<", await r.text())
    assert found
    token = found.group(1)
    auth = {"Authorization": f"Bearer {token}"}
    api = browser.base + "/api/v1"
    r = await browser.http.post(api + "/aliases", json={"localpart": "bob.shop"}, headers=auth)
    assert r.status == 201 and (await r.json())["alias"] == "bob.shop@example.test"
    r = await browser.http.get(api + "/aliases", headers=auth)
    assert (await r.json())["aliases"] == ["bob.shop@example.test"]
    # Beyond its scope: refused with the scope named (RFC 6750 §3.1).
    r = await browser.http.get(api + "/spam", headers=auth)
    assert r.status == 403 and "insufficient_scope" in r.headers["WWW-Authenticate"]
    r = await browser.http.get(api + "/admin/users", headers=auth)
    assert r.status == 403
    r = await browser.http.get(api + "/aliases", headers={"Authorization": "Bearer pvt_nope"})
    assert r.status == 401
    r = await browser.http.get(api + "/openapi.json")
    doc = await r.json()
    assert doc["openapi"].startswith("3.") and "/aliases" in doc["paths"]
    # Revoked in the portal: refused at once.
    await browser.get("/account/tokens")
    token_id = re.search(r'name="id" value="(\d+)"', browser.last)
    assert token_id
    await browser.post("/account/tokens/revoke", {"id": token_id.group(1)})
    r = await browser.http.get(api + "/aliases", headers=auth)
    assert r.status == 401


async def test_pages_render_for_a_logged_in_user(browser: Browser) -> None:
    await browser.login(ALICE, PASSWORDS[ALICE])
    for path, text in [
        ("/account/", "Storage"),
        ("/account/password", "Change password"),
        ("/account/security", "Two-factor authentication"),
        ("/account/aliases", "Aliases"),
        ("/account/spam", "Junk threshold"),
        ("/account/sessions", "this one"),
        ("/account/tokens", "API tokens"),
    ]:
        r = await browser.get(path)
        assert r.status == 200 and text in browser.last, path
    r = await browser.http.get(browser.base + "/account/export.mbox")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/mbox")
    await r.read()


async def test_admin_invitation_disable_and_admin_api(server: DataDir, browser: Browser) -> None:
    """The postmaster (here the first user, alice) administers: an invited user sets their
    own password; a disabled user is refused everywhere; admin scopes reach admin routes."""
    await browser.login(ALICE, PASSWORDS[ALICE])
    r = await browser.get("/account/admin/")
    assert r.status == 200 and "Invite a user" in browser.last
    await browser.post(
        "/account/admin/users/invite", {"address": "dave@example.test", "quota": "5"}
    )
    link = re.search(r"data-invitation-link>([^<]+)<", browser.last)
    assert link
    path = "/" + link.group(1).split("/", 3)[3]
    invited = Browser(server)
    try:
        await invited.get(path)
        assert "dave@example.test" in invited.last
        await invited.post(path, {"password": "dave-own-password", "repeat": "dave-own-password"})
        assert "recovery key" in invited.last
        assert (await invited.get(path)).status == 404  # the link works once
        r = await invited.login("dave@example.test", "dave-own-password")
        assert str(r.url).endswith("/account/")
        # Not an administrator: the admin pages do not exist for dave.
        assert (await invited.get("/account/admin/")).status == 404
    finally:
        await invited.close()
    assert imap_login(server, "dave@example.test", "dave-own-password") == "OK"
    await browser.get("/account/admin/")
    await browser.post(
        "/account/admin/users", {"address": "dave@example.test", "action": "disable"}
    )
    assert "AUTHENTICATIONFAILED" in imap_login(server, "dave@example.test", "dave-own-password")
    again = Browser(server)
    try:
        assert (await again.login("dave@example.test", "dave-own-password")).status == 401
    finally:
        await again.close()
    # An admin token reaches the admin API; a user token with admin scope cannot be made.
    await browser.get("/account/tokens")
    r = await browser.http.post(
        browser.base + "/account/tokens",
        data=[("csrf", browser.csrf), ("name", "ops"), ("scope", "admin:read")],
        headers={"Origin": browser.base},
    )
    token = re.search(r"data-new-token>([^<]+)<", await r.text())
    assert token
    r = await browser.http.get(
        browser.base + "/api/v1/admin/users", headers={"Authorization": f"Bearer {token.group(1)}"}
    )
    users = {u["address"]: u for u in (await r.json())["users"]}
    assert users["dave@example.test"]["disabled"] is True
    assert users["dave@example.test"]["quota"] == 5 * 1024 * 1024
    r = await browser.http.post(
        browser.base + "/api/v1/admin/domains",
        json={"domain": "new.test"},
        headers={"Authorization": f"Bearer {token.group(1)}"},
    )
    assert r.status == 403  # admin:read does not write


async def test_failed_second_factors_count_toward_bans(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Wrong codes are failed logins to abuse/: enough of them ban the client, which then
    cannot even try a password (loopback is not allowlisted here)."""
    data = make_data_dir(
        tmp_path_factory.mktemp("bans") / "data",
        passwords={ALICE: PASSWORDS[ALICE]},
        listeners=("https", "imaps"),
    )
    set_config(data.path, "abuse", {"allowlist": [], "auth_failures_per_ip": 3})
    app = data.app()
    try:
        user = app.directory.user(ALICE)
        assert user is not None
        totp = TOTP(AccountStore(app.directory), app.server_key.derive("totp secrets"), "mx")
        secret = totp.begin(user.id, ALICE).secret
        assert totp.confirm(user.id, pyotp.TOTP(secret).now(), time.time())
    finally:
        app.close()
    with ServerProcess(data):
        b = Browser(data)
        try:
            await b.login(ALICE, PASSWORDS[ALICE])
            for _ in range(3):
                r = await b.post("/account/login/second-factor", {"code": "000000"})
                assert r.status in (401, 200)
            b2 = Browser(data)
            try:
                r = await b2.login(ALICE, PASSWORDS[ALICE])
                assert r.status == 401 and "Too many failed attempts" in b2.last
            finally:
                await b2.close()
            # The same ban closes IMAP to the client: one set of limits for every door.
            with pytest.raises(imaplib.IMAP4.error, match="blocked"):
                imap_login(data, ALICE, PASSWORDS[ALICE])
        finally:
            await b.close()


async def test_turning_codes_off_or_renewing_recovery_codes_asks_again(server: DataDir) -> None:
    """A session left open is not enough to weaken the account: turning authenticator codes
    off and making new recovery codes need the password or a current code again."""
    address, password = "erin@example.test", "erin-long-password"
    app = server.app()
    try:
        app.accounts.create_user(address, password)
    finally:
        app.close()
    b = Browser(server)
    try:
        await b.login(address, password)
        await b.get("/account/security")
        await b.post("/account/security/totp/start")
        secret = re.search(r"data-totp-secret>([A-Z2-7]+)<", b.last)
        assert secret
        otp = pyotp.TOTP(secret.group(1))
        enrolment_code = otp.now()
        await b.post("/account/security/totp/confirm", {"code": enrolment_code})
        assert "Codes from your authenticator app are on" in b.last
        first_codes = re.findall(r"<li><code>([a-z0-9-]+)</code></li>", b.last)

        # New recovery codes: nothing, a wrong password and a recovery code are refused.
        for confirm in ("", "not-the-password", first_codes[0]):
            r = await b.post("/account/security/recovery-codes", {"confirm": confirm})
            assert r.status == 403 and "data-recovery-codes" not in b.last, confirm
        r = await b.post("/account/security/recovery-codes", {"confirm": password})
        assert r.status == 200 and "data-recovery-codes" in b.last
        new_codes = re.findall(r"<li><code>([a-z0-9-]+)</code></li>", b.last)
        assert len(new_codes) == 10 and not set(new_codes) & set(first_codes)

        # Turning codes off: a replayed code and a wrong password are refused.
        for confirm in (enrolment_code, "not-the-password"):
            r = await b.post("/account/security/totp/disable", {"confirm": confirm})
            assert r.status == 403 and "neither your password" in b.last, confirm
            assert "Codes from your authenticator app are on" in b.last
        # A current code (the next step: one step of clock skew is allowed) does.
        r = await b.post("/account/security/totp/disable", {"confirm": otp.at(time.time() + 30)})
        assert r.status == 200 and "Authenticator codes are off" in b.last
        assert "Set up an authenticator app" in b.last
        # The account password alone logs in again, with no second step.
        await b.post("/account/logout")
        r = await b.login(address, password)
        assert str(r.url).endswith("/account/")
    finally:
        await b.close()


async def test_forwarding_in_the_portal_and_the_api(server: DataDir, browser: Browser) -> None:
    """A user forwards their own mail outside, with or without a copy, in the portal and
    through the API with the forwarding scopes; addresses of this server are refused."""
    await browser.login(BOB, PASSWORDS[BOB])
    r = await browser.get("/account/forwarding")
    assert r.status == 200 and "at most 5" in browser.last
    r = await browser.post("/account/forwarding", {"targets": ALICE, "keep_copy": "on"})
    assert r.status == 400 and "this server&#39;s own address" in browser.last
    r = await browser.post("/account/forwarding", {"targets": "Bob.Away@Outside.TEST"})
    assert r.status == 200 and "no copy is kept here" in browser.last
    app = server.app()
    try:
        got = app.directory.resolve(f"bob+news@{ALICE.split('@')[1]}")
        assert got is not None and got.users == () and got.external == ("bob.away@outside.test",)
    finally:
        app.close()

    await browser.get("/account/tokens")
    r = await browser.http.post(
        browser.base + "/account/tokens",
        data=[("csrf", browser.csrf), ("name", "forwarder"), ("scope", "forwarding:write")],
        headers={"Origin": browser.base},
    )
    found = re.search(r"data-new-token>([^<]+)<", await r.text())
    assert found
    auth = {"Authorization": f"Bearer {found.group(1)}"}
    api = browser.base + "/api/v1/forwarding"
    r = await browser.http.get(api, headers=auth)
    assert await r.json() == {
        "targets": ["bob.away@outside.test"],
        "keep_copy": False,
        "allowed": True,
        "max_targets": 5,
    }
    wanted = {"targets": ["one@outside.test", "two@outside.test"], "keep_copy": True}
    r = await browser.http.put(api, json=wanted, headers=auth)
    assert r.status == 200 and (await r.json())["targets"] == wanted["targets"]
    too_many = {"targets": [f"n{i}@outside.test" for i in range(6)]}
    r = await browser.http.put(api, json=too_many, headers=auth)
    assert r.status == 400 and "at most 5 forwarding" in (await r.json())["message"]
    r = await browser.http.put(api, json={"targets": [f"x@{ALICE.split('@')[1]}"]}, headers=auth)
    assert r.status == 400
    await browser.get("/account/forwarding")
    assert "one@outside.test" in browser.last and "a copy is kept here" in browser.last
    # The aliases scopes do not reach forwarding.
    await browser.get("/account/tokens")
    r = await browser.http.post(
        browser.base + "/account/tokens",
        data=[("csrf", browser.csrf), ("name", "aliases only"), ("scope", "aliases:write")],
        headers={"Origin": browser.base},
    )
    other = re.search(r"data-new-token>([^<]+)<", await r.text())
    assert other
    r = await browser.http.get(api, headers={"Authorization": f"Bearer {other.group(1)}"})
    assert r.status == 403 and 'scope="forwarding:read"' in r.headers["WWW-Authenticate"]
    # Stopped through the API: the mail stays home.
    r = await browser.http.put(api, json={"targets": []}, headers=auth)
    assert (await r.json())["targets"] == []
    await browser.get("/account/forwarding")
    assert "data-forwarding-now" not in browser.last
