"""The certificate ``init`` makes, and saying in time that a certificate runs out.

The made certificate stays inside the CA/Browser Forum's validity cap that TLS scanners
check. A certificate with less than ``EXPIRY_WARNING_DAYS`` left (made here, short-lived,
with ``cryptography``) makes ``postvern tls status`` fail and the server warn at start.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cli_kit import postvern
from harness import DataDir, ServerProcess, make_data_dir
from postvern.crypto import tls

HOSTNAME = "mx.example.test"


def write_certificate(data: Path, *, days_before: float, days_after: float) -> None:
    """Replace the data directory's certificate and key with one valid from ``days_before``
    days ago until ``days_after`` days from now (negative: already expired)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName(HOSTNAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=days_before))
        .not_valid_after(now + datetime.timedelta(days=days_after))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    (data / "tls" / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (data / "tls" / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def status(data: Path) -> subprocess.CompletedProcess[str]:
    return postvern("--data", str(data), "tls", "status")


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    return make_data_dir(tmp_path / "data", passwords={}, listeners=("smtp", "imaps"))


def test_the_made_certificate_is_within_the_validity_cap(data: DataDir) -> None:
    cert = x509.load_pem_x509_certificate((data.path / "tls" / "cert.pem").read_bytes())
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert validity <= datetime.timedelta(days=tls.SELF_SIGNED_DAYS)
    assert tls.SELF_SIGNED_DAYS <= 397  # the CA/Browser Forum's 398, and scanners' checks


def test_tls_status_of_a_fresh_certificate(data: DataDir) -> None:
    r = status(data.path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    fields = dict(line.split(None, 1) for line in r.stdout.splitlines())
    assert fields["names"] == f"{HOSTNAME}, 127.0.0.1, ::1"
    assert fields["certificate"] == str(data.path / "tls" / "cert.pem")
    assert "days left" in fields["expires"]


def test_tls_status_fails_near_expiry_and_after(data: DataDir) -> None:
    write_certificate(data.path, days_before=80, days_after=tls.EXPIRY_WARNING_DAYS - 10)
    r = status(data.path)
    assert r.returncode != 0
    assert "names        mx.example.test, 127.0.0.1" in r.stdout
    assert "days left" in r.stdout
    assert len(r.stderr.splitlines()) == 1 and "expires in" in r.stderr and "renew" in r.stderr

    write_certificate(data.path, days_before=90, days_after=-3)
    r = status(data.path)
    assert r.returncode != 0
    assert "(expired)" in r.stdout
    assert len(r.stderr.splitlines()) == 1 and "expired on" in r.stderr


def test_tls_status_with_a_long_way_to_go_passes(data: DataDir) -> None:
    write_certificate(data.path, days_before=1, days_after=tls.EXPIRY_WARNING_DAYS + 5)
    assert status(data.path).returncode == 0


def test_server_warns_at_start_about_a_certificate_near_expiry(data: DataDir) -> None:
    write_certificate(data.path, days_before=80, days_after=5)
    with ServerProcess(data) as server:
        warnings = [line for line in server.output if " WARNING " in line]
    assert any("TLS certificate" in line and "expires in" in line for line in warnings), warnings


def test_server_is_quiet_about_a_fresh_certificate(data: DataDir) -> None:
    with ServerProcess(data) as server:
        output = list(server.output)
    assert not any("TLS certificate" in line for line in output), output


def test_expiry_problem_reads_the_days() -> None:
    not_after = datetime.datetime(2030, 1, 31, tzinfo=datetime.UTC)
    info = tls.CertificateInfo(Path("cert.pem"), ("a.example",), not_after)
    day = datetime.timedelta(days=1)
    assert info.days_left(not_after - 40 * day) == 40
    assert info.expiry_problem(not_after - 40 * day) is None
    assert info.expiry_problem(not_after - 30 * day) is None
    soon = info.expiry_problem(not_after - 29.5 * day)
    assert soon is not None and "expires in 29 days" in soon
    gone = info.expiry_problem(not_after + day)
    assert gone is not None and "expired on 2030-01-31" in gone
    assert info.days_left(not_after + 1.5 * day) == -2
