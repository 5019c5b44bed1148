"""Recent logins, shown on the dashboard so a user can spot one that was not theirs.

Only the client's network is kept — the /24 of an IPv4 address, the /48 of an IPv6 one, as
the logs keep it (ops/logs.py) — never the address itself, and only the last ``KEEP``
logins per user.
"""

from __future__ import annotations

from dataclasses import dataclass

from postvern.accounts.store import AccountStore, now
from postvern.ops.logs import anonymise_ip

KEEP = 20  # enough to notice a stranger, little enough to be no tracking log


@dataclass(frozen=True, slots=True)
class LoginRecord:
    at: int
    network: str
    method: str


def network_of(ip: str) -> str:
    """The pseudonymised network of ``ip`` ("192.0.2.0/24"), as the logs write it."""
    return anonymise_ip(ip)


class LoginHistory:
    def __init__(self, store: AccountStore) -> None:
        self.store = store

    def record(self, user_id: str, ip: str, method: str) -> None:
        with self.store.tx() as c:
            c.execute(
                "INSERT INTO login_history(user_id, at, network, method) VALUES(?, ?, ?, ?)",
                (user_id, now(), network_of(ip), method),
            )
            c.execute(
                "DELETE FROM login_history WHERE user_id=? AND id NOT IN"
                " (SELECT id FROM login_history WHERE user_id=? ORDER BY id DESC LIMIT ?)",
                (user_id, user_id, KEEP),
            )

    def recent(self, user_id: str) -> list[LoginRecord]:
        rows = self.store.rows(
            "SELECT at, network, method FROM login_history WHERE user_id=? ORDER BY id DESC",
            (user_id,),
        )
        return [LoginRecord(int(r[0]), str(r[1]), str(r[2])) for r in rows]
