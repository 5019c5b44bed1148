"""Time-based one-time passwords (RFC 6238) as a second factor.

Enrolment draws a 160-bit secret (RFC 4226 §4, R6), shows it as text and as a QR code of the
``otpauth://`` URI (rendered here as SVG), and turns the factor on only once a first code
from the user's app verifies. A code is accepted for its own 30-second step and one step
either side (RFC 6238 §5.2 recommends at most one step of network delay and skew); the
step of every accepted code is recorded, so a code — or any older one — is never accepted
twice (RFC 6238 §5.2: "the verifier MUST NOT accept the second attempt of the same OTP").

The secret is sealed with ChaCha20-Poly1305 under its own subkey of the server key, bound
to the user's id, on top of the directory's encryption: a copy of the directory read with
its key still does not hand out second factors. A second factor protects the login, not the
mailbox (the password's key slot does that), so a server-held key is the right strength.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass

import pyotp
import segno
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from postvern.accounts.store import AccountStore, now

SECRET_BYTES = 20  # RFC 4226 §4 R6: a shared secret of 160 bits is recommended
PERIOD = 30  # RFC 6238 §5.2: the recommended time step
DIGITS = 6  # what every authenticator app shows
SKEW_STEPS = 1  # RFC 6238 §5.2: at most one step back or forward
NONCE_BYTES = 12


@dataclass(frozen=True, slots=True)
class Enrolment:
    secret: str  # base32, for typing into an app by hand
    uri: str  # otpauth:// for the QR code
    qr_svg: str


class TOTP:
    def __init__(self, store: AccountStore, key: bytes, issuer: str) -> None:
        self.store = store
        self._aead = ChaCha20Poly1305(key)
        self.issuer = issuer

    def _seal(self, user_id: str, secret: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret.encode(), _context(user_id))

    def _open(self, user_id: str, sealed: bytes) -> str:
        nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        return self._aead.decrypt(nonce, body, _context(user_id)).decode()

    def begin(self, user_id: str, address: str) -> Enrolment:
        """A new secret, stored but not in force until :meth:`confirm` (a pending
        enrolment replaces an earlier pending one; an enabled factor stays as it is)."""
        secret = base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode()
        with self.store.tx() as c:
            if c.execute("SELECT 1 FROM totp WHERE user_id=? AND enabled=1", (user_id,)).fetchall():
                raise ValueError("two-factor codes are already on; turn them off first")
            c.execute(
                "INSERT INTO totp(user_id, secret, enabled, last_step, created)"
                " VALUES(?, ?, 0, 0, ?) ON CONFLICT(user_id) DO UPDATE SET"
                " secret=excluded.secret, enabled=0, last_step=0, created=excluded.created",
                (user_id, self._seal(user_id, secret), now()),
            )
        uri = pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD).provisioning_uri(
            name=address, issuer_name=self.issuer
        )
        return Enrolment(secret, uri, qr_svg(uri))

    def confirm(self, user_id: str, code: str, at: float) -> bool:
        """Turn the factor on if ``code`` is right for the pending secret."""
        return self._check(user_id, code, at, enabled=False)

    def verify(self, user_id: str, code: str, at: float) -> bool:
        """Whether ``code`` is a valid, not yet used code of the user's enabled factor."""
        return self._check(user_id, code, at, enabled=True)

    def _check(self, user_id: str, code: str, at: float, *, enabled: bool) -> bool:
        code = "".join(code.split())
        if len(code) != DIGITS or not code.isascii() or not code.isdigit():
            return False
        rows = self.store.rows(
            "SELECT secret, last_step FROM totp WHERE user_id=? AND enabled=?",
            (user_id, int(enabled)),
        )
        if not rows:
            return False
        otp = pyotp.TOTP(self._open(user_id, bytes(rows[0][0])), digits=DIGITS, interval=PERIOD)
        current = int(at) // PERIOD
        matched = None
        for step in range(current - SKEW_STEPS, current + SKEW_STEPS + 1):
            if hmac.compare_digest(otp.generate_otp(step), code):
                matched = step
        if matched is None:
            return False
        # Compare-and-set on the step: of two requests racing with one code, one wins.
        changed = self.store.execute(
            "UPDATE totp SET last_step=?, enabled=1 WHERE user_id=? AND last_step<? AND enabled=?",
            (matched, user_id, matched, int(enabled)),
        )
        return changed == 1

    def enabled(self, user_id: str) -> bool:
        return bool(self.store.rows("SELECT 1 FROM totp WHERE user_id=? AND enabled=1", (user_id,)))

    def disable(self, user_id: str) -> None:
        self.store.execute("DELETE FROM totp WHERE user_id=?", (user_id,))


def _context(user_id: str) -> bytes:
    return f"postvern totp v1|{user_id}".encode()


def qr_svg(data: str) -> str:
    """The QR code of ``data`` as an inline SVG element (no script, no style attribute)."""
    qr = segno.make(data, error="m")
    return str(qr.svg_inline(scale=4, dark="#1f2933", light="#ffffff", omitsize=False))
