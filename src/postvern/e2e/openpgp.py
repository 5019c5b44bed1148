"""OpenPGP: checking a user's public key at upload, and PGP/MIME encryption (RFC 3156).

Sequoia (through ``pysequoia``) does the OpenPGP work in-process: no gpg process per message,
and its standard policy decides which keys and algorithms are usable. A key is refused at
upload, with the reason, when it cannot serve (:func:`check_key`); the server keeps only the
public certificate, never a secret key.

Encrypted messages are PGP/MIME (RFC 3156 §4)::

    Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary=…
    ├─ application/pgp-encrypted      "Version: 1"
    └─ application/octet-stream       ASCII-armored OpenPGP message of the inner entity
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass

import pysequoia
from pysequoia.packet import PacketPile, PublicKeyAlgorithm, Tag

from postvern.e2e.protect import SubjectPolicy, split, wrap

# The floor for RSA (and NIST SP 800-131A's since 2014): below it, refused.
MIN_RSA_BITS = 2048
# RFC 4880 §5.5.2: a v4 key packet is version (1), creation time (4), algorithm (1), then
# the algorithm's MPIs; an RSA key's first MPI is n, whose 2-octet bit count is its size.
# RFC 9580 §5.5.2: v6 adds a 4-octet length of the key material before it.
_V4_MPI_OFFSET = 6
_V6_MPI_OFFSET = 10
# (pysequoia's enums are not hashable: tuples, compared with ==)
_RSA = (
    PublicKeyAlgorithm.RSAEncryptSign,
    PublicKeyAlgorithm.RSAEncrypt,
    PublicKeyAlgorithm.RSASign,
)
_KEY_TAGS = (Tag.PublicKey, Tag.PublicSubkey, Tag.SecretKey, Tag.SecretSubkey)
_SECRET_TAGS = (Tag.SecretKey, Tag.SecretSubkey)
# A certificate bigger than this is not a mail user's key (keyserver-flooded signatures).
MAX_CERT_BYTES = 256 * 1024
# RFC 3156 §4: the first part's body, and the parts' descriptions as RFC 3156 shows them.
VERSION_PART = b"Version: 1"
PROTOCOL = b"application/pgp-encrypted"


class KeyRefused(ValueError):
    """An uploaded key that cannot be used; the message is the reason, for the user."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    fingerprint: str  # upper-case hex, as gpg prints it
    user_ids: tuple[str, ...]
    expires: datetime.datetime | None
    data: bytes  # the binary (unarmored) certificate, as stored


def _rsa_bits(body: bytes) -> int:
    offset = _V6_MPI_OFFSET if body[:1] == b"\x06" else _V4_MPI_OFFSET
    return int.from_bytes(body[offset : offset + 2], "big")


def check_key(data: bytes, *, now: datetime.datetime | None = None) -> KeyInfo:
    """Parse an uploaded OpenPGP public key (binary or armored) and refuse it with the reason
    if it cannot be encrypted to: a secret key, more than one key, revoked, expired, RSA below
    ``MIN_RSA_BITS``, or no valid encryption-capable (sub)key."""
    if len(data) > MAX_CERT_BYTES:
        raise KeyRefused(f"the key is larger than {MAX_CERT_BYTES // 1024} KiB")
    try:
        certs = pysequoia.Cert.split_bytes(data)
        packets = list(PacketPile.from_bytes(data))
    except Exception:
        raise KeyRefused("this is not an OpenPGP public key") from None
    if len(certs) != 1:
        raise KeyRefused(f"expected one OpenPGP key, found {len(certs)}")
    for packet in packets:
        if packet.tag in _SECRET_TAGS:
            raise KeyRefused(
                "this is a private key: upload only the public key (gpg --export), the"
                " private key stays in your mail client"
            )
        # Checked before anything asks Sequoia's policy, which refuses weak keys with an
        # error of its own: the user should read the reason in our words.
        if packet.tag in _KEY_TAGS and packet.key_algorithm in _RSA:
            bits = _rsa_bits(packet.body)
            if bits < MIN_RSA_BITS:
                raise KeyRefused(f"RSA key of {bits} bits: at least {MIN_RSA_BITS} are needed")
    cert = certs[0]
    if cert.is_revoked:
        raise KeyRefused("the key is revoked")
    expires = cert.expiration
    if expires is not None and expires <= (now or datetime.datetime.now(datetime.UTC)):
        raise KeyRefused(f"the key expired on {expires:%Y-%m-%d}")
    try:
        pysequoia.encrypt(b"", [cert], armor=False)
    except Exception:
        raise KeyRefused(
            "the key has no valid encryption subkey (it can only sign, or its encryption"
            " subkeys are expired or revoked)"
        ) from None
    user_ids = tuple(str(u) for u in cert.user_ids)
    return KeyInfo(cert.fingerprint.upper(), user_ids, expires, bytes(cert))


def has_address(info: KeyInfo, address: str) -> bool:
    """Whether one of the key's user IDs names ``address`` (as ``Name <addr>`` or bare)."""
    wanted = address.lower()
    for uid in info.user_ids:
        inner = uid[uid.rfind("<") + 1 : uid.rfind(">")] if "<" in uid else uid
        if inner.strip().lower() == wanted:
            return True
    return False


def armored(data: bytes) -> str:
    """The ASCII-armored public key block (RFC 4880 §6.2)."""
    return str(pysequoia.Cert.from_bytes(data))


def encrypt_message(raw: bytes, cert_data: bytes, subject: SubjectPolicy) -> bytes:
    """``raw`` as a PGP/MIME message encrypted to the certificate, headers protected."""
    parts = split(raw, subject)
    cert = pysequoia.Cert.from_bytes(cert_data)
    armor = pysequoia.encrypt(parts.inner, [cert], armor=True)
    eol = parts.eol
    # A boundary that cannot occur in base64-like armor nor the two fixed parts (RFC 2046 §5.1.1).
    boundary = b"=_pgp_" + secrets.token_hex(12).encode()
    ct = b'multipart/encrypted; protocol="' + PROTOCOL + b'"; boundary="' + boundary + b'"'
    lines = [
        b"This is an OpenPGP/MIME encrypted message (RFC 3156).",
        b"--" + boundary,
        b"Content-Type: " + PROTOCOL,
        b"Content-Description: PGP/MIME version identification",
        b"",
        VERSION_PART,
        b"",
        b"--" + boundary,
        b'Content-Type: application/octet-stream; name="encrypted.asc"',
        b"Content-Description: OpenPGP encrypted message",
        b'Content-Disposition: inline; filename="encrypted.asc"',
        b"",
        armor.rstrip(b"\r\n").replace(b"\r\n", b"\n").replace(b"\n", eol),
        b"",
        b"--" + boundary + b"--",
        b"",
    ]
    return wrap(parts, [b"Content-Type: " + ct], lines)
