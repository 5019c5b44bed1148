"""The Sender Rewriting Scheme: forwarding without breaking SPF, and bounces that find home.

When an alias forwards mail to an outside address, the envelope sender is rewritten into our
own domain (``SRS0=hash=ts=orig-domain=orig-local@our-domain``) so the next hop's SPF check
sees us, the actual sender. A bounce to that address comes back to our MX, which checks the
keyed hash and the timestamp and relays it to the original sender; a forged or expired SRS
address is refused, so the scheme cannot be used as an open relay. srslib does the encoding
(the Guarded scheme of libsrs2).
"""

from __future__ import annotations

import hmac

import srslib

# How long a bounce may take to come back: libsrs2's default.
VALIDITY_DAYS = 21
# The hash in the address: base64 of HMAC-SHA1, compared without case (libsrs2's default, so
# ~38⁴ ≈ 2 million values); every address we write carries all of it.
HASH_LENGTH = 4
_PREFIXES = ("srs0=", "srs0-", "srs0+", "srs1=", "srs1-", "srs1+")


class ForgedSRS(Exception):
    """An SRS address whose hash does not verify, or that has expired."""


def is_srs(address: str) -> bool:
    return address.lower().startswith(_PREFIXES)


class _FullHashSRS(srslib.SRS):
    """srslib with the hash checked in full and in constant time.

    srslib compares the address's hash with ours truncated to *the address's* length, so a
    forger who writes a one-character hash is right once in ~38 tries, and the bounce path
    would then relay their mail anywhere, under our name. Only a hash of the full length
    we write is accepted here, compared with :func:`hmac.compare_digest`.
    """

    def check_hash(self, h: str, s: str, addr: str) -> None:
        if len(h) != HASH_LENGTH:
            raise srslib.InvalidHashError("invalid hash in SRS address")
        given = h.lower().encode()
        matches = [
            hmac.compare_digest(given, self.generate_hash(s, key, HASH_LENGTH).lower().encode())
            for key in [self._secret, *self._prev_secrets]
        ]
        if not any(matches):
            raise srslib.InvalidHashError("invalid hash in SRS address")


class SRS:
    def __init__(self, secret: bytes) -> None:
        self._srs = _FullHashSRS(secret, validity_days=VALIDITY_DAYS, hash_length=HASH_LENGTH)

    def forward(self, mail_from: str, alias_domain: str) -> str:
        """The envelope sender to use when forwarding; the null sender stays null."""
        if not mail_from:
            return ""
        return str(self._srs.forward(mail_from, alias_domain))

    def reverse(self, address: str) -> str:
        """Where a bounce to ``address`` should go; raises ForgedSRS if it is not ours."""
        try:
            return str(self._srs.reverse(address))
        except (srslib.InvalidHashError, srslib.InvalidTimestampError, srslib.Error):
            raise ForgedSRS("not a valid SRS address of ours") from None
