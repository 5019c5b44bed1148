"""The account portal on a real cluster (issue #20): sessions in Redis, mailbox pages through
the user's mailbox node.

Two fronts, two mailbox nodes, the directory in PostgreSQL and Redis over verified TLS (as
tests/test_cluster.py builds them, without replicas): the session's cluster, shared with
tests/test_cluster_accounts.py (tests/cluster_shared.py). A browser logs in on one front and
goes on on the other; logging out or "log out everywhere else" on one ends the session on
both; the mbox export and the week's Junk come from the user's mailbox node through either
front; and a front's certificate alone cannot read anyone's mailbox on the internal service.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import imaplib
import json
import mailbox
import os
import re
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backup_kit import user_id
from cluster_kit import FRONTS, MAILBOX_NODES, ClusterKit, TlsRedis
from harness import client_tls_context
from portal_kit import Browser, base_url, imap_login
from postvern.accounts.passkeys import Passkeys
from postvern.accounts.settings import Settings
from postvern.accounts.store import AccountStore
from postvern.app import App
from postvern.cluster import nodes, pki, portal
from postvern.web.portal.security import COOKIE

ARRIVAL_WAIT = 60.0  # bounds a broken cluster; no time is asserted


@pytest.fixture(scope="module")
def cluster(shared_cluster: ClusterKit) -> ClusterKit:
    """The session's cluster (tests/cluster_shared.py): its fronts have reauth_minutes = 0,
    so every export asks for the password again and confirms cross fronts."""
    return shared_cluster


def _user_on(kit: ClusterKit, node: str) -> str:
    return next(a for a in sorted(kit.passwords) if kit.owner(a) == node)


class Fronts(Browser):
    """One browser (one cookie jar) that may talk to either front."""

    def __init__(self, kit: ClusterKit) -> None:
        super().__init__(kit.front(FRONTS[0]))
        self.kit = kit

    def on(self, front: str) -> Fronts:
        self.base = base_url(self.kit.front(front))
        return self

    def token(self) -> str:
        return next(c.value for c in self.http.cookie_jar if c.key == COOKIE)


@pytest.fixture
async def browser(cluster: ClusterKit) -> AsyncIterator[Fronts]:
    b = Fronts(cluster)
    yield b
    await b.close()


async def _logged_in(b: Fronts, front: str, address: str) -> bool:
    r = await b.on(front).http.get(b.base + "/account/", allow_redirects=False)
    return r.status == 200 and address in await r.text()


async def test_a_session_made_on_one_front_is_valid_on_the_other_until_logout_there(
    cluster: ClusterKit, browser: Fronts, tls_redis: TlsRedis
) -> None:
    address = _user_on(cluster, MAILBOX_NODES[0])
    r = await browser.on(FRONTS[0]).login(address, cluster.passwords[address])
    assert r.status == 200 and address in browser.last
    assert await _logged_in(browser, FRONTS[1], address)

    # Redis holds neither the cookie nor its SHA-256 (the in-process key), nor the address.
    token = browser.token()
    dump = tls_redis.command(b"KEYS postvern:portal:*")
    assert b"postvern:portal:s:" in dump
    for secret in (token.encode(), hashlib.sha256(token.encode()).hexdigest().encode()):
        assert secret not in dump
    # Every session there (the cluster is shared: other tests' sessions may be there too).
    rids = [w for w in dump.split(b"\r\n") if w.startswith(b"postvern:portal:s:")]
    for rid in rids:
        assert address.encode() not in tls_redis.command(b"GET " + rid)
        ttl = int(tls_redis.command(b"TTL " + rid).strip().lstrip(b":"))
        assert ttl > 0  # expires by itself

    await browser.on(FRONTS[1]).get("/account/")
    r = await browser.post("/account/logout")
    assert r.status == 200 and "/account/login" in str(r.url)
    browser.http.cookie_jar.update_cookies({COOKIE: token})  # the old cookie, replayed
    assert not await _logged_in(browser, FRONTS[0], address)
    assert not await _logged_in(browser, FRONTS[1], address)


async def test_log_out_everywhere_else_on_one_front_ends_a_session_made_on_the_other(
    cluster: ClusterKit, browser: Fronts
) -> None:
    address = _user_on(cluster, MAILBOX_NODES[1])
    other = Fronts(cluster)
    try:
        await other.on(FRONTS[0]).login(address, cluster.passwords[address])
        await browser.on(FRONTS[1]).login(address, cluster.passwords[address])
        await browser.get("/account/sessions")
        assert browser.last.count("<tr><td>") >= 2  # both sessions listed, on either front
        assert "this one" in browser.last
        r = await browser.post("/account/sessions/revoke")
        assert r.status == 200 and "other session(s) ended" in browser.last
        assert not await _logged_in(other, FRONTS[0], address)
        assert await _logged_in(browser, FRONTS[0], address)
    finally:
        await other.close()


def _append(kit: ClusterKit, address: str, folder: str, subject: str) -> None:
    """A message put into ``folder`` over IMAP through a front (as a client files one)."""
    host, port = kit.front(FRONTS[0]).addr("imaps")
    message = (
        f"From: someone@outside.test\r\nTo: {address}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4()}@outside.test>\r\n\r\nFrom the body of {subject}\r\n"
    )
    with imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30) as imap:
        imap.login(address, kit.passwords[address])
        typ, _ = imap.append(folder, "", imaplib.Time2Internaldate(time.time()), message.encode())
        assert typ == "OK", folder
        imap.logout()


async def test_mbox_export_and_junk_come_from_the_users_mailbox_node_through_either_front(
    cluster: ClusterKit, browser: Fronts, tmp_path: Path
) -> None:
    address = _user_on(cluster, MAILBOX_NODES[1])
    kept, junk = f"kept {uuid.uuid4().hex[:8]}", f"junk {uuid.uuid4().hex[:8]}"
    _append(cluster, address, "INBOX", kept)
    _append(cluster, address, "Junk", junk)
    await browser.on(FRONTS[0]).login(address, cluster.passwords[address])

    await browser.on(FRONTS[1]).get("/account/spam")
    assert junk in browser.last and kept not in browser.last

    # reauth_minutes = 0: confirm on one front, download on the other.
    await browser.on(FRONTS[0]).get("/account/confirm?action=export")
    r = await browser.http.post(
        browser.base + "/account/confirm",
        data={"csrf": browser.csrf, "action": "export", "confirm": cluster.passwords[address]},
        headers={"Origin": browser.base},
        allow_redirects=False,
    )
    assert r.status == 303 and r.headers["Location"] == "/account/export.mbox"
    r = await browser.on(FRONTS[1]).http.get(browser.base + "/account/export.mbox")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/mbox")
    assert r.headers.get("Transfer-Encoding") == "chunked"  # streamed, no length up front
    path = tmp_path / "export.mbox"
    with path.open("wb") as out:
        async for chunk in r.content.iter_chunked(4096):
            out.write(chunk)
    box = mailbox.mbox(path, create=False)
    try:
        subjects = {str(box[k]["Subject"]): str(box[k]["X-Folder"]) for k in box.keys()}
    finally:
        box.close()
    assert subjects[kept] == "INBOX" and subjects[junk] == "Junk"
    assert b"\n>From the body of" in path.read_bytes()  # mboxrd quoting, from the node


async def test_after_the_mailbox_node_restarts_the_portal_asks_for_the_password_again(
    cluster: ClusterKit, browser: Fronts
) -> None:
    """The node's grants live in its memory: gone with a restart, the session stays logged
    in but must confirm the password before the mailbox opens again (on the node)."""
    node = MAILBOX_NODES[0]
    address = _user_on(cluster, node)
    junk = f"junk {uuid.uuid4().hex[:8]}"
    _append(cluster, address, "Junk", junk)
    await browser.on(FRONTS[0]).login(address, cluster.passwords[address])
    await browser.get("/account/spam")
    assert junk in browser.last
    cluster.procs[node].stop()
    cluster.start(node)

    await browser.on(FRONTS[1]).get("/account/spam")
    assert "not open in this session" in browser.last and junk not in browser.last
    r = await browser.http.get(browser.base + "/account/export.mbox", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/account/confirm?action=export"
    await browser.get("/account/confirm?action=junk")
    form = {"action": "junk", "confirm": cluster.passwords[address]}
    r = await browser.on(FRONTS[0]).post("/account/confirm", form)
    assert r.status == 200 and junk in browser.last


def _internal(kit: ClusterKit, node: str, cert_of: str) -> ssl.SSLSocket:
    """A portal connection to ``node`` with the certificate of node ``cert_of``."""
    folder = kit.admin / nodes.CLUSTER_DIR
    identity = pki.NodeIdentity(
        folder / pki.CA_CERT,
        folder / pki.NODES_SUBDIR / cert_of / pki.NODE_CERT,
        folder / pki.NODES_SUBDIR / cert_of / pki.NODE_KEY,
    )
    ctx = identity.client_context(portal.ALPN)
    raw = socket.create_connection(kit.node_list[node].hostport, timeout=30)
    return ctx.wrap_socket(raw, server_hostname=node)


def _ask(kit: ClusterKit, node: str, request: dict[str, object], cert_of: str) -> dict[str, object]:
    try:
        with _internal(kit, node, cert_of) as tls:
            tls.sendall(json.dumps(request).encode() + b"\n")
            answer = tls.makefile("rb").readline()
    except (ConnectionResetError, ssl.SSLError):  # closed after the handshake
        answer = b""
    if not answer:
        return {"closed": True}
    found = json.loads(answer)
    assert isinstance(found, dict)
    return found


async def test_a_front_certificate_cannot_read_a_mailbox_without_its_users_own_login(
    cluster: ClusterKit,
) -> None:
    node = MAILBOX_NODES[0]
    mine, theirs = [a for a in sorted(cluster.passwords) if cluster.owner(a) == node][:2]
    their_id, my_id = user_id(cluster.seed, theirs), user_id(cluster.seed, mine)
    front = FRONTS[0]

    def ask(request: dict[str, object], cert_of: str = front) -> dict[str, object]:
        return _ask(cluster, node, request, cert_of)

    forged = {"op": "mbox", "user": their_id, "grant": "made-up"}
    assert await asyncio.to_thread(ask, forged) == {"ok": False, "error": "grant"}
    wrong = {"op": "login", "address": theirs, "secret": "not-the-password", "ip": "192.0.2.1"}
    assert await asyncio.to_thread(ask, wrong) == {"ok": False, "error": "failed"}
    # My own login gives a grant for my mailbox, and for nobody else's.
    login = {"op": "login", "address": mine, "secret": cluster.passwords[mine], "ip": "192.0.2.1"}
    answer = await asyncio.to_thread(ask, login)
    assert answer["ok"] is True and answer["user"] == my_id and "secret" not in answer
    grant = str(answer["grant"])
    for op in ("mbox", "junk", "recovery-key", "app-password"):
        refused = await asyncio.to_thread(ask, {"op": op, "user": their_id, "grant": grant})
        assert refused == {"ok": False, "error": "grant"}, op
    assert (await asyncio.to_thread(ask, {"op": "junk", "user": my_id, "grant": grant}))["ok"]
    made_up = {"op": "passkey-login", "user": their_id, "passkey": 1, "prf": "A" * 44}
    assert await asyncio.to_thread(ask, made_up) == {"ok": False, "error": "failed"}
    change = {"op": "password", "address": theirs, "current": "guess", "new": "x" * 20}
    assert await asyncio.to_thread(ask, change) == {"ok": False, "error": "failed"}
    # Only fronts may ask at all: a mailbox node's certificate is turned away.
    assert await asyncio.to_thread(ask, login, MAILBOX_NODES[1]) == {"closed": True}
    await asyncio.to_thread(ask, {"op": "revoke", "grant": grant})
    gone = await asyncio.to_thread(ask, {"op": "junk", "user": my_id, "grant": grant})
    assert gone == {"ok": False, "error": "grant"}


async def test_app_passwords_and_password_changes_through_a_front_are_made_on_the_node(
    cluster: ClusterKit, browser: Fronts
) -> None:
    """The front holds no mailbox key: the node wraps the new app password and rewraps the
    password slot with the key it unlocked; mail logins through any front see both."""
    address = _user_on(cluster, MAILBOX_NODES[0])
    old, new = cluster.passwords[address], f"changed-{uuid.uuid4().hex}"
    await browser.on(FRONTS[0]).login(address, old)
    await browser.on(FRONTS[1]).get("/account/app-passwords")
    await browser.post("/account/app-passwords", {"label": "phone"})
    found = re.search(r"data-new-app-password>([^<]+)<", browser.last)
    assert found, browser.last[-500:]
    assert imap_login(cluster.front(FRONTS[0]), address, found.group(1)) == "OK"

    await browser.get("/account/password")
    form = {"current": "not-the-password", "new": new, "repeat": new}
    r = await browser.post("/account/password", form)
    assert r.status == 400 and "current password is not right" in browser.last
    try:
        r = await browser.post("/account/password", {**form, "current": old})
        assert r.status == 200 and "Your password is changed" in browser.last
        assert imap_login(cluster.front(FRONTS[1]), address, new) == "OK"
        assert "AUTHENTICATIONFAILED" in imap_login(cluster.front(FRONTS[1]), address, old)
    finally:
        await browser.get("/account/password")
        await browser.post("/account/password", {"current": new, "new": old, "repeat": old})
    assert imap_login(cluster.front(FRONTS[0]), address, old) == "OK"


def _passkey(kit: ClusterKit, address: str) -> tuple[str, int]:
    """A passkey row for the user, as a registration would leave it (the WebAuthn ceremony
    itself is the single server's, tested with a real browser in test_portal_browser.py).
    Remove it again with :func:`_remove_passkey`: while it is there, two-factor is on and
    the user's mail logins take app passwords only (the cluster is shared)."""
    app = App.open(kit.seed.path)
    try:
        user = app.directory.user(address)
        assert user is not None
        passkeys = Passkeys(AccountStore(app.directory), rp_name="test")
        credential = os.urandom(16)
        with passkeys.store.tx() as c:
            c.execute(
                "INSERT INTO passkeys(user_id, credential_id, public_key, sign_count, name,"
                " created) VALUES(?, ?, ?, ?, ?, ?)",
                (user.id, credential, b"unused here", 0, "test key", int(time.time())),
            )
        found = passkeys.by_credential(credential)
        assert found is not None
        return user.id, found.id
    finally:
        app.close()


def _remove_passkey(kit: ClusterKit, user: str, passkey: int) -> None:
    """The passkey and its key slot gone, as removing it in the portal does."""
    app = App.open(kit.seed.path)
    try:
        assert Passkeys(AccountStore(app.directory), rp_name="test").remove(user, passkey)
    finally:
        app.close()


async def test_a_passkeys_key_slot_is_made_and_opened_on_the_mailbox_node(
    cluster: ClusterKit,
) -> None:
    node = MAILBOX_NODES[1]
    address = _user_on(cluster, node)
    user, passkey = await asyncio.to_thread(_passkey, cluster, address)
    prf = base64.b64encode(os.urandom(32)).decode()

    def ask(request: dict[str, object]) -> dict[str, object]:
        return _ask(cluster, node, request, FRONTS[1])

    try:  # the passkey goes again: other tests log this user in with the password
        login = {"op": "login", "address": address, "secret": cluster.passwords[address], "ip": ""}
        grant = (await asyncio.to_thread(ask, login))["grant"]
        slot = {"op": "passkey-slot", "user": user, "grant": grant, "passkey": passkey, "prf": prf}
        assert await asyncio.to_thread(ask, slot) == {"ok": True}
        unlock = {"op": "passkey-login", "user": user, "passkey": passkey, "prf": prf}
        answer = await asyncio.to_thread(ask, unlock)
        assert answer["ok"] is True and answer["grant"] != grant
        junk = {"op": "junk", "user": user, "grant": answer["grant"]}
        assert (await asyncio.to_thread(ask, junk))["ok"] is True
        wrong = {**unlock, "prf": base64.b64encode(os.urandom(32)).decode()}
        assert await asyncio.to_thread(ask, wrong) == {"ok": False, "error": "failed"}
    finally:
        await asyncio.to_thread(_remove_passkey, cluster, user, passkey)


def _set_disabled(kit: ClusterKit, user_id: str, disabled: bool) -> None:
    app = App.open(kit.seed.path)
    try:
        Settings(AccountStore(app.directory)).set_disabled(user_id, disabled)
    finally:
        app.close()


async def test_a_disabled_account_gets_no_grant_and_loses_the_ones_it_had(
    cluster: ClusterKit,
) -> None:
    node = MAILBOX_NODES[0]
    address = _user_on(cluster, node)
    user = user_id(cluster.seed, address)

    def ask(request: dict[str, object]) -> dict[str, object]:
        return _ask(cluster, node, request, FRONTS[0])

    login = {"op": "login", "address": address, "secret": cluster.passwords[address], "ip": ""}
    grant = (await asyncio.to_thread(ask, login))["grant"]
    await asyncio.to_thread(_set_disabled, cluster, user, True)
    try:
        junk = {"op": "junk", "user": user, "grant": grant}
        assert await asyncio.to_thread(ask, junk) == {"ok": False, "error": "grant"}
        assert await asyncio.to_thread(ask, login) == {"ok": False, "error": "failed"}
    finally:
        await asyncio.to_thread(_set_disabled, cluster, user, False)
    assert await asyncio.to_thread(ask, junk) == {"ok": False, "error": "grant"}  # forgotten
