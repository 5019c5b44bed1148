"""Snapshot manifests and the outer encryption of every backup object.

Layout in a target (every name random, so names say nothing about users or order)::

    m/<snapshot id>   the signed header: the snapshot key wrapped twice, the server key sealed
                      to the offline key, the hash of the body, a small encrypted summary
    b/<snapshot id>   the manifest body: files, pieces, objects, keys (encrypted, padded)
    o/<object id>     data: pieces of files packed together, encrypted, padded

**Outer encryption.** Each snapshot draws a random 256-bit key K. Objects, the body and the
summary are ChaCha20-Poly1305 (RFC 8439) under K with a random 96-bit nonce each, and
associated data binding each to its snapshot and name: an object moved to another name or
snapshot does not open. K is wrapped (a) to the offline key pair with HPKE (RFC 9180, the
spool's suite: ML-KEM-768 + X25519, HKDF-SHA256, ChaCha20-Poly1305), (b) under the server's
wrap key. The server key itself travels only HPKE-sealed to the offline key.

**Signature.** The header (which holds the hash of the body, which holds the hash of every
object) is signed with Ed25519 (RFC 8032); so one signature check makes the whole snapshot
tamper-evident.

**Sizes.** Object plaintexts are padded to a power of two (64 KiB … 4 MiB) and the body to a
power of two ≥ 4 KiB: a bucket shows the size class of each object and, within a factor of
two, the size of each manifest — not a per-user size (pieces of many files share objects).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from postvern.backup import keys
from postvern.crypto.seal import Opener, Sealer, SealError
from postvern.crypto.serverkey import ServerKey

MAGIC = b"PVBK1\n"
FORMAT_VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
SIGNATURE_BYTES = 64
MIN_BODY_PAD = 4096
HEADER_PREFIX = "m/"
BODY_PREFIX = "b/"
OBJECT_PREFIX = "o/"
# A header is a few kilobytes (two wrapped keys of ~1.1 KB); anything far larger is not ours.
MAX_HEADER_BYTES = 64 * 1024


class ManifestError(Exception):
    """A snapshot is damaged, tampered with, or not openable with the keys given."""


def new_id() -> str:
    """128 random bits: names reveal neither the time nor the order of snapshots."""
    return secrets.token_hex(16)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def encrypt(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def decrypt(key: bytes, data: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], ad)
    except (InvalidTag, ValueError):
        raise ManifestError("does not authenticate") from None


def object_ad(writer: str, name: str) -> bytes:
    return f"postvern backup object v1|{writer}|{name}".encode()


def pad_size(n: int, minimum: int) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


@dataclass(frozen=True, slots=True)
class Piece:
    sha256: str  # of the plaintext piece
    obj: str
    offset: int
    length: int


@dataclass(slots=True)
class FileEntry:
    size: int
    stamp: int  # a fingerprint of the source's stat, so an unchanged file is not read again
    pieces: list[Piece]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key_id: str  # the snapshot whose key encrypted the object (it is never re-encrypted)
    size: int  # ciphertext octets
    sha256: str  # of the ciphertext, checked before decrypting


@dataclass
class Manifest:
    id: str
    created: float
    kind: str  # "full" or "delta" (the files changed since ``base``, a full snapshot)
    base: str | None = None
    schema: dict[str, int] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    def encode_body(self) -> bytes:
        doc = {
            "v": FORMAT_VERSION,
            "id": self.id,
            "created": self.created,
            "kind": self.kind,
            "base": self.base,
            "schema": self.schema,
            "keys": {k: v.hex() for k, v in self.keys.items()},
            "objects": {n: [o.key_id, o.size, o.sha256] for n, o in self.objects.items()},
            "files": {
                p: [f.size, f.stamp, [[x.sha256, x.obj, x.offset, x.length] for x in f.pieces]]
                for p, f in self.files.items()
            },
            "deleted": self.deleted,
        }
        packed = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 6)
        framed = struct.pack(">Q", len(packed)) + packed
        return framed + bytes(pad_size(len(framed), MIN_BODY_PAD) - len(framed))

    @classmethod
    def decode_body(cls, data: bytes) -> Manifest:
        (length,) = struct.unpack(">Q", data[:8])
        doc: dict[str, Any] = json.loads(zlib.decompress(data[8 : 8 + length]))
        if doc.get("v") != FORMAT_VERSION:
            raise ManifestError("manifest of an unknown format version")
        return cls(
            id=doc["id"],
            created=float(doc["created"]),
            kind=doc["kind"],
            base=doc["base"],
            schema={k: int(v) for k, v in doc["schema"].items()},
            keys={k: bytes.fromhex(v) for k, v in doc["keys"].items()},
            objects={n: ObjectInfo(o[0], int(o[1]), o[2]) for n, o in doc["objects"].items()},
            files={
                p: FileEntry(int(f[0]), int(f[1]), [Piece(x[0], x[1], x[2], x[3]) for x in f[2]])
                for p, f in doc["files"].items()
            },
            deleted=list(doc["deleted"]),
        )


@dataclass(frozen=True)
class Summary:
    """What listing needs without the body: when, which kind, on what base."""

    id: str
    created: float
    kind: str
    base: str | None


@dataclass
class Header:
    id: str
    body_sha256: str
    body_size: int
    offline: bytes = field(repr=False)
    server: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    meta: bytes = field(repr=False)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": FORMAT_VERSION,
                "id": self.id,
                "body_sha256": self.body_sha256,
                "body_size": self.body_size,
                "offline": _b64(self.offline),
                "server": _b64(self.server),
                "server_key": _b64(self.server_key),
                "meta": _b64(self.meta),
            },
            separators=(",", ":"),
        ).encode()


def _key_info(snapshot_id: str) -> bytes:
    return f"postvern backup key v1 {snapshot_id}".encode()


def _server_key_info(snapshot_id: str) -> bytes:
    return f"postvern backup server key v1 {snapshot_id}".encode()


SUMMARY_BYTES = 256  # every summary padded to one length: a full and a delta look alike


def _padded_summary(summary: dict[str, object]) -> bytes:
    text = json.dumps(summary).encode()
    return text + b" " * max(0, SUMMARY_BYTES - len(text))


def seal_manifest(
    manifest: Manifest,
    snapshot_key: bytes,
    server_key: ServerKey,
    offline_public: bytes,
    server_root: bytes,
) -> tuple[bytes, bytes]:
    """(header object, body object) for ``manifest``, encrypted under ``snapshot_key``."""
    sid = manifest.id
    body = encrypt(snapshot_key, manifest.encode_body(), f"body|{sid}".encode())
    summary = {"created": manifest.created, "kind": manifest.kind, "base": manifest.base}
    header = Header(
        id=sid,
        body_sha256=hashlib.sha256(body).hexdigest(),
        body_size=len(body),
        offline=Sealer(offline_public).seal(snapshot_key, _key_info(sid)),
        server=encrypt(keys.wrap_key(server_key), snapshot_key, f"wrap|{sid}".encode()),
        server_key=Sealer(offline_public).seal(server_root, _server_key_info(sid)),
        meta=encrypt(snapshot_key, _padded_summary(summary), f"meta|{sid}".encode()),
    )
    signed = MAGIC + header.to_json()
    signature = keys.signing_key(server_key).sign(signed)
    return signed + b"\n" + signature, body


class Opening:
    """The keys a reader holds: the server key (verify on the server) or the offline key."""

    def __init__(
        self, *, server_key: ServerKey | None = None, offline: keys.OfflineKey | None = None
    ) -> None:
        if server_key is None and offline is None:
            raise ValueError("need the server key or the offline key")
        self.server_key = server_key
        self.offline = offline
        public = (
            offline.signing_public if offline is not None else keys.signing_public(server_key)  # type: ignore[arg-type]
        )
        self._verifier = ed25519.Ed25519PublicKey.from_public_bytes(public)
        self._opener = Opener(offline.private) if offline is not None else None

    def read_header(self, data: bytes, expected_id: str) -> Header:
        """Check the signature first; only then parse."""
        if len(data) > MAX_HEADER_BYTES or not data.startswith(MAGIC):
            raise ManifestError(f"m/{expected_id}: not a snapshot header")
        signed, signature = data[: -SIGNATURE_BYTES - 1], data[-SIGNATURE_BYTES:]
        try:
            self._verifier.verify(signature, signed)
        except InvalidSignature:
            raise ManifestError(f"m/{expected_id}: bad signature (tampered or foreign)") from None
        doc = json.loads(signed[len(MAGIC) :])
        if doc.get("v") != FORMAT_VERSION or doc.get("id") != expected_id:
            raise ManifestError(f"m/{expected_id}: header names another snapshot")
        return Header(
            id=doc["id"],
            body_sha256=doc["body_sha256"],
            body_size=int(doc["body_size"]),
            offline=_unb64(doc["offline"]),
            server=_unb64(doc["server"]),
            server_key=_unb64(doc["server_key"]),
            meta=_unb64(doc["meta"]),
        )

    def snapshot_key(self, header: Header) -> bytes:
        if self._opener is not None:
            try:
                return self._opener.open(header.offline, _key_info(header.id))
            except SealError:
                raise ManifestError(f"m/{header.id}: not openable with this offline key") from None
        assert self.server_key is not None
        try:
            return decrypt(
                keys.wrap_key(self.server_key), header.server, f"wrap|{header.id}".encode()
            )
        except ManifestError:
            raise ManifestError(f"m/{header.id}: not openable with this server key") from None

    def summary(self, header: Header) -> Summary:
        key = self.snapshot_key(header)
        doc = json.loads(decrypt(key, header.meta, f"meta|{header.id}".encode()))
        return Summary(header.id, float(doc["created"]), doc["kind"], doc["base"])

    def server_root(self, header: Header) -> bytes:
        """The sealed server key (offline key holders only)."""
        if self._opener is None:
            raise ManifestError("the server key opens only with the offline backup key")
        try:
            return self._opener.open(header.server_key, _server_key_info(header.id))
        except SealError:
            raise ManifestError(f"m/{header.id}: server key does not open") from None

    def body(self, header: Header, data: bytes) -> Manifest:
        if hashlib.sha256(data).hexdigest() != header.body_sha256:
            raise ManifestError(f"b/{header.id}: hash mismatch (tampered or damaged)")
        key = self.snapshot_key(header)
        try:
            plain = decrypt(key, data, f"body|{header.id}".encode())
        except ManifestError:
            raise ManifestError(f"b/{header.id}: does not authenticate") from None
        manifest = Manifest.decode_body(plain)
        if manifest.id != header.id:
            raise ManifestError(f"b/{header.id}: body names another snapshot")
        return manifest
