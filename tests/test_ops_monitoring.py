"""Monitoring (issue #19): Prometheus metrics through prometheus-client, the shipped alert
rules checked by promtool, and the watchdog mailing the postmaster and calling the webhook.

One server runs with a watchdog that looks every second, a certificate five days from its
end, a disk threshold no disk can meet and a ban-spike threshold of one; an operator's ban
then makes the third alert. Each kind must reach the postmaster's INBOX and the webhook
exactly once.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    DataDir,
    ServerProcess,
    client_tls_context,
    free_port,
    mailbox_messages,
    make_data_dir,
    set_config,
)

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
EXPECTED_ALERTS = {"disk", "certificate", "ban_spike"}


def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(RULES / "postvern-rules.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_rules_fire_when_they_should() -> None:
    out = subprocess.run(
        ["promtool", "test", "rules", "postvern-rules.test.yml"],
        capture_output=True, text=True, timeout=60, cwd=RULES,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


class Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        Hook.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def short_certificate(data: DataDir, days: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.example.test")]), False)
        .sign(key, hashes.SHA256())
    )
    (data.path / "tls" / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (data.path / "tls" / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    hook = http.server.HTTPServer(("127.0.0.1", free_port()), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    data = make_data_dir(
        tmp_path_factory.mktemp("watch") / "data",
        passwords={"alice@example.test": "alice-correct-horse"},
        listeners=("https", "smtp"),
    )
    short_certificate(data, days=5)
    set_config(
        data.path,
        "ops",
        {
            "watchdog_interval": 1.0,
            "disk_free_min_percent": 100.5,
            "ban_spike": 1,
            "webhook": f"http://127.0.0.1:{hook.server_port}/alert",
        },
    )
    server = ServerProcess(data).start()
    try:
        ban = [sys.executable, "-m", "postvern.cli", "--data", str(data.path), "ban", "add"]
        subprocess.run([*ban, "192.0.2.0/24", "--duration", "1h"], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while {h["kind"] for h in Hook.received} < EXPECTED_ALERTS:
            assert time.monotonic() < deadline, Hook.received
            time.sleep(0.2)
        data.metrics = scrape(data)  # type: ignore[attr-defined]
    finally:
        server.stop()
        hook.shutdown()
    yield data


def scrape(data: DataDir) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    host, port = data.addr("https")
    conn = http.client.HTTPSConnection(host, port, context=client_tls_context(), timeout=10)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.read().decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_each_alert_reached_the_webhook_once(watched: DataDir) -> None:
    kinds = [h["kind"] for h in Hook.received]
    for kind in EXPECTED_ALERTS:
        assert kinds.count(kind) == 1, kinds
    assert all(h["host"] == "mx.example.test" for h in Hook.received)


def test_the_postmaster_got_each_alert_by_mail(watched: DataDir) -> None:
    subjects = [
        m.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        for m in mailbox_messages(watched, "alice@example.test")
    ]
    for kind in EXPECTED_ALERTS:
        assert sum(f"] {kind}: " in s for s in subjects) == 1, subjects
    mail = b"\n".join(mailbox_messages(watched, "alice@example.test"))
    assert b"192.0.2" not in mail  # counts, not clients


def test_metrics_are_prometheus_text(watched: DataDir) -> None:
    m = watched.metrics  # type: ignore[attr-defined]
    for kind in EXPECTED_ALERTS:
        assert m[("postvern_watchdog_alerts_total", (("kind", kind),))] == 1
    assert m[("postvern_bans_active", ())] == 1
    assert ("postvern_sessions_open", (("listener", "smtp"),)) in m
    assert m[("postvern_certificate_expiry_timestamp_seconds", ())] > 0
    assert ("postvern_queue_entries", ()) in m
    assert ("postvern_kdf_runs_total", ()) in m
