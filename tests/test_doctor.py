"""``postvern doctor`` against the running server and the loopback DNS: all green on a correct
setup, and one test per failing condition, each naming exactly what is wrong.

One server runs for the module. A failing condition is made the way it happens to an
operator: a record missing or stale in DNS, a file with the wrong mode or owner, a certificate
swapped for one that expires or names another host, a setting (given to ``doctor`` through
its ``POSTVERN_*`` environment, as a changed config file would) naming a listener, clamd or
Redis that does not answer. Kernel settings are read from a tree the test lays out (``--root``),
never changed on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import io
import json
import os
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dnsserver import DNSTestServer
from harness import DataDir, ServerProcess, client_tls_context, free_port, make_data_dir, set_config
from pg_server import PgDatabase, PostgresTestServer, make_pg_data_dir
from postvern import cli
from postvern.directory.pg import LATEST, connection_params

HOSTNAME = "mx.example.test"
GOOD_HOST = {
    "proc/sys/kernel/core_pattern": "|/bin/false",
    "proc/sys/fs/suid_dumpable": "0",
    "proc/swaps": "Filename\tType\tSize\tUsed\tPriority",
    "sys/kernel/mm/transparent_hugepage/enabled": "always madvise [never]",
}


class Setup:
    def __init__(self, data: DataDir, dns: DNSTestServer, root: Path) -> None:
        self.data = data
        self.dns = dns
        self.root = root
        self.zone = self.records()

    def doctor(
        self, env: dict[str, str] | None = None, root: Path | None = None
    ) -> tuple[int, dict[str, tuple[str, str]], str]:
        """Run the command (in this process, through its entry point; settings changed through
        the environment as a changed config file would); the clock is left out (this machine's
        may not be synchronised: test_clock checks that check on its own)."""
        argv = ["--data", str(self.data.path), "doctor", "--json", "--root", str(root or self.root)]
        code, out, err = run_cli([*argv, "--skip", "clock"], env or {})
        results = {r["check"]: (r["status"], r["detail"]) for r in json.loads(out)}
        return code, results, err

    def records(self) -> str:
        code, out, err = run_cli(["--data", str(self.data.path), "dns", "example.test"], {})
        assert code == 0, err
        return out

    def publish(self) -> None:
        """Publish exactly what `postvern dns` prints, and the host's address."""
        self.dns.clear()
        self.dns.load_zone_text(self.zone)
        self.dns.add(HOSTNAME, "A", "127.0.0.1")


def run_cli(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """``postvern ARGV`` with ``env`` added to the environment; (exit status, stdout, stderr)."""
    saved = dict(os.environ)
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    umask = os.umask(0o077)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        os.umask(umask)
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def lay_out(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("doctor")
    with DNSTestServer() as dns:
        data = make_data_dir(
            base / "data",
            passwords={"alice@example.test": "alice-correct-horse"},
            listeners=("smtp", "submission", "submissions", "imap", "imaps", "pop3s", "https"),
            hostname=HOSTNAME,
        )
        set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
        set_config(data.path, "mta", {"allow_loopback_mx": True})
        # Files made by this test process carry its umask; `postvern init` run as a command
        # makes them private (umask 077), as here.
        for top, _, files in os.walk(data.path):
            os.chmod(top, 0o700)
            for f in files:
                os.chmod(os.path.join(top, f), 0o600)
        setup = Setup(data, dns, lay_out(base / "root", GOOD_HOST))
        setup.publish()
        with ServerProcess(data):
            yield setup


@pytest.fixture
def fresh(setup: Setup) -> Iterator[Setup]:
    """Each test starts from the correct setup and leaves it so."""
    setup.publish()
    yield setup
    setup.publish()


def failing(results: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {check: detail for check, (status, detail) in results.items() if status == "FAIL"}


def test_a_correct_setup_passes(fresh: Setup) -> None:
    code, results, err = fresh.doctor()
    assert failing(results) == {}, results
    assert code == 0, err
    for name in ("smtp", "submission", "submissions", "imap", "imaps", "pop3s", "https"):
        assert results[f"listener {name}"][0] == "ok"
    assert results["dns example.test MX"] == ("ok", f"points at {HOSTNAME}")
    assert results["dns example.test MTA-STS"][0] == "ok"
    assert results["swap"] == ("ok", "off")
    assert results["tls chain"][0] == "warn"  # self-signed, as `postvern init` makes it


def test_text_output_is_a_line_per_check(fresh: Setup) -> None:
    argv = ["--data", str(fresh.data.path), "doctor", "--root", str(fresh.root)]
    code, out, _ = run_cli([*argv, "--skip", "clock", "--skip", "dns"], {})
    assert code == 0, out
    lines = out.splitlines()
    assert any(line.startswith("ok    listener imaps") for line in lines)
    assert any(line.startswith("skip  dns") for line in lines)


# -- DNS: one missing or wrong record at a time ---------------------------------------------


def test_missing_mx(fresh: Setup) -> None:
    fresh.dns.remove("example.test", "MX")
    code, results, _ = fresh.doctor()
    assert code == 1
    assert failing(results) == {"dns example.test MX": f"published: none; expected 10 {HOSTNAME}."}


def test_mx_pointing_elsewhere(fresh: Setup) -> None:
    fresh.dns.set("example.test", "MX", (10, "mail.elsewhere.test"))
    code, results, _ = fresh.doctor()
    assert code == 1
    assert "10 mail.elsewhere.test" in failing(results)["dns example.test MX"]


def test_two_spf_records(fresh: Setup) -> None:
    fresh.dns.add("example.test", "TXT", "v=spf1 a -all")
    _, results, _ = fresh.doctor()
    assert failing(results) == {"dns example.test SPF": "2 SPF records; keep one"}


def test_missing_dkim_selector(fresh: Setup) -> None:
    selector = next(line.split(".")[0] for line in fresh.zone.splitlines() if "_domainkey" in line)
    fresh.dns.remove(f"{selector}._domainkey.example.test")
    code, results, _ = fresh.doctor()
    assert code == 1
    assert list(failing(results)) == [f"dns example.test DKIM {selector}"]


def test_dkim_record_with_another_key(fresh: Setup) -> None:
    selector = next(line.split(".")[0] for line in fresh.zone.splitlines() if "k=ed25519" in line)
    name = f"{selector}._domainkey.example.test"
    fresh.dns.set(name, "TXT", "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
    _, results, _ = fresh.doctor()
    assert failing(results) == {
        f"dns example.test DKIM {selector}": f"{name} publishes another key"
    }


def test_missing_dmarc(fresh: Setup) -> None:
    fresh.dns.remove("_dmarc.example.test")
    _, results, _ = fresh.doctor()
    assert failing(results) == {"dns example.test DMARC": "no record at _dmarc.example.test"}


def test_stale_mta_sts_id(fresh: Setup) -> None:
    fresh.dns.set("_mta-sts.example.test", "TXT", "v=STSv1; id=20200101")
    _, results, _ = fresh.doctor()
    detail = failing(results)["dns example.test MTA-STS"]
    assert detail.startswith("id=20200101 but the policy served has id=")


def test_mta_sts_host_missing(fresh: Setup) -> None:
    fresh.dns.remove("mta-sts.example.test")
    _, results, _ = fresh.doctor()
    assert list(failing(results)) == ["dns example.test MTA-STS host"]


def test_missing_tls_rpt(fresh: Setup) -> None:
    fresh.dns.remove("_smtp._tls.example.test")
    _, results, _ = fresh.doctor()
    assert list(failing(results)) == ["dns example.test TLS-RPT"]


def test_dns_not_answering(fresh: Setup) -> None:
    fresh.dns.fail("_dmarc.example.test", mode="servfail")
    _, results, _ = fresh.doctor()
    assert failing(results)["dns example.test dmarc"].startswith("lookup failed")


# -- TLS -----------------------------------------------------------------------------------


def _certificate(path: Path, name: str, days: int) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o600)
    return path


def test_certificate_expiring_within_alert_days(fresh: Setup, tmp_path: Path) -> None:
    cert = _certificate(tmp_path / "soon.pem", HOSTNAME, days=5)
    _, results, _ = fresh.doctor({"POSTVERN_TLS__CERT": str(cert)})
    assert list(failing(results)) == ["tls expiry"]
    assert failing(results)["tls expiry"].endswith(": renew")


def test_certificate_for_another_name(fresh: Setup, tmp_path: Path) -> None:
    cert = _certificate(tmp_path / "other.pem", "mail.other.test", days=300)
    _, results, _ = fresh.doctor({"POSTVERN_TLS__CERT": str(cert)})
    assert failing(results) == {"tls names": f"mail.other.test: {HOSTNAME} not among them"}


def test_certificate_chain_that_does_not_verify(fresh: Setup, tmp_path: Path) -> None:
    # A leaf issued by a CA that the configured bundle does not hold.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Unknown CA")])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    bundle = _certificate(tmp_path / "bundle.pem", "Some Other CA", days=300)
    env = {"POSTVERN_TLS__CERT": str(tmp_path / "leaf.pem"), "POSTVERN_TLS__CA_BUNDLE": str(bundle)}
    _, results, _ = fresh.doctor(env)
    assert list(failing(results)) == ["tls chain"]


# -- listeners -----------------------------------------------------------------------------


def test_listener_not_answering(fresh: Setup) -> None:
    address = f"127.0.0.1:{free_port()}"
    _, results, _ = fresh.doctor({"POSTVERN_LISTEN__POP3": address})
    assert list(failing(results)) == ["listener pop3"]
    assert failing(results)["listener pop3"].startswith(address)


def test_listener_speaking_another_protocol(fresh: Setup) -> None:
    # The configured IMAP address is in fact the SMTP listener (a port mix-up).
    _, results, _ = fresh.doctor({"POSTVERN_LISTEN__IMAP": fresh.data.listen["smtp"]})
    assert "unexpected answer '220" in failing(results)["listener imap"]


# -- data directory, disk ------------------------------------------------------------------


def test_file_open_to_others(fresh: Setup) -> None:
    path = fresh.data.path / "postvern.toml"
    path.chmod(0o644)
    try:
        _, results, _ = fresh.doctor()
    finally:
        path.chmod(0o600)
    assert failing(results) == {"data modes": f"open to group or others: {path} (0644)"}


def test_file_owned_by_someone_else(fresh: Setup) -> None:
    path = fresh.data.path / "postvern.toml"
    os.chown(path, 65534, -1)
    try:
        _, results, _ = fresh.doctor()
    finally:
        os.chown(path, os.getuid(), -1)
    assert failing(results) == {"data ownership": f"not owned by uid {os.getuid()}: {path}"}


def test_free_disk_below_threshold(fresh: Setup) -> None:
    # The threshold is raised past anything a disk can have free.
    _, results, _ = fresh.doctor({"POSTVERN_OPS__DISK_FREE_MIN_PERCENT": "100.5"})
    assert list(failing(results)) == ["disk"]
    assert failing(results)["disk"].endswith("under 100.5%")


# -- the host ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "text", "check", "detail"),
    [
        (
            "proc/sys/kernel/core_pattern",
            "core",
            "core dumps",
            "kernel.core_pattern = 'core' writes core files",
        ),
        ("proc/sys/fs/suid_dumpable", "2", "core dumps", "fs.suid_dumpable = 2"),
        (
            "proc/swaps",
            "Filename Type Size Used Priority\n/dev/vda2 partition 1048572 0 -2",
            "swap",
            "unencrypted swap in use: /dev/vda2",
        ),
        (
            "sys/kernel/mm/transparent_hugepage/enabled",
            "[always] madvise never",
            "transparent huge pages",
            "[always] madvise never (want [never])",
        ),
    ],
)
def test_host_setting(
    fresh: Setup, tmp_path: Path, relative: str, text: str, check: str, detail: str
) -> None:
    root = lay_out(tmp_path / "root", {**GOOD_HOST, relative: text})
    code, results, _ = fresh.doctor(root=root)
    assert code == 1
    assert failing(results) == {check: detail}


def test_encrypted_swap_is_fine(fresh: Setup, tmp_path: Path) -> None:
    root = lay_out(
        tmp_path / "root",
        {
            **GOOD_HOST,
            "proc/swaps": "Filename Type Size Used Priority\n/dev/dm-1 partition 1048572 0 -2",
            "sys/block/dm-1/dm/uuid": "CRYPT-PLAIN-swap",
        },
    )
    _, results, _ = fresh.doctor(root=root)
    assert results["swap"] == ("ok", "encrypted only: /dev/dm-1")


def test_clock(fresh: Setup) -> None:
    """The verdict is the kernel's (adjtimex(2) returns TIME_ERROR, 5, when unsynchronised)."""
    state = ctypes.CDLL(None).adjtimex(ctypes.create_string_buffer(512))
    argv = ["--data", str(fresh.data.path), "doctor", "--json", "--root", str(fresh.root)]
    for other in ("dns", "listeners", "tls", "data", "queue"):
        argv += ["--skip", other]
    code, out, _ = run_cli(argv, {})
    results = {r["check"]: r["status"] for r in json.loads(out)}
    assert results["clock"] == ("FAIL" if state == 5 else "ok")
    assert code == (1 if state == 5 else 0)


# -- services ------------------------------------------------------------------------------


def test_clamd_not_answering(fresh: Setup, tmp_path: Path) -> None:
    socket_path = tmp_path / "clamd.ctl"
    _, results, _ = fresh.doctor({"POSTVERN_FILTERS__CLAMD": f"unix:{socket_path}"})
    assert list(failing(results)) == ["clamd"]


def test_redis_not_answering(fresh: Setup) -> None:
    url = f"redis://:not-shown@127.0.0.1:{free_port()}/0"
    _, results, _ = fresh.doctor({"POSTVERN_ABUSE__REDIS_URL": url})
    assert list(failing(results)) == ["redis"]
    assert "not-shown" not in failing(results)["redis"]


def test_queue_entry_older_than_allowed(fresh: Setup) -> None:
    # A message to a domain whose DNS fails stays queued for retry.
    fresh.dns.fail("nowhere.test", mode="servfail")
    host, port = fresh.data.addr("submission")
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.starttls(context=client_tls_context())
        client.login("alice@example.test", "alice-correct-horse")
        client.sendmail(
            "alice@example.test",
            ["someone@nowhere.test"],
            b"From: alice@example.test\r\nTo: someone@nowhere.test\r\nSubject: x\r\n\r\nhi\r\n",
        )
    code, results, _ = fresh.doctor({"POSTVERN_OPS__QUEUE_MAX_AGE_HOURS": "0"})
    assert code == 1
    assert list(failing(results)) == ["queue"]
    assert failing(results)["queue"].startswith("1 entries, the oldest queued")


def test_backups_never_made_failed_or_stale(fresh: Setup, tmp_path: Path) -> None:
    """With backup targets configured, doctor reads what the server recorded of its last
    snapshot and its last test restore (postvern.backup's status)."""
    from postvern.backup import catalog

    env = {"POSTVERN_BACKUP__TARGETS": f"file://{tmp_path / 'bucket'}"}
    code, results, _ = fresh.doctor(env)
    assert code == 1 and failing(results)["backup"].startswith("never done yet")
    assert results["backup restore test"][0] == "warn"  # a first week without one is normal
    now = time.time()
    catalog.record(fresh.data.path, backup_at=now - 600, backup_ok=True, backup="snap-1")
    catalog.record(fresh.data.path, verify_at=now - 600, verify_ok=True, verify="snap-1")
    code, results, _ = fresh.doctor(env)
    assert code == 0 and results["backup"][0] == "ok" and "snap-1" in results["backup"][1]
    catalog.record(fresh.data.path, verify_ok=False, verify="object 3f2a… hash mismatch")
    _, results, _ = fresh.doctor(env)
    assert failing(results)["backup restore test"] == (
        "the last attempt failed: object 3f2a… hash mismatch"
    )
    catalog.record(fresh.data.path, backup_at=now - 72 * 3600, verify_ok=True)
    _, results, _ = fresh.doctor(env)
    assert "h old (over 48 h)" in failing(results)["backup"]
    (catalog._status_path(fresh.data.path)).unlink()
    _, results, _ = fresh.doctor()
    assert results["backup"] == ("skip", "no [backup] targets configured")


# -- the directory in PostgreSQL (ops/doctor_directory.py) -----------------------------------

# Every check but the directory's: a data directory of its own, with no server running.
NOT_DIRECTORY = ("dns", "tls", "listeners", "data", "disk", "core", "swap", "thp", "clamd",
                 "redis", "queue", "backup")  # fmt: skip


@pytest.fixture(scope="module")
def pg_setup(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresTestServer) -> PgSetup:
    database = pg_server.new_database()
    return PgSetup(make_pg_data_dir(tmp_path_factory.mktemp("doctor-pg") / "data", database),
                   database)  # fmt: skip


class PgSetup:
    def __init__(self, data: DataDir, database: PgDatabase) -> None:
        self.data = data
        self.database = database

    def doctor(self, env: dict[str, str] | None = None) -> tuple[int, dict[str, tuple[str, str]]]:
        skips = [arg for check in NOT_DIRECTORY for arg in ("--skip", check)]
        argv = ["--data", str(self.data.path), "doctor", "--json", "--skip", "clock", *skips]
        code, out, err = run_cli(argv, env or {})
        assert out, err
        return code, {r["check"]: (r["status"], r["detail"]) for r in json.loads(out)}

    def sql(self, statement: str) -> None:
        params = connection_params(self.database.target())
        with psycopg.connect(autocommit=True, **params) as conn:
            conn.execute(statement)


def test_directory_in_postgres_passes(pg_setup: PgSetup) -> None:
    code, results = pg_setup.doctor()
    assert code == 0, results
    assert results["directory"][1].startswith("PostgreSQL, 127.0.0.1:")
    assert results["directory reachable"][0] == "ok"
    status, detail = results["directory tls"]
    assert status == "ok" and "TLSv1" in detail and "verify-full" in detail
    assert results["directory schema"] == ("ok", f"version {LATEST}, current")
    assert "directory nodes" not in results  # no [cluster]


def test_directory_not_reachable(pg_setup: PgSetup) -> None:
    url = pg_setup.database.url.replace(f":{pg_setup.database.port}/", f":{free_port()}/")
    code, results = pg_setup.doctor({"POSTVERN_DIRECTORY__URL": url})
    assert code == 1
    status, detail = results["directory reachable"]
    assert status == "FAIL" and "refused" in detail


def test_directory_certificate_not_verified(pg_setup: PgSetup) -> None:
    code, results = pg_setup.doctor({"POSTVERN_DIRECTORY__CA": str(pg_setup.database.wrong_ca)})
    assert code == 1
    status, detail = results["directory tls"]
    assert status == "FAIL" and "does not verify against [directory] ca" in detail


def test_directory_url_asking_for_less_than_verify_full(pg_setup: PgSetup) -> None:
    url = f"{pg_setup.database.url}?sslmode=require"
    code, results = pg_setup.doctor({"POSTVERN_DIRECTORY__URL": url})
    assert code == 1
    assert results["directory tls"] == (
        "FAIL",
        "the directory URL asks for sslmode=require: only verify-full is accepted over a"
        " network (a Unix socket needs none)",
    )


@pytest.mark.parametrize(("version", "says"), [(LATEST - 1, "not migrated yet"),
                                               (LATEST + 1, "newer Postvern")])  # fmt: skip
def test_directory_schema_not_current(pg_setup: PgSetup, version: int, says: str) -> None:
    pg_setup.sql(f"UPDATE postvern_schema SET version={version}")
    try:
        code, results = pg_setup.doctor()
    finally:
        pg_setup.sql(f"UPDATE postvern_schema SET version={LATEST}")
    assert code == 1
    status, detail = results["directory schema"]
    assert status == "FAIL" and says in detail and f"version {version}" in detail


def test_directory_users_without_or_on_an_unknown_mailbox_node(pg_setup: PgSetup) -> None:
    cluster = pg_setup.data.path / "cluster"
    cluster.mkdir(exist_ok=True)
    (cluster / "nodes.toml").write_text(
        '[nodes.mbox-1]\nrole = "mailbox"\naddress = "127.0.0.1:7001"\n\n'
        '[nodes.front-1]\nrole = "front"\naddress = "127.0.0.1:7002"\n'
    )
    env = {"POSTVERN_CLUSTER__ROLE": "mailbox", "POSTVERN_CLUSTER__NODE": "mbox-1"}
    try:
        code, results = pg_setup.doctor(env)
        assert code == 0
        status, detail = results["directory nodes"]
        assert status == "warn" and "2 of 2 user(s) have no mailbox node yet" in detail
        pg_setup.sql("UPDATE users SET node='mbox-1'")
        code, results = pg_setup.doctor(env)
        assert code == 0 and results["directory nodes"] == ("ok", "2 user(s) placed: mbox-1 2")
        # A node taken out of nodes.toml (or a typo in a move) leaves users nowhere.
        pg_setup.sql("UPDATE users SET node='front-1' WHERE localpart='alice'")
        code, results = pg_setup.doctor(env)
        assert code == 1
        assert results["directory nodes"] == (
            "FAIL",
            "1 user(s) on node(s) that are not mailbox nodes of nodes.toml: front-1 (1)",
        )
    finally:
        pg_setup.sql("UPDATE users SET node=NULL")
