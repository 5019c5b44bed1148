"""Autocrypt Level 1: outgoing mail carries the sender's published key, so peers learn it.

Autocrypt 1.1 §2.1: one header field ``Autocrypt: addr=<From address>; keydata=<base64>``,
where keydata is the binary key reduced to what encrypting needs: the primary key, the user
ID of ``addr`` and its self-signature, the subkeys with their binding signatures (§2.1.1,
"minimal"). A message that already has an Autocrypt field (a client that speaks Autocrypt
itself) gets none from us: two would make a receiver ignore both (§2.3).

The same minimal key is what WKD serves (draft-koch-openpgp-webkey-service §3.1 wants only
the asked-for user ID).
"""

from __future__ import annotations

import base64
import email.utils

import pysequoia
from pysequoia.packet import PacketPile, Tag

from postvern.directory.db import Directory, User
from postvern.e2e.keys import KeyStore
from postvern.mime.headers import header_end, iter_fields, unfold

HEADER = b"Autocrypt"
# Folded so no line passes RFC 5322 §2.1.1's 78 characters.
FOLD_WIDTH = 72
# Autocrypt 1.1 §2.1: any keydata-less or unknown-critical field is dropped by receivers;
# ``prefer-encrypt`` is left out, which means "no preference".


def _is_self_signature(packet: object, fingerprint: str) -> bool:
    issuer = getattr(packet, "issuer_fingerprint", None) or ""
    key_id = getattr(packet, "issuer_key_id", None) or ""
    return issuer.lower() == fingerprint or (bool(key_id) and fingerprint.endswith(key_id.lower()))


def minimal_key(data: bytes, address: str) -> bytes:
    """The certificate with only ``address``'s user ID, self-signatures and subkeys."""
    cert = pysequoia.Cert.from_bytes(data)
    fingerprint = cert.fingerprint.lower()
    wanted = address.lower()
    kept = []
    keep_component = True
    found = False
    for packet in PacketPile.from_bytes(data):
        tag = packet.tag
        if tag == Tag.UserID:
            email = (packet.user_id_email or packet.user_id or "").lower()
            keep_component = email == wanted
        elif tag == Tag.UserAttribute:
            keep_component = False
        elif tag in (Tag.PublicKey, Tag.PublicSubkey):
            keep_component = True
        elif tag == Tag.Signature:
            if keep_component and _is_self_signature(packet, fingerprint):
                kept.append(packet)
            continue
        if keep_component:
            kept.append(packet)
            found = found or tag == Tag.UserID
    if not found:
        raise ValueError("no user ID for the address")
    return bytes(pysequoia.Cert.from_packets(kept))


def header_field(address: str, key: bytes, eol: bytes = b"\r\n") -> bytes:
    """The folded ``Autocrypt:`` field for ``address`` with ``key`` (minimal, binary)."""
    data = base64.b64encode(key)
    chunks = [data[i : i + FOLD_WIDTH] for i in range(0, len(data), FOLD_WIDTH)]
    folded = (eol + b" ").join(chunks)
    return HEADER + b": addr=" + address.encode() + b"; keydata=" + eol + b" " + folded + eol


def _field_values(message: bytes, name: bytes) -> list[bytes]:
    fields_end, _ = header_end(message, 0, len(message))
    return [f.value for f in iter_fields(message, 0, fields_end) if f.lname == name.lower()]


def add_header(directory: Directory, user: User, message: bytes) -> bytes:
    """``message`` with the Autocrypt field prepended when its From is the user's own address,
    the user published an OpenPGP key naming it, and the message has no Autocrypt field yet.
    Synchronous (a directory read, key parsing): the submission service runs it in a thread.
    """
    if _field_values(message, HEADER):
        return message
    senders = email.utils.getaddresses(
        [unfold(v).decode("utf-8", "replace") for v in _field_values(message, b"From")]
    )
    if len(senders) != 1 or senders[0][1].lower() != user.address.lower():
        return message  # sent as an alias or with several authors: no key to announce
    stored = KeyStore(directory).get(user.id)
    if stored is None or not stored.publish or stored.openpgp is None:
        return message
    try:
        key = minimal_key(stored.openpgp, user.address)
    except ValueError:
        return message  # the address is not on the key (it was published for another)
    nl = message.find(b"\n")
    eol = b"\r\n" if nl > 0 and message[nl - 1 : nl] == b"\r" else b"\n"
    return header_field(user.address, key, eol) + message
