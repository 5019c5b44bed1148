"""Accounts on a real cluster (issue #20): mail logins and new users go to the mailbox node.

Two fronts, two mailbox nodes, the directory in PostgreSQL and Redis over verified TLS (built
by cluster_kit as for tests/test_cluster.py). SMTP submission AUTH through a front is checked
by the user's mailbox node over the internal portal service, so the front runs no Argon2id
and opens no key slot (its ``postvern_kdf_runs`` and ``postvern_warm_logins`` stay 0), while
bans and failure counting stay on the fronts, shared through Redis. A user made on a front
(an invitation accepted in its portal, ``postvern user add`` there) gets the mailbox file on
the mailbox node the map names, and on no other machine.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import time
import uuid
from collections.abc import Iterator

import pytest

from cluster_kit import (
    FRONTS,
    MAILBOX_NODES,
    ClusterKit,
    TlsRedis,
    build,
    message,
    metrics,
    send_mx,
)
from harness import client_tls_context, set_config
from pg_server import PostgresTestServer
from portal_kit import Browser, imap_login
from postvern import cli
from postvern.accounts.invitations import Invitations
from postvern.accounts.store import AccountStore
from postvern.app import App
from postvern.directory.accounts import MAILBOX_DIR
from test_cluster import _users_on, _wait_for
from test_cluster_portal import _ask, tls_redis  # noqa: F401 (tls_redis: the module's redis)

# The fronts ban a client after this many failed logins (the default is 10): the guesser
# below reaches it quickly. It comes from its own loopback address, so no other test's
# client is banned with it.
FAILURES_TO_BAN = 3
GUESSER = "127.0.0.3"
# What a mailbox node logs for each login it checked for a front (cluster/portal.py).
VERIFIED = "verified a login for a front"
# Bounds how long a ban made on one front takes to reach the other (it is in Redis at once;
# this only bounds a broken cluster, no time is asserted).
BAN_WAIT = 30.0


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    tls_redis: TlsRedis,  # noqa: F811 (test_cluster_portal's fixture, imported above)
    pg_server: PostgresTestServer,
) -> Iterator[ClusterKit]:
    database = pg_server.new_database().settings()
    kit = build(tmp_path_factory.mktemp("cluster"), redis_url=tls_redis.url, directory=database)
    for front in FRONTS:
        # The test clients' 127.0.0.1 stays allowlisted; the guesser's address is not.
        abuse = {"auth_failures_per_ip": FAILURES_TO_BAN, "allowlist": ["127.0.0.1", "::1"]}
        set_config(kit.nodes[front].path, "abuse", abuse)
    with kit.running():
        yield kit


def _front_logins(kit: ClusterKit, front: str) -> tuple[float, float]:
    """The front's own cold and warm logins (Argon2id runs, cache hits) from /metrics."""
    gauges = metrics(kit, front)
    return gauges["postvern_kdf_runs_total"], gauges["postvern_warm_logins_total"]


def _verified_on(kit: ClusterKit, node: str) -> int:
    return sum(VERIFIED in line and "smtp" in line for line in kit.procs[node].output)


def _connect(
    kit: ClusterKit, front: str, source: str = "127.0.0.1"
) -> smtplib.SMTP:  # STARTTLS done, EHLO again
    host, port = kit.front(front).addr("submission")
    smtp = smtplib.SMTP(host, port, timeout=30, source_address=(source, 0))
    smtp.starttls(context=client_tls_context())
    smtp.ehlo()
    return smtp


def _auth(smtp: smtplib.SMTP, mechanism: str, address: str, secret: str) -> tuple[int, bytes]:
    """One AUTH exchange with exactly this mechanism (smtplib's login() would try the next
    mechanism after a failure, counting twice)."""
    smtp.user, smtp.password = address, secret
    method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
    try:
        return smtp.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")
    except smtplib.SMTPResponseException as e:
        return e.smtp_code, e.smtp_error


def _app_password(kit: ClusterKit, address: str) -> str:
    app = App.open(kit.seed.path)
    try:
        return app.accounts.add_app_password(address, kit.passwords[address], "mail client")
    finally:
        app.close()


def test_submission_auth_through_a_front_is_checked_by_the_users_mailbox_node(
    cluster: ClusterKit,
) -> None:
    """PLAIN with the password on one front, LOGIN with an app password on the other: both
    accepted, the mail delivered, and neither front ran a login of its own."""
    sender = _users_on(cluster, MAILBOX_NODES[0])[0]
    recipient = _users_on(cluster, MAILBOX_NODES[1])[0]
    app_password = _app_password(cluster, sender)
    before = {f: _front_logins(cluster, f) for f in FRONTS}
    node = MAILBOX_NODES[0]
    verified = _verified_on(cluster, node)

    sent = []
    for front, mechanism, secret in (
        (FRONTS[0], "PLAIN", cluster.passwords[sender]),
        (FRONTS[1], "LOGIN", app_password),
        (FRONTS[1], "PLAIN", cluster.passwords[sender]),  # again: the node's login cache
    ):
        subject = f"submitted via {front} {mechanism} {uuid.uuid4().hex[:8]}"
        with _connect(cluster, front) as smtp:
            assert _auth(smtp, mechanism, sender, secret)[0] == 235
            msg = message(recipient, subject)
            msg.replace_header("From", sender)
            smtp.send_message(msg)
        sent.append(subject)
    for subject in sent:
        assert _wait_for(cluster, FRONTS[0], recipient, subject).count(subject) == 1

    assert _verified_on(cluster, node) == verified + 3  # the owning node checked all three
    assert (
        {f: _front_logins(cluster, f) for f in FRONTS} == before == {f: (0.0, 0.0) for f in FRONTS}
    )


def _lives_only_on_its_node(kit: ClusterKit, address: str) -> str:
    """The user's node: the map names it, its file is there and on no other machine."""
    app = App.open(kit.seed.path)
    try:
        user = app.directory.user(address)
        assert user is not None
        node = app.directory.mailbox_node(user.id)  # set at creation, not by a later lookup
    finally:
        app.close()
    assert node in MAILBOX_NODES
    name = f"{user.id}.sqlite"
    holders = [n for n, d in kit.nodes.items() if (d.path / MAILBOX_DIR / name).exists()]
    assert holders == [node]
    assert not (kit.seed.path / MAILBOX_DIR / name).exists()
    return node


def _reaches_its_mailbox(kit: ClusterKit, address: str, password: str) -> None:
    """Logs in over IMAP through either front and receives mail sent through each."""
    kit.passwords[address] = password  # what the test_cluster helpers log in with
    for sender, reader in ((FRONTS[0], FRONTS[1]), (FRONTS[1], FRONTS[0])):
        assert imap_login(kit.front(reader), address, password) == "OK"
        subject = f"to a new user via {sender} {uuid.uuid4().hex[:8]}"
        send_mx(kit, sender, address, subject)
        assert _wait_for(kit, reader, address, subject).count(subject) == 1


def _invite(kit: ClusterKit, address: str) -> str:
    app = App.open(kit.seed.path)
    try:
        invitations = Invitations(AccountStore(app.directory), app.server_key.derive("invitations"))
        return invitations.create(address, 0)
    finally:
        app.close()


async def test_an_invitation_accepted_on_a_front_makes_the_mailbox_on_its_node_only(
    cluster: ClusterKit,
) -> None:
    address = f"invited-{uuid.uuid4().hex[:8]}@{cluster.seed.domain}"
    password = f"invited-{uuid.uuid4().hex}"
    path = f"/account/invite/{await asyncio.to_thread(_invite, cluster, address)}"
    invited = Browser(cluster.front(FRONTS[0]))
    try:
        await invited.get(path)
        assert address in invited.last
        r = await invited.post(path, {"password": password, "repeat": password})
        assert r.status == 200 and "recovery key" in invited.last
    finally:
        await invited.close()
    await asyncio.to_thread(_lives_only_on_its_node, cluster, address)
    await asyncio.to_thread(_reaches_its_mailbox, cluster, address, password)


def test_user_add_on_a_front_makes_the_mailbox_on_its_node_only(
    cluster: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"added-{uuid.uuid4().hex[:8]}@{cluster.seed.domain}"
    front = cluster.front(FRONTS[1]).path
    capsys.readouterr()
    assert cli.main(["--data", str(front), "user", "add", address, "--generate"]) == 0
    found = re.search(r"^password: (\S+)$", capsys.readouterr().out, re.MULTILINE)
    assert found, "a generated password is shown"
    _lives_only_on_its_node(cluster, address)
    _reaches_its_mailbox(cluster, address, found.group(1))
    # The name is taken now, whichever node holds it.
    assert cli.main(["--data", str(front), "user", "add", address, "--generate"]) != 0


async def test_the_internal_create_and_verify_requests_take_only_what_they_are_for(
    cluster: ClusterKit,
) -> None:
    """On the internal service with a front's certificate: ``verify`` checks mail logins
    only (IMAP and POP3 go through the proxy), ``create`` wants a well-formed new id and
    refuses a taken name, and a mailbox node's certificate may ask neither."""
    node = MAILBOX_NODES[0]
    taken = _users_on(cluster, node)[0]

    def ask(request: dict[str, object], cert_of: str = FRONTS[0]) -> dict[str, object]:
        return _ask(cluster, node, request, cert_of)

    verify = {"op": "verify", "address": taken, "secret": cluster.passwords[taken], "ip": ""}
    imap = {**verify, "protocol": "imap"}
    assert await asyncio.to_thread(ask, imap) == {"ok": False, "error": "unknown request"}
    assert (await asyncio.to_thread(ask, {**verify, "protocol": "smtp"}))["ok"] is True
    wrong = {**verify, "protocol": "smtp", "secret": "not-the-password"}
    assert await asyncio.to_thread(ask, wrong) == {"ok": False, "error": "failed"}

    create = {"op": "create", "address": f"new-{uuid.uuid4().hex[:8]}@{cluster.seed.domain}",
              "password": None, "quota": 0}  # fmt: skip
    for bad_id in ("../../etc", "A" * 32, 7):
        refused = await asyncio.to_thread(ask, {**create, "user": bad_id})
        assert refused == {"ok": False, "error": "unknown request"}, bad_id
    again = {**create, "address": taken, "user": uuid.uuid4().hex}
    answer = await asyncio.to_thread(ask, again)
    assert answer["ok"] is False and "already exists" in str(answer["message"])
    assert await asyncio.to_thread(ask, again, MAILBOX_NODES[1]) == {"closed": True}


def test_submission_auth_for_a_user_whose_node_is_down_is_a_temporary_failure(
    cluster: ClusterKit,
) -> None:
    node = MAILBOX_NODES[1]
    address = _users_on(cluster, node)[0]
    cluster.procs[node].stop()
    try:
        with _connect(cluster, FRONTS[0]) as smtp:
            code, text = _auth(smtp, "PLAIN", address, cluster.passwords[address])
        assert (code, text.split()[0]) == (454, b"4.7.0")  # RFC 4954 §6: try again later
    finally:
        cluster.start(node)
    with _connect(cluster, FRONTS[0]) as smtp:
        assert _auth(smtp, "PLAIN", address, cluster.passwords[address])[0] == 235


def _turned_away(kit: ClusterKit, front: str, source: str) -> bool:
    """Whether the front refuses ``source`` at connect (421, banned), waiting a bounded while
    for a ban made on another front to reach it (no time is asserted)."""
    deadline = time.monotonic() + BAN_WAIT
    while True:
        try:
            _connect(kit, front, source).quit()
        except smtplib.SMTPConnectError as e:
            return e.smtp_code == 421
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def test_a_wrong_submission_password_is_refused_counted_and_bans_on_both_fronts(
    cluster: ClusterKit,
) -> None:
    address = _users_on(cluster, MAILBOX_NODES[1])[0]
    for attempt in range(FAILURES_TO_BAN):
        with _connect(cluster, FRONTS[attempt % 2], GUESSER) as smtp:
            code, _ = _auth(smtp, "PLAIN", address, f"not-the-password-{attempt}")
            # Refused; the last failure may already say the client is banned.
            assert code in ((535, 421) if attempt == FAILURES_TO_BAN - 1 else (535,)), attempt
    # Counted by the fronts in Redis, failures on both adding up: both turn the client away
    # at connect now, while another client logs in with the password as before.
    for front in FRONTS:
        assert _turned_away(cluster, front, GUESSER), front
    with _connect(cluster, FRONTS[1]) as smtp:
        assert _auth(smtp, "PLAIN", address, cluster.passwords[address])[0] == 235
    assert {f: _front_logins(cluster, f) for f in FRONTS} == {f: (0.0, 0.0) for f in FRONTS}
