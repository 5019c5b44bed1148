"""The account portal in a real browser: Debian's Chromium driven by playwright.

One browser for the module. The tests walk the issue's path: log in; enrol TOTP reading
the secret from the page; log out and in with a code; a replayed code and a cross-site form
post are refused; an app password works over IMAP while the account password is refused
there, and stops when revoked; a passkey registered on Chromium's virtual authenticator
(CDP WebAuthn, with PRF) logs in alone and unlocks the mailbox. Screenshots of the main
pages go to a ``screens`` folder of the pytest temporary directory.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import playwright.sync_api as playwright_sync
import pyotp
import pytest

from harness import PASSWORDS, DataDir, ServerProcess, make_data_dir
from portal_kit import base_url, imap_login

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Debian's chromium is installed by the test command (tools/install-system-deps).
assert Path(CHROMIUM).exists(), "chromium missing: tools/install-system-deps installs it"

ALICE = "alice@example.test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    data = make_data_dir(tmp_path_factory.mktemp("browser") / "data", listeners=("https", "imaps"))
    with ServerProcess(data):
        yield data


@pytest.fixture(scope="module")
def screens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("screens")
    print(f"screenshots in {path}")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(  # type: ignore[attr-defined]
        ignore_https_errors=True, viewport={"width": 1200, "height": 900}
    )
    page = context.new_page()
    yield page
    context.close()


def log_in(page: object, base: str, address: str, password: str) -> None:
    page.goto(base + "/account/login")  # type: ignore[attr-defined]
    page.fill("input[name=address]", address)  # type: ignore[attr-defined]
    page.fill("input[name=password]", password)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]


def log_out(page: object) -> None:
    page.click("form.logout button")  # type: ignore[attr-defined]
    page.wait_for_url("**/account/login")  # type: ignore[attr-defined]


def test_totp_app_passwords_and_csrf(server: DataDir, page: object, screens: Path) -> None:
    p: object = page
    base = base_url(server)
    password = PASSWORDS[ALICE]
    p.goto(base + "/account/login")  # type: ignore[attr-defined]
    p.screenshot(path=str(screens / "01-login.png"))  # type: ignore[attr-defined]
    log_in(p, base, ALICE, password)
    p.wait_for_url("**/account/")  # type: ignore[attr-defined]
    assert "Recent logins" in p.content()  # type: ignore[attr-defined]
    p.screenshot(path=str(screens / "02-dashboard.png"), full_page=True)  # type: ignore[attr-defined]

    # Enrol TOTP: the secret is read from the page, the code computed as an app would.
    p.goto(base + "/account/security")  # type: ignore[attr-defined]
    p.click("text=Set up an authenticator app")  # type: ignore[attr-defined]
    secret = p.inner_text("[data-totp-secret]").strip()  # type: ignore[attr-defined]
    p.screenshot(path=str(screens / "03-totp-enrolment.png"), full_page=True)  # type: ignore[attr-defined]
    otp = pyotp.TOTP(secret)
    p.fill("input[name=code]", otp.now())  # type: ignore[attr-defined]
    p.click("text=Turn on")  # type: ignore[attr-defined]
    recovery_codes = p.locator("[data-recovery-codes] li").all_inner_texts()  # type: ignore[attr-defined]
    assert len(recovery_codes) == 10
    p.screenshot(path=str(screens / "04-security-on.png"), full_page=True)  # type: ignore[attr-defined]

    # Out and in again: the password, then the next step's code (one step of skew).
    log_out(p)
    log_in(p, base, ALICE, password)
    p.wait_for_url("**/login/second-factor")  # type: ignore[attr-defined]
    p.screenshot(path=str(screens / "05-second-factor.png"))  # type: ignore[attr-defined]
    code = otp.at(time.time() + 30)
    p.fill("input[name=code]", code)  # type: ignore[attr-defined]
    p.click("button[type=submit]")  # type: ignore[attr-defined]
    p.wait_for_url("**/account/")  # type: ignore[attr-defined]

    # The same code again is refused: a replay within its window.
    log_out(p)
    log_in(p, base, ALICE, password)
    p.wait_for_url("**/login/second-factor")  # type: ignore[attr-defined]
    p.fill("input[name=code]", code)  # type: ignore[attr-defined]
    p.click("button[type=submit]")  # type: ignore[attr-defined]
    assert "already used" in p.inner_text("[role=alert]")  # type: ignore[attr-defined]
    assert p.url.endswith("/login/second-factor")  # type: ignore[attr-defined]
    # Every code of this window is spent now; a recovery code stands in, once.
    p.fill("input[name=code]", recovery_codes[0])  # type: ignore[attr-defined]
    p.click("button[type=submit]")  # type: ignore[attr-defined]
    p.wait_for_url("**/account/")  # type: ignore[attr-defined]

    # An app password: works over IMAP, where the account password no longer does.
    p.goto(base + "/account/app-passwords")  # type: ignore[attr-defined]
    p.fill("input[name=label]", "Thunderbird")  # type: ignore[attr-defined]
    p.click("text=Create")  # type: ignore[attr-defined]
    app_password = p.inner_text("[data-new-app-password]").strip()  # type: ignore[attr-defined]
    p.screenshot(path=str(screens / "06-app-passwords.png"), full_page=True)  # type: ignore[attr-defined]
    assert imap_login(server, ALICE, app_password) == "OK"
    assert "use an app password" in imap_login(server, ALICE, password)

    # A form on another site posting to the portal is refused.
    evil = EvilSite(base + "/account/app-passwords")
    try:
        p.goto(evil.url)  # type: ignore[attr-defined]
        with p.expect_response(base + "/account/app-passwords") as answer:  # type: ignore[attr-defined]
            p.click("button")  # type: ignore[attr-defined]
        assert answer.value.status == 403
    finally:
        evil.close()
    p.goto(base + "/account/app-passwords")  # type: ignore[attr-defined]
    assert "Evil" not in p.content()  # type: ignore[attr-defined]

    # Revoked: IMAP refuses it at once.
    p.click("tr:has-text('Thunderbird') button")  # type: ignore[attr-defined]
    p.wait_for_selector("text=The app password is revoked.")  # type: ignore[attr-defined]
    assert "AUTHENTICATIONFAILED" in imap_login(server, ALICE, app_password)
    for path, name in [
        ("/account/spam", "07-spam.png"),
        ("/account/aliases", "08-aliases.png"),
        ("/account/sessions", "09-sessions.png"),
        ("/account/tokens", "10-tokens.png"),
        ("/account/admin/", "11-admin.png"),
        ("/account/admin/domains/example.test", "12-domain.png"),
    ]:
        p.goto(base + path)  # type: ignore[attr-defined]
        p.screenshot(path=str(screens / name), full_page=True)  # type: ignore[attr-defined]


def test_passkey_alone_unlocks_the_mailbox(server: DataDir, page: object, screens: Path) -> None:
    p: object = page
    base = base_url(server)
    bob = "bob@example.test"
    cdp = p.context.new_cdp_session(p)  # type: ignore[attr-defined]
    cdp.send("WebAuthn.enable")
    options = {
        "protocol": "ctap2",
        "transport": "internal",
        "hasResidentKey": True,
        "hasUserVerification": True,
        "isUserVerified": True,
        "automaticPresenceSimulation": True,
        "hasPrf": True,
    }
    cdp.send("WebAuthn.addVirtualAuthenticator", {"options": options})
    log_in(p, base, bob, PASSWORDS[bob])
    p.wait_for_url("**/account/")  # type: ignore[attr-defined]
    p.goto(base + "/account/security")  # type: ignore[attr-defined]
    p.fill("[data-passkey-name]", "Virtual key")  # type: ignore[attr-defined]
    p.click("[data-passkey-register]")  # type: ignore[attr-defined]
    p.wait_for_selector("text=Passkey “Virtual key” added")  # type: ignore[attr-defined]
    row = p.inner_text("tr:has(input[value='Virtual key'])")  # type: ignore[attr-defined]
    assert "yes" in row, "the virtual authenticator's PRF did not make a key slot"
    p.screenshot(path=str(screens / "13-passkeys.png"), full_page=True)  # type: ignore[attr-defined]

    # Log out, then in with the passkey alone: nothing typed.
    log_out(p)
    p.click("[data-passkey-login]")  # type: ignore[attr-defined]
    p.wait_for_url("**/account/")  # type: ignore[attr-defined]
    assert "passkey" in p.inner_text("table")  # type: ignore[attr-defined]
    # The session holds the real mailbox key: an app password made now opens IMAP.
    p.goto(base + "/account/app-passwords")  # type: ignore[attr-defined]
    p.fill("input[name=label]", "from passkey")  # type: ignore[attr-defined]
    p.click("text=Create")  # type: ignore[attr-defined]
    secret = p.inner_text("[data-new-app-password]").strip()  # type: ignore[attr-defined]
    assert imap_login(server, bob, secret) == "OK"
    # With a passkey registered 2FA is on: the account password is refused over IMAP.
    assert "use an app password" in imap_login(server, bob, PASSWORDS[bob])


class EvilSite:
    """Another origin (plain HTTP on another port) whose page posts a form to the portal."""

    def __init__(self, target: str) -> None:
        page = (
            f'<!doctype html><form method="post" action="{target}">'
            '<input name="label" value="Evil"><input name="csrf" value="guess">'
            "<button>win a prize</button></form>"
        ).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_passkey_without_prf_is_a_second_factor(server: DataDir, page: object) -> None:
    """An authenticator without PRF: the passkey is a second factor after the password, and
    alone it cannot log in (it holds no key to the mailbox)."""
    p: object = page
    base = base_url(server)
    address, password = "erin@example.test", "erin-long-password"
    app = server.app()
    try:
        app.accounts.create_user(address, password)
    finally:
        app.close()
    cdp = p.context.new_cdp_session(p)  # type: ignore[attr-defined]
    cdp.send("WebAuthn.enable")
    options = {
        "protocol": "ctap2",
        "transport": "internal",
        "hasResidentKey": True,
        "hasUserVerification": True,
        "isUserVerified": True,
        "automaticPresenceSimulation": True,
        "hasPrf": False,
    }
    cdp.send("WebAuthn.addVirtualAuthenticator", {"options": options})
    log_in(p, base, address, password)
    p.wait_for_url("**/account/")  # type: ignore[attr-defined]
    p.goto(base + "/account/security")  # type: ignore[attr-defined]
    p.fill("[data-passkey-name]", "Plain key")  # type: ignore[attr-defined]
    p.click("[data-passkey-register]")  # type: ignore[attr-defined]
    p.wait_for_selector("text=added as a second factor")  # type: ignore[attr-defined]
    log_out(p)
    # Alone: refused, with the reason.
    p.click("[data-passkey-login]")  # type: ignore[attr-defined]
    p.wait_for_selector("[data-passkey-error]:has-text('second factor only')")  # type: ignore[attr-defined]
    # After the password: accepted as the second factor.
    log_in(p, base, address, password)
    p.wait_for_url("**/login/second-factor")  # type: ignore[attr-defined]
    p.click("[data-passkey-login]")  # type: ignore[attr-defined]
    p.wait_for_url("**/account/")  # type: ignore[attr-defined]
    assert "password + passkey" in p.inner_text("table")  # type: ignore[attr-defined]


def test_forwarding_is_set_and_stopped(server: DataDir, page: object, screens: Path) -> None:
    p: object = page
    base = base_url(server)
    address, password = "frank@example.test", "frank-long-password"
    app = server.app()
    try:
        app.accounts.create_user(address, password)
    finally:
        app.close()
    log_in(p, base, address, password)
    p.wait_for_url("**/account/")  # type: ignore[attr-defined]
    p.click("nav >> text=Forwarding")  # type: ignore[attr-defined]
    p.fill("textarea[name=targets]", "frank@outside.test")  # type: ignore[attr-defined]
    p.uncheck("input[name=keep_copy]")  # type: ignore[attr-defined]
    p.click("text=Save")  # type: ignore[attr-defined]
    assert "no copy is kept here" in p.inner_text("[data-forwarding-now]")  # type: ignore[attr-defined]
    p.screenshot(path=str(screens / "09-forwarding.png"), full_page=True)  # type: ignore[attr-defined]
    p.click("text=Stop forwarding")  # type: ignore[attr-defined]
    assert "no longer forwarded" in p.inner_text("[role=status]")  # type: ignore[attr-defined]
    assert p.locator("[data-forwarding-now]").count() == 0  # type: ignore[attr-defined]
