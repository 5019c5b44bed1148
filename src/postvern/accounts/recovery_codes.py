"""Recovery codes: ten single-use codes that stand in for a lost second factor.

They are shown once and kept only as keyed hashes (HMAC-SHA256 under a server subkey,
bound to the user): each has about 50 bits of entropy, far past online guessing behind the
login limits, so a slow hash would add nothing but cost. Using one deletes it. They recover
the second factor only; the recovery key of the key slots is what recovers the mailbox.
"""

from __future__ import annotations

import hashlib
import hmac

from postvern.accounts.store import AccountStore, now
from postvern.crypto import keyslots

CODE_COUNT = 10  # as GitHub, Google and Proton hand out
CODE_GROUPS = 2  # two groups of five: 10 characters of a 31-letter alphabet ≈ 50 bits
GROUP_LENGTH = 5


class RecoveryCodes:
    def __init__(self, store: AccountStore, key: bytes) -> None:
        self.store = store
        self._key = key

    def _digest(self, user_id: str, code: str) -> bytes:
        normal = keyslots.normalise_generated(code)
        return hmac.new(self._key, user_id.encode() + b"\0" + normal, hashlib.sha256).digest()

    def generate(self, user_id: str) -> list[str]:
        """Ten new codes, replacing any earlier ones. Show them once; they are not kept."""
        codes = [keyslots.generate_secret(CODE_GROUPS, GROUP_LENGTH) for _ in range(CODE_COUNT)]
        with self.store.tx() as c:
            c.execute("DELETE FROM recovery_codes WHERE user_id=?", (user_id,))
            for code in codes:
                c.execute(
                    "INSERT INTO recovery_codes(user_id, digest, created) VALUES(?, ?, ?)",
                    (user_id, self._digest(user_id, code), now()),
                )
        return codes

    def use(self, user_id: str, code: str) -> bool:
        """True once per code: a right code is deleted as it is accepted."""
        if len(code) > 64:
            return False
        return (
            self.store.execute(
                "DELETE FROM recovery_codes WHERE user_id=? AND digest=?",
                (user_id, self._digest(user_id, code)),
            )
            == 1
        )

    def remaining(self, user_id: str) -> int:
        rows = self.store.rows("SELECT count(*) FROM recovery_codes WHERE user_id=?", (user_id,))
        return int(rows[0][0])

    def clear(self, user_id: str) -> None:
        self.store.execute("DELETE FROM recovery_codes WHERE user_id=?", (user_id,))
