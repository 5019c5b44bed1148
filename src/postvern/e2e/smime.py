"""S/MIME: checking a user's certificate at upload, and enveloped-data encryption (RFC 8551).

The CMS EnvelopedData (RFC 5652 §6) is made by OpenSSL's CMS implementation (`openssl cms`,
a maintained library made for exactly this; Python's `cryptography` builds only RSA
PKCS#1 v1.5 recipients): the content encrypted with AES-256-CBC (RFC 3565), the content key
given to the recipient as RFC 8551 §2.3 prefers —

* an RSA certificate: RSAES-OAEP with SHA-256 (RFC 8017, RFC 4055 §4);
* an elliptic-curve certificate (P-256, P-384, P-521): ECDH key agreement, the ephemeral-
  static dhSinglePass-stdDH scheme with the SHA-256 KDF (RFC 5753 §3.1, RFC 8551 §2.3).

The plaintext reaches OpenSSL through a pipe and the result comes back the same way: no
message text touches a file. The stored message is ``application/pkcs7-mime;
smime-type=enveloped-data`` (RFC 8551 §3.3). AES-256-CBC rather than AES-256-GCM
(AuthEnvelopedData, RFC 5083): every S/MIME client decrypts CBC, not all read GCM yet.
"""

from __future__ import annotations

import base64
import datetime
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from postvern.e2e.protect import SubjectPolicy, split, wrap

MIN_RSA_BITS = 2048
# The curves RFC 5753 and RFC 8551 name for ECDH in CMS, which every S/MIME client knows.
EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
OPENSSL = "openssl"
# Encrypting a message of the largest size the MX takes is well under a second; a stuck
# process must not hold a delivery for ever.
OPENSSL_TIMEOUT = 60.0
# How the content key reaches each kind of recipient (openssl cms -keyopt).
RSA_OAEP_OPTIONS = ("rsa_padding_mode:oaep", "rsa_oaep_md:sha256", "rsa_mgf1_md:sha256")
ECDH_OPTIONS = ("ecdh_kdf_md:sha256",)
# RFC 2045 §6.8: base64 lines are at most 76 characters.
BASE64_LINE = 76
MAX_CERT_BYTES = 64 * 1024
SMIME_FIELDS = [
    b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m",
    b"Content-Transfer-Encoding: base64",
    b"Content-Disposition: attachment; filename=smime.p7m",
]


class CertificateRefused(ValueError):
    """An uploaded certificate that cannot be used; the message is the reason."""


@dataclass(frozen=True, slots=True)
class CertInfo:
    fingerprint: str  # SHA-256 of the DER certificate, upper-case hex
    subject: str
    emails: tuple[str, ...]
    expires: datetime.datetime
    data: bytes  # DER


def _load(data: bytes) -> x509.Certificate:
    if b"PRIVATE KEY" in data:
        raise CertificateRefused(
            "this holds a private key: upload only the certificate, the private key stays"
            " in your mail client"
        )
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
            if len(certs) != 1:
                raise CertificateRefused(f"expected one certificate, found {len(certs)}")
            return certs[0]
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise CertificateRefused("this is not an X.509 certificate (PEM or DER)") from None


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def check_certificate(data: bytes, *, now: datetime.datetime | None = None) -> CertInfo:
    """Parse an uploaded S/MIME certificate and refuse it, with the reason, unless mail can be
    encrypted to it: valid now, an RSA key of at least ``MIN_RSA_BITS`` with keyEncipherment
    allowed (RFC 8550 §4.4.2), and emailProtection among its extended uses when it lists any
    (RFC 8550 §4.4.4)."""
    if len(data) > MAX_CERT_BYTES:
        raise CertificateRefused(f"the certificate is larger than {MAX_CERT_BYTES // 1024} KiB")
    cert = _load(data)
    now = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise CertificateRefused(f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise CertificateRefused("the certificate is not valid yet")
    key = cert.public_key()
    usage = _extension(cert, x509.KeyUsage)
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if isinstance(eku, x509.ExtendedKeyUsage) and not (
        {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
        & set(eku)
    ):
        raise CertificateRefused("the certificate is not for email (no emailProtection use)")
    if isinstance(key, rsa.RSAPublicKey):
        # RFC 5280 §4.2.1.3: without the extension, the key may serve any use.
        if isinstance(usage, x509.KeyUsage) and not usage.key_encipherment:
            raise CertificateRefused(
                "the certificate does not allow keyEncipherment: it can sign, not receive"
                " encrypted mail"
            )
        if key.key_size < MIN_RSA_BITS:
            raise CertificateRefused(
                f"RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} are needed"
            )
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(usage, x509.KeyUsage) and not usage.key_agreement:
            raise CertificateRefused(
                "the certificate does not allow keyAgreement: it can sign, not receive"
                " encrypted mail"
            )
        if not isinstance(key.curve, EC_CURVES):
            raise CertificateRefused(
                f"elliptic curve {key.curve.name}: S/MIME encryption needs P-256, P-384 or P-521"
            )
    else:
        raise CertificateRefused("the certificate's key type cannot receive encrypted mail")
    san = _extension(cert, x509.SubjectAlternativeName)
    emails = (
        tuple(san.get_values_for_type(x509.RFC822Name))
        if isinstance(san, x509.SubjectAlternativeName)
        else ()
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertInfo(
        cert.fingerprint(hashes.SHA256()).hex().upper(),
        cert.subject.rfc4514_string(),
        emails,
        cert.not_valid_after_utc,
        der,
    )


class EnvelopeFailed(Exception):
    """OpenSSL could not make the envelope (the message says why, never the content)."""


def encrypt_message(raw: bytes, cert_der: bytes, subject: SubjectPolicy) -> bytes:
    """``raw`` as an S/MIME enveloped-data message to the certificate, headers protected."""
    parts = split(raw, subject)
    der = envelope(parts.inner, x509.load_der_x509_certificate(cert_der))
    text = base64.b64encode(der)
    lines = [text[i : i + BASE64_LINE] for i in range(0, len(text), BASE64_LINE)]
    return wrap(parts, SMIME_FIELDS, [*lines, b""])


def envelope(content: bytes, cert: x509.Certificate) -> bytes:
    """The DER EnvelopedData of ``content`` for the certificate's holder."""
    key = cert.public_key()
    options = RSA_OAEP_OPTIONS if isinstance(key, rsa.RSAPublicKey) else ECDH_OPTIONS
    # The certificate is public; it is the only thing written to a file (a private 0700
    # folder, gone when this returns).
    with tempfile.TemporaryDirectory(prefix="postvern-smime-") as folder:
        recipient = Path(folder) / "recipient.pem"
        recipient.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        command = [OPENSSL, "cms", "-encrypt", "-binary", "-aes-256-cbc", "-outform", "DER"]
        command += ["-recip", str(recipient)]
        for option in options:
            command += ["-keyopt", option]
        # Binary: the payload is a MIME entity already, its line ends as they came.
        done = subprocess.run(
            command, input=content, capture_output=True, timeout=OPENSSL_TIMEOUT, check=False
        )
    if done.returncode != 0 or not done.stdout:
        first = done.stderr.decode(errors="replace").strip().splitlines()[:1]
        raise EnvelopeFailed(
            f"openssl cms -encrypt failed: {first[0] if first else done.returncode}"
        )
    return done.stdout
