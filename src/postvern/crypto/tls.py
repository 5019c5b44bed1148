"""TLS policy for every listener and every outbound hop: TLS 1.2 or newer, AEAD ciphers only.

The cipher list follows Mozilla's "intermediate" profile restricted to forward-secret AEAD
suites; TLS 1.3 suites are fixed by OpenSSL and all qualify. `postvern init` creates a
self-signed certificate so the server runs out of the box; the config can point to a real one.
Whichever it is, :func:`read_certificate` tells its names and how long it has left, so the
server and ``postvern tls status`` can say so before clients start refusing it.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
# The CA/Browser Forum's Baseline Requirements (§6.3.2) cap a publicly trusted TLS server
# certificate at 398 days, browsers enforce it, and TLS scanners flag anything longer (the
# older 825-day cap included). The self-signed certificate keeps inside it, backdating
# included.
SELF_SIGNED_DAYS = 397
# Backdated by this much, so that a client whose clock runs a little slow accepts it at once.
CLOCK_SKEW = datetime.timedelta(minutes=5)
# Under this many days left, the server warns at start and daily, and `postvern tls status`
# fails: a month is time to renew by hand (ACME clients such as certbot renew at 30 days too).
EXPIRY_WARNING_DAYS = 30
SECONDS_PER_DAY = 86400


class TLSConfigError(Exception):
    """The certificate or key cannot be loaded."""


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    # No TLS compression (CRIME), no renegotiation by clients, fresh ECDHE per handshake.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_SINGLE_ECDH_USE | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise TLSConfigError(f"cannot load certificate {cert}: {e.__class__.__name__}") from None
    return ctx


def client_context(ca_bundle: Path | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """For outbound SMTP and MTA-STS fetches. ``verify=False`` is opportunistic TLS only."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        if ca_bundle is not None:
            ctx.load_verify_locations(cafile=str(ca_bundle))
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def describe(obj: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` for Received headers; None without TLS."""
    if obj is None:
        return None
    cipher = obj.cipher()
    return f"{obj.version()} {cipher[0]}" if cipher else obj.version()


def make_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    """An ECDSA P-256 certificate for ``hostname`` (and 127.0.0.1, ::1), valid 397 days."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    start = datetime.datetime.now(datetime.UTC) - CLOCK_SKEW
    sans: list[x509.GeneralName] = [x509.DNSName(hostname)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# -- how long the certificate has left -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """The leaf certificate of a PEM file: the names it is valid for, and until when."""

    path: Path
    names: tuple[str, ...]  # subjectAltName DNS names and IP addresses; else the common name
    not_after: datetime.datetime

    def days_left(self, now: datetime.datetime | None = None) -> int:
        """Whole days until it expires (negative once it has)."""
        moment = datetime.datetime.now(datetime.UTC) if now is None else now
        return math.floor((self.not_after - moment).total_seconds() / SECONDS_PER_DAY)

    @property
    def expires(self) -> str:
        return self.not_after.strftime("%Y-%m-%d %H:%M UTC")

    def expiry_problem(self, now: datetime.datetime | None = None) -> str | None:
        """One line when fewer than EXPIRY_WARNING_DAYS remain or it has expired; else None."""
        moment = datetime.datetime.now(datetime.UTC) if now is None else now
        days = self.days_left(moment)
        if days >= EXPIRY_WARNING_DAYS:
            return None
        if self.not_after <= moment:
            return f"the TLS certificate {self.path} expired on {self.expires}: clients refuse it"
        return f"the TLS certificate {self.path} expires in {days} days ({self.expires}): renew it"


def read_certificate(path: Path) -> CertificateInfo:
    """Read the first certificate of *path* (the server's own, before any chain)."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as e:
        raise TLSConfigError(f"cannot read certificate {path}: {e.__class__.__name__}") from None
    cert = certs[0]
    names: list[str] = []
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        names += sans.get_values_for_type(x509.DNSName)
        names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    if not names:
        names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return CertificateInfo(path, tuple(names), cert.not_valid_after_utc)
