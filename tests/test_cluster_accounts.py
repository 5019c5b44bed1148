"""Accounts on a real cluster (issue #20): mail logins and new users go to the mailbox node.

Two fronts, two mailbox nodes, the directory in PostgreSQL and Redis over verified TLS (built
by cluster_kit as for tests/test_cluster.py): the session's cluster, shared with
tests/test_cluster_portal.py (tests/cluster_shared.py). SMTP submission AUTH through a front
is checked by the user's mailbox node over the internal portal service, so the front runs no
Argon2id and opens no key slot (its ``postvern_kdf_runs`` and ``postvern_warm_logins`` stay
0), while bans and failure counting stay on the fronts, shared through Redis. A user made on
a front (an invitation accepted in its portal, ``postvern user add`` there) gets the mailbox
file on the mailbox node the map names, and on no other machine; a ``create`` retried with
its token after a lost answer gets that answer again and makes the user once. ``postvern user
passwd``, ``recover`` and ``remove`` on a front are done by the user's mailbox node: Argon2id
and the key there (the new slot carries the node's Argon2id parameters, not the fronts'
different ones), the old secrets refused at once; a removed user's sessions end, then the
directory row, the mailbox file and the spool go.
"""

from __future__ import annotations

import asyncio
import imaplib
import io
import json
import re
import secrets
import smtplib
import time
import uuid
from collections.abc import Callable

import pytest

from cluster_kit import (
    FRONTS,
    MAILBOX_NODES,
    ClusterKit,
    message,
    metrics,
    send_mx,
)
from cluster_shared import FAILURES_TO_BAN, FRONT_TIME_COST, GUESSER
from harness import TEST_KDF, client_tls_context
from portal_kit import Browser, imap_login
from postvern import cli
from postvern.accounts.invitations import Invitations
from postvern.accounts.store import AccountStore
from postvern.app import App
from postvern.cluster import portal
from postvern.directory.accounts import MAILBOX_DIR
from postvern.store.spool import SPOOL_DIR
from test_cluster import _wait_for
from test_cluster_portal import _ask, _internal

# What a mailbox node logs for each login it checked for a front (cluster/portal.py).
VERIFIED = "verified a login for a front"
# Bounds how long a ban made on one front takes to reach the other (it is in Redis at once;
# this only bounds a broken cluster, no time is asserted).
BAN_WAIT = 30.0
# Bounds waiting for a message to reach a node's spool (no time is asserted).
SPOOL_WAIT = 30.0
# Bounds waiting for a node's log line to reach the test's reader thread (no time asserted).
LOG_WAIT = 30.0


@pytest.fixture(scope="module")
def cluster(shared_cluster: ClusterKit) -> ClusterKit:
    """The session's cluster (tests/cluster_shared.py): its fronts ban a client after
    FAILURES_TO_BAN failed logins (the test clients' 127.0.0.1 stays allowlisted, GUESSER is
    not) and have Argon2id parameters of their own (FRONT_TIME_COST)."""
    return shared_cluster


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
    sender = cluster.users_on(MAILBOX_NODES[0])[0]
    recipient = cluster.users_on(MAILBOX_NODES[1])[0]
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
    # What the test_cluster helpers log in with; taken out again, so that the tests sharing
    # the cluster that pick users from it (test_cluster_portal.py) never meet this one.
    kit.passwords[address] = password
    try:
        for sender, reader in ((FRONTS[0], FRONTS[1]), (FRONTS[1], FRONTS[0])):
            assert imap_login(kit.front(reader), address, password) == "OK"
            subject = f"to a new user via {sender} {uuid.uuid4().hex[:8]}"
            send_mx(kit, sender, address, subject)
            assert _wait_for(kit, reader, address, subject).count(subject) == 1
    finally:
        del kit.passwords[address]


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
    taken = cluster.users_on(node)[0]

    def ask(request: dict[str, object], cert_of: str = FRONTS[0]) -> dict[str, object]:
        return _ask(cluster, node, request, cert_of)

    verify = {"op": "verify", "address": taken, "secret": cluster.passwords[taken], "ip": ""}
    imap = {**verify, "protocol": "imap"}
    assert await asyncio.to_thread(ask, imap) == {"ok": False, "error": "unknown request"}
    assert (await asyncio.to_thread(ask, {**verify, "protocol": "smtp"}))["ok"] is True
    wrong = {**verify, "protocol": "smtp", "secret": "not-the-password"}
    assert await asyncio.to_thread(ask, wrong) == {"ok": False, "error": "failed"}

    create = {"op": "create", "address": f"new-{uuid.uuid4().hex[:8]}@{cluster.seed.domain}",
              "password": None, "quota": 0, "token": secrets.token_urlsafe(32)}  # fmt: skip
    for bad_id in ("../../etc", "A" * 32, 7):
        refused = await asyncio.to_thread(ask, {**create, "user": bad_id})
        assert refused == {"ok": False, "error": "unknown request"}, bad_id
    for bad_token in (None, "short", "x" * 43 + "/"):
        request = {**create, "user": uuid.uuid4().hex, "token": bad_token}
        refused = await asyncio.to_thread(ask, request)
        assert refused == {"ok": False, "error": "unknown request"}, bad_token
    again = {**create, "address": taken, "user": uuid.uuid4().hex}
    answer = await asyncio.to_thread(ask, again)
    assert answer["ok"] is False and "already exists" in str(answer["message"])
    assert await asyncio.to_thread(ask, again, MAILBOX_NODES[1]) == {"closed": True}


def test_submission_auth_for_a_user_whose_node_is_down_is_a_temporary_failure(
    cluster: ClusterKit,
) -> None:
    node = MAILBOX_NODES[1]
    address = cluster.users_on(node)[0]
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
    address = cluster.users_on(MAILBOX_NODES[1])[0]
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


# -- account administration on a front: done where the mailbox lives -------------------------


def _on_front(
    capsys: pytest.CaptureFixture[str], kit: ClusterKit, front: str, command: str, stdin: str = ""
) -> tuple[int, str]:
    """``postvern --data FRONT COMMAND`` with ``stdin`` as standard input (the secrets of
    ``--password-stdin``, one per line); (status, what it printed)."""
    capsys.readouterr()
    saved = cli.sys.stdin
    cli.sys.stdin = io.StringIO(stdin)
    try:
        status = cli.main(["--data", str(kit.front(front).path), *command.split()])
    finally:
        cli.sys.stdin = saved
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def _secrets_on_front(
    capsys: pytest.CaptureFixture[str],
    kit: ClusterKit,
    front: str,
    command: str,
    address: str,
    old: str,
    new: str,
) -> tuple[int, str]:
    """``user passwd`` (old: the current secret) or ``user recover`` (old: the recovery
    key) on a front, the secrets given on standard input."""
    command = f"user {command} {address} --password-stdin"
    return _on_front(capsys, kit, front, command, f"{old}\n{new}\n")


def _add_on_front(kit: ClusterKit, capsys: pytest.CaptureFixture[str]) -> tuple[str, str, str]:
    """A new user made through a front: (address, generated password, recovery key). Not in
    ``kit.passwords``: the other tests' helpers never meet it."""
    address = f"admin-{uuid.uuid4().hex[:8]}@{kit.seed.domain}"
    status, out = _on_front(capsys, kit, FRONTS[0], f"user add {address} --generate")
    password = re.search(r"^password: (\S+)$", out, re.MULTILINE)
    recovery = re.search(r"^recovery key: (.+)$", out, re.MULTILINE)
    assert status == 0 and password and recovery, out
    return address, password.group(1), recovery.group(1).strip()


def _logged(kit: ClusterKit, node: str, text: str) -> int:
    return sum(text in line for line in kit.procs[node].output)


def _logged_once_at(kit: ClusterKit, node: str, text: str, expected: int) -> int:
    """How often the node has logged ``text``, read once the count reaches ``expected`` or
    LOG_WAIT has passed. The node writes its line before it answers, but the test harness
    reads the node's output in a thread of its own, so under load the line can reach the
    test a moment after the answer did; the caller still asserts the exact count."""
    deadline = time.monotonic() + LOG_WAIT
    while (count := _logged(kit, node, text)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def _directory(kit: ClusterKit, read: Callable[[App], object]) -> object:
    app = App.open(kit.seed.path)
    try:
        return read(app)
    finally:
        app.close()


def _password_time_cost(kit: ClusterKit, address: str) -> int:
    """The Argon2id time cost of the user's password slot: whose parameters wrapped it."""

    def read(app: App) -> int:
        user = app.directory.user(address)
        assert user is not None
        (slot,) = app.directory.slots(user.id, "password")
        return slot.wrapped.params.time_cost

    cost = _directory(kit, read)
    assert isinstance(cost, int)
    return cost


def test_passwd_on_a_front_is_done_by_the_users_mailbox_node(
    cluster: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    address, password, _ = _add_on_front(cluster, capsys)
    node = _lives_only_on_its_node(cluster, address)
    reader = cluster.front(FRONTS[1])
    assert imap_login(reader, address, password) == "OK"  # now warm in the node's cache
    changed, metrics_before = _logged(cluster, node, portal.CHANGED_LOG), _front_metrics(cluster)

    new = f"changed-{uuid.uuid4().hex}"
    status, out = _secrets_on_front(capsys, cluster, FRONTS[0], "passwd", address, password, new)
    assert status == 0 and "password changed" in out, out
    assert _logged_once_at(cluster, node, portal.CHANGED_LOG, changed + 1) == changed + 1
    # The new slot was wrapped by the node's Argon2id, not with the fronts' parameters.
    assert _password_time_cost(cluster, address) == TEST_KDF["time_cost"] != FRONT_TIME_COST
    # Over IMAP on the node (through a front): the old password stops at once, warm or not.
    assert imap_login(reader, address, password) != "OK"
    assert imap_login(reader, address, new) == "OK"

    # As on one machine the current secret may be an app password, and app passwords stay.
    app_password = _directory(
        cluster, lambda app: app.accounts.add_app_password(address, new, "phone")
    )
    assert isinstance(app_password, str)
    newer = f"newer-{uuid.uuid4().hex}"
    status, out = _secrets_on_front(
        capsys, cluster, FRONTS[1], "passwd", address, app_password, newer
    )
    assert status == 0, out
    for secret, works in ((new, False), (newer, True), (app_password, True)):
        assert (imap_login(reader, address, secret) == "OK") is works, secret
    # A wrong current password changes nothing.
    status, out = _secrets_on_front(
        capsys, cluster, FRONTS[0], "passwd", address, f"wrong-{newer}", "not-taken-password"
    )
    assert status == 1 and "wrong address or password" in out, out
    assert imap_login(reader, address, newer) == "OK"
    assert _logged_once_at(cluster, node, portal.CHANGED_LOG, changed + 2) == changed + 2
    assert _front_metrics(cluster) == metrics_before  # no front logged in or ran Argon2id


def _front_metrics(kit: ClusterKit) -> dict[str, tuple[float, float]]:
    return {f: _front_logins(kit, f) for f in FRONTS}


def test_recover_on_a_front_is_done_by_the_users_mailbox_node(
    cluster: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    address, password, recovery = _add_on_front(cluster, capsys)
    node = _lives_only_on_its_node(cluster, address)
    reader = cluster.front(FRONTS[0])
    recovered = _logged(cluster, node, portal.RECOVERED_LOG)

    new = f"recovered-{uuid.uuid4().hex}"
    status, out = _secrets_on_front(capsys, cluster, FRONTS[1], "recover", address, recovery, new)
    fresh = re.search(r"^new recovery key: (.+?)  \(", out, re.MULTILINE)
    assert status == 0 and fresh, out
    assert _logged_once_at(cluster, node, portal.RECOVERED_LOG, recovered + 1) == recovered + 1
    assert _password_time_cost(cluster, address) == TEST_KDF["time_cost"] != FRONT_TIME_COST
    assert imap_login(reader, address, password) != "OK"
    assert imap_login(reader, address, new) == "OK"
    # The recovery key just typed is replaced: it opens nothing now; the new one does.
    status, out = _secrets_on_front(
        capsys, cluster, FRONTS[0], "recover", address, recovery, f"again-{new}"
    )
    assert status == 1 and "recovery key does not open" in out, out
    status, out = _secrets_on_front(
        capsys, cluster, FRONTS[0], "recover", address, fresh.group(1), f"again-{new}"
    )
    assert status == 0, out
    assert imap_login(reader, address, f"again-{new}") == "OK"


def _user_id(kit: ClusterKit, address: str) -> str:
    user = _directory(kit, lambda app: app.directory.user(address))
    assert user is not None
    return str(user.id)  # type: ignore[attr-defined]


def _files_of(kit: ClusterKit, user_id: str) -> list[str]:
    """Every path of every node's data directory that names the user."""
    return [
        f"{name}: {path.relative_to(data.path)}"
        for name, data in kit.nodes.items()
        for path in data.path.rglob("*")
        if user_id in str(path.relative_to(data.path))
    ]


def test_user_remove_on_a_front_removes_the_mailbox_on_its_node_then_the_user(
    cluster: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    address, password, _ = _add_on_front(cluster, capsys)
    node = _lives_only_on_its_node(cluster, address)
    user_id = _user_id(cluster, address)
    spool = cluster.nodes[node].path / SPOOL_DIR / user_id
    # Mail for a user nobody is logged in as waits sealed in the node's spool.
    send_mx(cluster, FRONTS[0], address, f"before removal {uuid.uuid4().hex[:8]}")
    deadline = time.monotonic() + SPOOL_WAIT
    while not list(spool.glob("*.sealed")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(spool.glob("*.sealed")), "the message reached the node's spool"
    # A session is open through a front, the mailbox unlocked on the node, as it is removed.
    host, port = cluster.front(FRONTS[1]).addr("imaps")
    session = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=30)
    session.login(address, password)
    assert session.select("INBOX")[0] == "OK"
    removed = _logged(cluster, node, portal.REMOVED_LOG)
    # On the other mailbox node the command refuses: the files are not there to remove.
    other = next(n for n in MAILBOX_NODES if n != node)
    capsys.readouterr()
    assert cli.main(["--data", str(cluster.nodes[other].path), "user", "remove", address,
                     "--yes"]) == 1  # fmt: skip
    assert f"{address} lives on {node}" in capsys.readouterr().err
    assert _user_id(cluster, address) == user_id

    status, out = _on_front(capsys, cluster, FRONTS[0], f"user remove {address} --yes")
    assert status == 0 and f"removed {address} and their mailbox on {node}" in out, out
    assert "left on" not in out
    assert _logged_once_at(cluster, node, portal.REMOVED_LOG, removed + 1) == removed + 1
    with pytest.raises((imaplib.IMAP4.abort, OSError)):  # the node ended it first
        session.noop()
    session.shutdown()
    assert _files_of(cluster, user_id) == []  # mailbox, its -wal/-shm and the spool: gone
    assert _directory(cluster, lambda app: app.directory.user(address)) is None
    assert imap_login(cluster.front(FRONTS[0]), address, password) != "OK"
    status, out = _on_front(capsys, cluster, FRONTS[1], f"user remove {address} --yes")
    assert status == 1 and "no such user" in out, out


def _hang_up_after(kit: ClusterKit, node: str, request: dict[str, object]) -> None:
    """Send a request and close at once: its answer is lost on the way."""
    with _internal(kit, node, FRONTS[0]) as tls:
        tls.sendall(json.dumps(request).encode() + b"\n")


async def test_a_create_retried_with_its_token_after_a_lost_answer_makes_the_user_once(
    cluster: ClusterKit,
) -> None:
    node = MAILBOX_NODES[1]
    user_id = uuid.uuid4().hex
    address = f"retried-{uuid.uuid4().hex[:8]}@{cluster.seed.domain}"
    create = {
        "op": "create",
        "user": user_id,
        "address": address,
        "password": None,
        "quota": 0,
        "token": secrets.token_urlsafe(32),
    }

    def ask(request: dict[str, object]) -> dict[str, object]:
        return _ask(cluster, node, request, FRONTS[0])

    created, replayed = (
        _logged(cluster, node, t) for t in (portal.CREATED_LOG, portal.REPLAYED_LOG)
    )
    await asyncio.to_thread(_hang_up_after, cluster, node, create)
    first = await asyncio.to_thread(ask, create)  # the retry: the first try's answer
    assert first["ok"] is True and first["user"] == user_id, first
    assert await asyncio.to_thread(ask, create) == first  # same password, same recovery key
    # answered twice more (waited for first: the last line the node writes here)
    assert _logged_once_at(cluster, node, portal.REPLAYED_LOG, replayed + 2) == replayed + 2
    assert _logged(cluster, node, portal.CREATED_LOG) == created + 1  # made once
    # Another token for the same user, or the token for another user: refused, not made.
    other = await asyncio.to_thread(ask, {**create, "token": secrets.token_urlsafe(32)})
    assert other["ok"] is False and "earlier request" in str(other["message"]), other
    stolen = await asyncio.to_thread(ask, {**create, "user": uuid.uuid4().hex})
    assert stolen["ok"] is False and "another user" in str(stolen["message"]), stolen

    assert await asyncio.to_thread(
        _directory,
        cluster,
        lambda app: [u.id for u in app.directory.users() if u.address == address],
    ) == [user_id]
    assert await asyncio.to_thread(_lives_only_on_its_node, cluster, address) == node
    # The answered password is the user's, and the recovery key opens the account.
    reader = cluster.front(FRONTS[1])
    assert await asyncio.to_thread(imap_login, reader, address, str(first["password"])) == "OK"
    opened = await asyncio.to_thread(
        _directory,
        cluster,
        lambda app: app.accounts.recover(address, str(first["recovery"]), f"reset-{user_id}"),
    )
    assert isinstance(opened, str)


def test_user_remove_on_a_front_names_what_it_could_not_remove(
    cluster: ClusterKit, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file the node cannot unlink (here a directory where the mailbox's SQLite journal
    would be: EISDIR, whoever runs the test) is named with the reason and the status is 1;
    the user is gone from the directory all the same, and everything else with it."""
    address, password, _ = _add_on_front(cluster, capsys)
    node = _lives_only_on_its_node(cluster, address)
    user_id = _user_id(cluster, address)
    blocker = cluster.nodes[node].path / MAILBOX_DIR / f"{user_id}.sqlite-journal"
    (blocker / "inside").mkdir(parents=True)
    try:
        status, out = _on_front(capsys, cluster, FRONTS[1], f"user remove {address} --yes")
        assert status == 1, out
        assert f"left on {node}, remove it there by hand: {MAILBOX_DIR}/{user_id}" in out, out
        assert "sqlite-journal (Is a directory)" in out, out
        assert _directory(cluster, lambda app: app.directory.user(address)) is None
        assert sorted(_files_of(cluster, user_id)) == [
            f"{node}: {MAILBOX_DIR}/{user_id}.sqlite-journal",
            f"{node}: {MAILBOX_DIR}/{user_id}.sqlite-journal/inside",
        ]
        assert imap_login(cluster.front(FRONTS[0]), address, password) != "OK"
    finally:
        (blocker / "inside").rmdir()
        blocker.rmdir()


def test_a_kept_create_answer_is_sealed_to_its_token_and_expires() -> None:
    """What a node keeps for a retried ``create``: nothing of the answer in the clear, the
    answer again for its token, nothing after CREATE_REPLAY_SECONDS (no cluster needed)."""
    now = [1000.0]
    replays = portal.CreateReplays(clock=lambda: now[0])
    token, user_id = secrets.token_urlsafe(32), uuid.uuid4().hex
    answer = {"ok": True, "user": user_id, "password": None, "recovery": "ABCD-EFGH-IJKL-MNOP"}
    entry = replays.start(token, user_id, "a@example.test")
    replays.finish(token, entry, answer)
    assert entry.done.is_set() and entry.sealed is not None
    assert b"ABCD" not in entry.sealed and token.encode() not in entry.sealed
    assert replays.find(token) is entry and replays.answer(token, entry) == answer
    # A refused or failed first try is not kept: a retry tries afresh.
    refused = secrets.token_urlsafe(32)
    replays.finish(refused, replays.start(refused, uuid.uuid4().hex, "b@example.test"), None)
    assert replays.find(refused) is None
    now[0] += portal.CREATE_REPLAY_SECONDS + 1
    assert replays.find(token) is None and len(replays) == 0
