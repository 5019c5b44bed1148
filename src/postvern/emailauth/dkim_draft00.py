"""LEGACY: DKIM signatures made to draft-ietf-dkim-base-00 (2006), for old corpora only.

That first working-group draft had neither v= nor a body hash (bh=): one hash covered the
signed header fields, the body and the DKIM-Signature field itself. No RFC defines such a
signature (RFC 6376 §3.5 requires v=1 and bh=), so ``dkim.verify`` sends one here only
under a VerifyPolicy with ``allow_draft_versions`` (``LEGACY_POLICY``); the default policy
refuses it before any lookup.
"""

from __future__ import annotations

import base64
import re

import dkim
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

CRLF = b"\r\n"
# The draft's RSA algorithms and the hash each names.
_HASHES: dict[bytes, type[hashes.HashAlgorithm]] = {
    b"rsa-sha1": hashes.SHA1,
    b"rsa-sha256": hashes.SHA256,
}


class Draft00Error(Exception):
    """The signature or its key cannot be checked the draft-00 way."""


def is_draft00(tags: dict[bytes, bytes]) -> bool:
    """A signature of the draft-00 shape: no version and no body hash."""
    return b"v" not in tags and b"bh" not in tags


def signed_data(
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    signature_field: tuple[bytes, bytes],
    tags: dict[bytes, bytes],
) -> bytes:
    """The single stream a draft-00 signature covers.

    As Mail::DKIM computed it while it still verified these (one digest fed in order): the
    h= fields canonicalised and chosen as RFC 4871 §5.4 later kept, the empty line, the
    canonical body (cut to l= if given), a line break, then the signature field itself with
    b= emptied and no final line break.
    """
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c"))
    except InvalidCanonicalizationPolicyError:
        raise Draft00Error("unknown canonicalization (c=)") from None
    names = [n.strip().lower() for n in tags[b"h"].split(b":")]
    chosen = dkim.select_headers(policy.canonicalize_headers(headers), names)
    fields = b"".join(name + b":" + value for name, value in chosen)
    name, value = signature_field
    ((name, value),) = policy.canonicalize_headers([(name, dkim.RE_BTAG.sub(rb"\1", value))])
    canonical_body = policy.canonicalize_body(body)
    if b"l" in tags:
        canonical_body = canonical_body[: int(tags[b"l"])]
    return fields + CRLF + canonical_body + CRLF + name + b":" + value.rstrip()


def verify(
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    signature_field: tuple[bytes, bytes],
    tags: dict[bytes, bytes],
    key_record: bytes,
) -> bool:
    """True when the signature verifies under the key record's p= (already checked)."""
    algorithm = _HASHES.get(tags[b"a"].lower())
    if algorithm is None:
        raise Draft00Error("draft-00 signatures are RSA only")
    try:
        der = base64.b64decode(re.sub(rb"\s+", b"", parse_tag_value(key_record)[b"p"]))
        key = serialization.load_der_public_key(der)
    except (InvalidTagValueList, KeyError, ValueError, UnsupportedAlgorithm):
        raise Draft00Error("key record has no usable p=") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise Draft00Error("key is not RSA")
    try:
        signature = base64.b64decode(re.sub(rb"\s+", b"", tags[b"b"]), validate=True)
    except ValueError:
        raise Draft00Error("b= is not base64") from None
    data = signed_data(headers, body, signature_field, tags)
    try:
        key.verify(signature, data, padding.PKCS1v15(), algorithm())
    except InvalidSignature:
        return False
    return True
