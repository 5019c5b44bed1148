"""Helpers for the e2e tests: a user's mail client played by the reference tools.

* :class:`Gpg` — gpg in a private 0700 GNUPGHOME: makes keys, exports, decrypts, verifies.
* :func:`smime_identity` — an S/MIME certificate and private key made with ``cryptography``
  (the user's side; the server only ever gets the certificate).
* :func:`mime_tree` — a message's MIME structure and decoded leaf contents, to compare a
  decrypted message with the one that was sent.
* :func:`postvern` — the CLI as an administrator runs it.
"""

from __future__ import annotations

import datetime
import email
import email.message
import email.policy
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Fields the server itself writes on delivery (trace, verdicts) and RFC 9788's HP-Outer:
# not part of what the sender sent.
SERVER_FIELDS = frozenset(
    {"return-path", "delivered-to", "received", "authentication-results", "x-postvern-spam"}
)


class Gpg:
    def __init__(self, home: Path) -> None:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.home = home
        self.env = {**os.environ, "GNUPGHOME": str(home)}

    def run(self, *args: str, input: bytes | None = None, check: bool = True) -> bytes:
        result = subprocess.run(
            ["gpg", "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", "", *args],
            input=input,
            capture_output=True,
            env=self.env,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gpg {args}: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def new_key(self, uid: str, primary: str, encrypt: str | None, expire: str = "1y") -> str:
        """A key with a ``primary`` (sign, cert) and, unless None, an ``encrypt`` subkey."""
        self.run("--quick-gen-key", uid, primary, "sign,cert", expire)
        fpr = self.fingerprint(uid)
        if encrypt is not None:
            self.run("--quick-add-key", fpr, encrypt, "encr", expire)
        return fpr

    def fingerprint(self, uid: str) -> str:
        out = self.run("--with-colons", "--list-keys", uid).decode()
        return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr"))

    def export(self, uid: str) -> bytes:
        return self.run("--export", uid)

    def stop(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, capture_output=True)


def smime_identity(
    directory: Path,
    name: str,
    *,
    kind: str = "rsa",
    key_usage: str = "keyEncipherment",
) -> tuple[Path, Path]:
    """(certificate PEM, private key PEM) for ``name``; ``kind`` rsa | rsa1024 | ec | ec-k256."""
    if kind.startswith("ec"):
        curve = ec.SECP256K1() if kind == "ec-k256" else ec.SECP256R1()
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = ec.generate_private_key(curve)
    else:
        key = rsa.generate_private_key(65537, 1024 if kind == "rsa1024" else 2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    usage = {u: u == key_usage for u in ("keyEncipherment", "keyAgreement")}
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(name)]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=usage["keyEncipherment"],
                data_encipherment=False,
                key_agreement=usage["keyAgreement"],
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    stem = directory / f"{name.partition('@')[0]}-{kind}-{key_usage}"
    cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def parse(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def mime_tree(raw: bytes) -> list[tuple[str, bytes | None]]:
    """Every part, depth first: its content type and, for leaves, the decoded content."""
    out: list[tuple[str, bytes | None]] = []
    for part in parse(raw).walk():
        payload = None if part.is_multipart() else part.get_payload(decode=True)
        out.append((part.get_content_type(), payload))
    return out


def sent_fields(raw: bytes) -> list[tuple[str, str]]:
    """The header fields as the sender wrote them: without the server's trace fields and
    HP-Outer, and Content-Type without RFC 9788's ``hp`` parameter."""
    msg = parse(raw)
    fields = []
    for name, value in msg.items():
        lname = name.lower()
        if lname in SERVER_FIELDS or lname == "hp-outer":
            continue
        if lname == "content-type":
            value = value.replace('; hp="cipher"', "")
        fields.append((lname, " ".join(value.split())))
    return fields


def postvern(
    data: Path, *args: str, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
    return subprocess.run(
        [sys.executable, "-m", "postvern.cli", "--data", str(data), *args],
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
