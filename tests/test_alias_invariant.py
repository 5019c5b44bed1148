"""Nothing accepted is ever lost: every recipient that got 250 ends in a mailbox or the queue.

The invariant is checked against the running server over real SMTP, for every kind of address
the directory routes: users, +tag addresses, aliases to users and to outside addresses,
catch-alls, the role addresses (postmaster, abuse), aliases whose user was removed, aliases
left by an older version that lead nowhere or loop. Each recipient gets its own message with a
unique subject; whatever answered 250 to RCPT and DATA is then looked for in every mailbox
and in the outbound queue. Dead ends must have been refused instead: 550 5.1.1, or 550 5.4.6
for a routing loop (RFC 5321 §6.3, RFC 3463).
"""

from __future__ import annotations

import email.utils
import json
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dnsserver import DNSTestServer
from harness import (
    DataDir,
    ServerProcess,
    client_tls_context,
    free_port,
    mailbox_messages,
    make_data_dir,
    set_config,
)
from postvern.directory.db import Directory, DirectoryError
from postvern.directory.forwarding import Forwarding, ForwardingPolicy
from postvern.mta import QUEUE_FILE, QueueStore
from postvern.mta import admin as mta_admin

DOMAIN = "example.test"
CATCH = "catch.test"  # a second domain, with a catch-all
ALICE, BOB, CAROL, DAVE = (f"{n}@{DOMAIN}" for n in ("alice", "bob", "carol", "dave"))
ERIN, FRANK = f"erin@{DOMAIN}", f"frank@{DOMAIN}"  # forward their own mail outside
PASSWORDS = {
    ALICE: "alice-correct-horse",  # created first: postmaster and abuse reach her
    BOB: "bob-battery-staple",
    CAROL: "carol-staple-battery",
    DAVE: "dave-horse-correct",
    ERIN: "erin-staple-horse",
    FRANK: "frank-battery-horse",
}
OUTSIDE = "friend@outside.test"
FRANKS = "franks.test"  # a domain whose catch-all reaches frank


def cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postvern.cli", "--data", str(data), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def insert_alias_unchecked(directory: Directory, address: str, targets: list[str]) -> None:
    """An alias as an older version could leave it: stored without today's checks."""
    local, _, domain = address.partition("@")
    with directory._tx() as c:
        c.execute(
            "INSERT INTO aliases(localpart, domain, targets) VALUES(?, ?, ?)",
            (local, domain, json.dumps(targets)),
        )


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSTestServer]:
    """outside.test's MX is a loopback address where nothing listens: forwarded mail waits
    in the queue (deferred), where the test can find it."""
    with DNSTestServer() as server:
        server.add("outside.test", "MX", "10 mx.outside.test")
        server.add("mx.outside.test", "A", "127.0.0.9")
        yield server


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, dns: DNSTestServer
) -> Iterator[ServerProcess]:
    data = make_data_dir(tmp_path_factory.mktemp("invariant") / "data", passwords=PASSWORDS)
    set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
    set_config(data.path, "mta", {"allow_loopback_mx": True, "port": free_port()})
    app = data.app()
    try:
        d = app.directory
        d.add_domain(CATCH)
        d.add_alias(f"team@{DOMAIN}", [ALICE, BOB])
        d.add_alias(f"sales@{DOMAIN}", [CAROL])
        d.add_alias(f"support@{DOMAIN}", [CAROL, DAVE])
        d.add_alias(f"front@{DOMAIN}", [f"sales@{DOMAIN}"])  # an alias of an alias
        d.add_alias(f"fwd@{DOMAIN}", [OUTSIDE])
        d.add_alias(f"mixed@{DOMAIN}", [BOB, OUTSIDE])
        d.add_alias(f"diamond@{DOMAIN}", [f"team@{DOMAIN}", ALICE])  # two paths, no loop
        d.add_alias(f"@{CATCH}", [DAVE])
        # Users' own forwarding (the portal's): erin keeps a copy, frank does not.
        erin, frank = d.user(ERIN), d.user(FRANK)
        assert erin is not None and frank is not None
        d.set_forwarding(erin.id, [OUTSIDE], keep_copy=True)
        d.set_forwarding(frank.id, [OUTSIDE], keep_copy=False)
        d.add_alias(f"relay@{DOMAIN}", [FRANK, BOB])
        d.add_alias(f"onlyfrank@{DOMAIN}", [FRANK])
        d.add_domain(FRANKS)
        d.add_alias(f"@{FRANKS}", [f"frank+catch@{DOMAIN}"])
    finally:
        app.close()
    # The realistic path to a dead end: the alias's only user is removed afterwards.
    removed = cli(data.path, "user", "remove", CAROL, "--yes")
    assert removed.returncode == 0, removed.stderr
    data.passwords.pop(CAROL)
    app = data.app()
    try:
        d = app.directory
        insert_alias_unchecked(d, f"ghost@{DOMAIN}", [f"nobody@{DOMAIN}"])
        insert_alias_unchecked(d, f"partial@{DOMAIN}", [f"nobody@{DOMAIN}", BOB])
        insert_alias_unchecked(d, f"loop1@{DOMAIN}", [f"loop2@{DOMAIN}"])
        insert_alias_unchecked(d, f"loop2@{DOMAIN}", [f"loop1@{DOMAIN}"])
        insert_alias_unchecked(d, f"self@{DOMAIN}", [f"self@{DOMAIN}", DAVE])
    finally:
        app.close()
    with ServerProcess(data) as proc:
        yield proc


@pytest.fixture
def server(running: ServerProcess) -> DataDir:
    return running.data


def message(subject: str) -> bytes:
    return (
        f"From: sender@remote.test\r\nTo: someone@{DOMAIN}\r\nSubject: {subject}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid()}\r\n"
        "\r\nHello.\r\n"
    ).encode()


def send_one(data: DataDir, rcpt: str, subject: str) -> tuple[int, bytes]:
    """RCPT and, if it was accepted, DATA; the reply that decided the recipient's fate."""
    host, port = data.addr("smtp")
    with smtplib.SMTP(host, port, local_hostname="client.remote.test", timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.ehlo("client.remote.test")
        s.mail("sender@remote.test")
        code, text = s.rcpt(rcpt)
        if code != 250:
            return code, text
        return s.data(message(subject))


def subjects_in_mailboxes(data: DataDir) -> dict[str, set[str]]:
    """Subject → the users whose mailbox (any folder, spool imported) holds it."""
    found: dict[str, set[str]] = {}
    for address in data.passwords:
        for raw in mailbox_messages(data, address, None):
            head = raw.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
            for line in head.split("\r\n"):
                if line.startswith("Subject: "):
                    found.setdefault(line[len("Subject: ") :], set()).add(address)
    return found


def queued_subjects(data: DataDir) -> dict[str, set[str]]:
    """Subject → the outside recipients of the queue entries that carry it."""
    app = data.app()
    try:
        store = QueueStore.open(
            app.settings.path(QUEUE_FILE), app.server_key.derive("queue"), create=False
        )
        try:
            found: dict[str, set[str]] = {}
            for entry in store.list_entries():
                head = mta_admin.show_entry(store, entry.id).headers
                subject = next(
                    line[len("Subject: ") :]
                    for line in head.splitlines()
                    if line.startswith("Subject: ")
                )
                found.setdefault(subject, set()).update(r.address for r in entry.recipients)
            return found
        finally:
            store.close()
    finally:
        app.close()


# recipient → where its mail must end: local users, or "queue" for the outside address.
ROUTES: dict[str, set[str]] = {
    ALICE: {ALICE},
    f"alice+news@{DOMAIN}": {ALICE},
    f"team@{DOMAIN}": {ALICE, BOB},
    f"team+x@{DOMAIN}": {ALICE, BOB},
    f"support@{DOMAIN}": {DAVE},  # carol was taken out of it when she was removed
    f"diamond@{DOMAIN}": {ALICE, BOB},
    f"mixed@{DOMAIN}": {BOB, "queue"},
    f"fwd@{DOMAIN}": {"queue"},
    f"partial@{DOMAIN}": {BOB},
    f"self@{DOMAIN}": {DAVE},
    f"whoever@{CATCH}": {DAVE},
    f"postmaster@{DOMAIN}": {ALICE},
    "postmaster": {ALICE},  # RFC 5321 §4.5.1: the bare <Postmaster>, without a domain
    f"abuse@{DOMAIN}": {ALICE},
    f"Postmaster@{CATCH}": {ALICE},  # the role comes before the catch-all
    f"abuse+report@{CATCH}": {ALICE},
    # A user's own forwarding composes with +tags, aliases and catch-alls; without a kept
    # copy the queue alone holds the mail (frank's mailbox must not have it).
    ERIN: {ERIN, "queue"},
    f"erin+list@{DOMAIN}": {ERIN, "queue"},
    FRANK: {"queue"},
    f"frank+x@{DOMAIN}": {"queue"},
    f"relay@{DOMAIN}": {BOB, "queue"},
    f"onlyfrank@{DOMAIN}": {"queue"},
    f"anyone@{FRANKS}": {"queue"},
}
# recipient → the refusal it must get instead of a 250 that loses the mail.
REFUSED: dict[str, tuple[int, str]] = {
    CAROL: (550, "5.1.1"),
    f"sales@{DOMAIN}": (550, "5.1.1"),  # removed with carol, its only target
    f"front@{DOMAIN}": (550, "5.1.1"),  # pointed only at sales
    f"ghost@{DOMAIN}": (550, "5.1.1"),
    f"nobody@{DOMAIN}": (550, "5.1.1"),
    f"loop1@{DOMAIN}": (550, "5.4.6"),
    f"loop2+tag@{DOMAIN}": (550, "5.4.6"),
    "someone@elsewhere.test": (550, "5.7.1"),
}


def test_every_accepted_recipient_ends_in_a_mailbox_or_the_queue(server: DataDir) -> None:
    accepted: dict[str, str] = {}  # recipient → subject
    for n, rcpt in enumerate([*ROUTES, *REFUSED]):
        subject = f"invariant {n} {rcpt}"
        code, text = send_one(server, rcpt, subject)
        if code == 250:
            accepted[rcpt] = subject
        elif rcpt in REFUSED:
            want_code, want_status = REFUSED[rcpt]
            assert (code, text.decode()[:5]) == (want_code, want_status), (rcpt, code, text)
    assert set(accepted) == set(ROUTES), set(ROUTES) ^ set(accepted)

    in_mailboxes = subjects_in_mailboxes(server)
    queued = queued_subjects(server)
    for rcpt, subject in accepted.items():
        local = in_mailboxes.get(subject, set())
        remote = queued.get(subject, set())
        # The invariant itself: a 250 ends somewhere.
        assert local or remote, rcpt
        # And exactly where the routing says.
        assert local == ROUTES[rcpt] - {"queue"}, (rcpt, local)
        assert remote == ({OUTSIDE} if "queue" in ROUTES[rcpt] else set()), (rcpt, remote)


def test_forwarded_mail_leaves_with_srs_and_arc(server: DataDir) -> None:
    """A user's forward goes through the alias forwarder: SRS sender, ARC set, DKIM."""
    subject = "forwarded by frank"
    assert send_one(server, FRANK, subject)[0] == 250
    app = server.app()
    try:
        store = QueueStore.open(
            app.settings.path(QUEUE_FILE), app.server_key.derive("queue"), create=False
        )
        try:
            for entry in store.list_entries():
                head = mta_admin.show_entry(store, entry.id).headers
                if f"Subject: {subject}" in head:
                    break
            else:
                raise AssertionError("not queued")
        finally:
            store.close()
    finally:
        app.close()
    assert entry.mail_from.startswith("SRS0=") and entry.mail_from.endswith(f"@{DOMAIN}")
    assert [r.address for r in entry.recipients] == [OUTSIDE]
    assert "ARC-Seal:" in head and "DKIM-Signature:" in head


def test_user_forwarding_rules(tmp_path: Path) -> None:
    """Only outside addresses, at most the allowed number, only while the administrator
    allows it; a forward that stops applying leaves the mail in the mailbox."""
    data = make_data_dir(tmp_path / "d", passwords={ALICE: PASSWORDS[ALICE], BOB: PASSWORDS[BOB]})
    set_config(data.path, "accounts", {"max_forwards": 2})
    app = data.app()
    try:
        d = app.directory
        alice = d.user(ALICE)
        assert alice is not None
        for own in (BOB, f"alias@{DOMAIN}", ALICE):
            with pytest.raises(DirectoryError, match="this server's own address"):
                d.set_forwarding(alice.id, [own], keep_copy=False)
        with pytest.raises(DirectoryError, match="at most 2"):
            d.set_forwarding(alice.id, ["a@x.test", "b@x.test", "c@x.test"], keep_copy=True)
        d.set_forwarding(alice.id, ["Me@Later.TEST", OUTSIDE], keep_copy=False)
        got = d.resolve(ALICE)
        assert got is not None and got.users == () and got.external == ("me@later.test", OUTSIDE)
        # A target's domain becomes ours: that forward stops, the other goes on.
        d.add_domain("later.test")
        got = d.resolve(ALICE)
        assert got is not None and got.users == () and got.external == (OUTSIDE,)
        # The administrator turns forwarding off: the mail stays in the mailbox.
        d.forwarding_policy = ForwardingPolicy(allowed=False)
        got = d.resolve(f"alice+x@{DOMAIN}")
        assert got is not None and [u.address for u in got.users] == [ALICE]
        assert got.external == ()
        with pytest.raises(DirectoryError, match="turned off"):
            d.set_forwarding(alice.id, [OUTSIDE], keep_copy=True)
        d.set_forwarding(alice.id, [], keep_copy=True)  # clearing is always allowed
        assert d.forwarding(alice.id) == Forwarding()
        # Removing the user removes their forwarding with them.
        d.forwarding_policy = ForwardingPolicy()
        d.set_forwarding(alice.id, [OUTSIDE], keep_copy=True)
        d.delete_user(alice.id)
        assert d._rows("SELECT count(*) FROM forwards")[0][0] == 0
    finally:
        app.close()


def test_submission_refuses_an_alias_that_leads_nowhere(server: DataDir) -> None:
    host, port = server.addr("submission")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.login(ALICE, server.passwords[ALICE])
        s.mail(ALICE)
        assert s.rcpt(f"sales@{DOMAIN}")[0] == 550
        code, text = s.rcpt(f"loop1@{DOMAIN}")
        assert code == 550 and text.startswith(b"5.4.6")
        assert s.rcpt(f"team@{DOMAIN}")[0] == 250


def test_a_loop_is_logged_without_the_address(running: ServerProcess) -> None:
    send_one(running.data, f"loop2@{DOMAIN}", "loop log")
    output = "\n".join(running.output)
    assert "routing loop" in output
    assert "loop2@" not in output


def test_alias_list_reports_bad_aliases(server: DataDir) -> None:
    r = cli(server.path, "alias", "list")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    text = r.stdout

    def problems_of(alias: str) -> list[str]:
        i = next(i for i, line in enumerate(lines) if line.startswith(alias + "\t"))
        out = []
        for line in lines[i + 1 :]:
            if not line.startswith("  problem: "):
                break
            out.append(line)
        return out

    assert f"nobody@{DOMAIN} does not exist" in "".join(problems_of(f"ghost@{DOMAIN}"))
    assert problems_of(f"partial@{DOMAIN}")  # half its mail would go nowhere
    assert "loop" in "".join(problems_of(f"loop1@{DOMAIN}"))
    assert problems_of(f"team@{DOMAIN}") == []
    assert problems_of(f"diamond@{DOMAIN}") == []
    assert f"sales@{DOMAIN}\t" not in text  # removed with carol
    assert "alias problem(s)" in r.stderr


def test_alias_add_refuses_targets_that_do_not_exist(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", passwords={ALICE: PASSWORDS[ALICE]})
    r = cli(data.path, "alias", "add", f"sales@{DOMAIN}", f"carol@{DOMAIN}")
    assert r.returncode != 0
    assert f"carol@{DOMAIN} does not exist" in r.stderr
    r = cli(data.path, "alias", "add", f"sales@{DOMAIN}", ALICE, OUTSIDE)
    assert r.returncode == 0, r.stderr
    # An alias may name another alias, and +tag addresses of either.
    assert cli(data.path, "alias", "add", f"front@{DOMAIN}", f"sales+web@{DOMAIN}").returncode == 0
    r = cli(data.path, "alias", "list")
    assert "problem" not in r.stdout and r.returncode == 0


def test_removing_a_user_or_an_alias_prunes_what_pointed_at_it(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", passwords={ALICE: PASSWORDS[ALICE], BOB: PASSWORDS[BOB]})
    assert cli(data.path, "alias", "add", f"sales@{DOMAIN}", BOB).returncode == 0
    assert cli(data.path, "alias", "add", f"team@{DOMAIN}", ALICE, BOB).returncode == 0
    assert cli(data.path, "alias", "add", f"front@{DOMAIN}", f"sales@{DOMAIN}").returncode == 0
    r = cli(data.path, "user", "remove", BOB, "--yes")
    assert r.returncode == 0, r.stderr
    assert f"removed {BOB} from alias team@{DOMAIN}" in r.stdout
    assert f"removed alias sales@{DOMAIN}" in r.stdout
    assert f"removed alias front@{DOMAIN}" in r.stdout  # it pointed only at sales
    listing = cli(data.path, "alias", "list").stdout
    assert listing.strip() == f"team@{DOMAIN}\t{ALICE}"

    assert cli(data.path, "alias", "add", f"a@{DOMAIN}", ALICE).returncode == 0
    assert cli(data.path, "alias", "add", f"b@{DOMAIN}", f"a@{DOMAIN}").returncode == 0
    r = cli(data.path, "alias", "remove", f"a@{DOMAIN}")
    assert r.returncode == 0 and f"removed alias b@{DOMAIN}" in r.stdout


def test_directory_resolution_of_dead_ends_and_loops(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", passwords={ALICE: PASSWORDS[ALICE]})
    app = data.app()
    try:
        d = app.directory
        with pytest.raises(DirectoryError, match="does not exist"):
            d.add_alias(f"x@{DOMAIN}", [f"nobody@{DOMAIN}"])
        insert_alias_unchecked(d, f"l1@{DOMAIN}", [f"l2@{DOMAIN}"])
        insert_alias_unchecked(d, f"l2@{DOMAIN}", [f"l1@{DOMAIN}"])
        loop = d.resolve(f"l1@{DOMAIN}")
        assert loop is not None and loop.dead_end and loop.routing_loop
        # A chain longer than MAX_ALIAS_DEPTH counts as a loop, not as an error.
        for i in range(12):
            insert_alias_unchecked(d, f"c{i}@{DOMAIN}", [f"c{i + 1}@{DOMAIN}"])
        insert_alias_unchecked(d, f"c12@{DOMAIN}", [ALICE])
        deep = d.resolve(f"c0@{DOMAIN}")
        assert deep is not None and deep.dead_end and deep.routing_loop
        # Role addresses reach the first user, or the configured postmaster.
        role = d.resolve(f"abuse@{DOMAIN}")
        assert role is not None and [u.address for u in role.users] == [ALICE]
        d.postmaster = f"nobody@{DOMAIN}"
        role = d.resolve(f"postmaster@{DOMAIN}")
        assert role is not None and role.dead_end
        assert role.problems == (f"the postmaster address nobody@{DOMAIN} does not exist",)
    finally:
        app.close()


def test_postmaster_is_configurable(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d", passwords={ALICE: PASSWORDS[ALICE], BOB: PASSWORDS[BOB]})
    text = (data.path / "postvern.toml").read_text()
    assert 'postmaster = ""' in text
    (data.path / "postvern.toml").write_text(
        text.replace('postmaster = ""', f'postmaster = "{BOB}"')
    )
    app = data.app()
    try:
        got = app.directory.resolve(f"postmaster@{DOMAIN}")
        assert got is not None and [u.address for u in got.users] == [BOB]
        # A domain's own postmaster, when it has one, wins.
        app.directory.add_alias(f"postmaster@{DOMAIN}", [ALICE])
        got = app.directory.resolve(f"postmaster@{DOMAIN}")
        assert got is not None and [u.address for u in got.users] == [ALICE]
    finally:
        app.close()


def test_every_report_address_that_dns_publishes_is_accepted(server: DataDir) -> None:
    """DMARC aggregate and TLS-RPT reports go to the addresses `postvern dns` publishes."""
    records = cli(server.path, "dns", DOMAIN)
    assert records.returncode == 0, records.stderr
    addresses = set(re.findall(r"mailto:([^;\s\"]+)", records.stdout))
    assert addresses, records.stdout
    for address in sorted(addresses):
        code, text = send_one(server, address, f"report to {address}")
        assert code == 250, (address, code, text)


def test_init_names_the_postmaster(tmp_path: Path) -> None:
    data = tmp_path / "d"
    base = ["init", "--hostname", "mx.example.test", "--domain", DOMAIN, "--clamd", "none"]
    refused = cli(data, *base, "--postmaster", "admin@elsewhere.test")
    assert refused.returncode != 0 and "--postmaster must be an address at" in refused.stderr
    made = cli(data, *base, "--postmaster", "Admin@Example.TEST")
    assert made.returncode == 0, made.stderr
    assert f"go to admin@{DOMAIN}" in made.stdout
    assert f"user add admin@{DOMAIN}" in made.stdout  # the next step names that user
    assert f'postmaster = "admin@{DOMAIN}"' in (data / "postvern.toml").read_text()
