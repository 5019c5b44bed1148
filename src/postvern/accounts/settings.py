"""A user's own settings the portal edits: role, whether the account is disabled, the Junk
threshold, and allow and block lists of senders and domains."""

from __future__ import annotations

from dataclasses import dataclass

from postvern.accounts.store import AccountStore
from postvern.directory.addresses import AddressError, normalise_address, normalise_domain

ROLES = ("user", "admin")
LIST_KINDS = ("allow", "block")
MAX_LIST_ENTRIES = 1000  # per list; a filter, not an address book
# The Junk threshold is a spam score (filters/verdict.py scores 0-10); outside this range it
# would junk everything or nothing.
MIN_THRESHOLD = 1.0
MAX_THRESHOLD = 20.0


class SettingsError(ValueError):
    """A setting that cannot be stored (message says why)."""


@dataclass(frozen=True, slots=True)
class AccountSettings:
    role: str = "user"
    disabled: bool = False
    junk_threshold: float | None = None  # None: the server's [filters] default

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def normalise_entry(entry: str) -> str:
    """A sender address or a domain (``example.org`` or ``@example.org``), normalised."""
    entry = entry.strip()
    try:
        if "@" in entry.lstrip("@"):
            return normalise_address(entry)
        return normalise_domain(entry.lstrip("@"))
    except AddressError as e:
        raise SettingsError(f"{entry!r} is neither an address nor a domain: {e}") from None


class Settings:
    def __init__(self, store: AccountStore) -> None:
        self.store = store

    def get(self, user_id: str) -> AccountSettings:
        rows = self.store.rows(
            "SELECT role, disabled, junk_threshold FROM account_settings WHERE user_id=?",
            (user_id,),
        )
        if not rows:
            return AccountSettings()
        role, disabled, threshold = rows[0]
        return AccountSettings(str(role), bool(disabled), None if threshold is None else threshold)

    def _set(self, user_id: str, column: str, value: object) -> None:
        assert column in ("role", "disabled", "junk_threshold")
        with self.store.tx() as c:
            c.execute(
                "INSERT INTO account_settings(user_id) VALUES(?) ON CONFLICT DO NOTHING", (user_id,)
            )
            c.execute(f"UPDATE account_settings SET {column}=? WHERE user_id=?", (value, user_id))

    def set_role(self, user_id: str, role: str) -> None:
        if role not in ROLES:
            raise SettingsError(f"role must be one of {', '.join(ROLES)}")
        self._set(user_id, "role", role)

    def set_disabled(self, user_id: str, disabled: bool) -> None:
        self._set(user_id, "disabled", int(disabled))

    def set_junk_threshold(self, user_id: str, threshold: float | None) -> None:
        if threshold is not None and not MIN_THRESHOLD <= threshold <= MAX_THRESHOLD:
            raise SettingsError(f"the threshold must be {MIN_THRESHOLD:g} to {MAX_THRESHOLD:g}")
        self._set(user_id, "junk_threshold", threshold)

    def sender_list(self, user_id: str, kind: str) -> list[str]:
        rows = self.store.rows(
            "SELECT entry FROM sender_lists WHERE user_id=? AND kind=? ORDER BY entry",
            (user_id, kind),
        )
        return [str(r[0]) for r in rows]

    def add_sender(self, user_id: str, kind: str, entry: str) -> str:
        if kind not in LIST_KINDS:
            raise SettingsError("list must be allow or block")
        entry = normalise_entry(entry)
        with self.store.tx() as c:
            count = c.execute(
                "SELECT count(*) FROM sender_lists WHERE user_id=? AND kind=?", (user_id, kind)
            ).fetchall()[0][0]
            if int(count) >= MAX_LIST_ENTRIES:
                raise SettingsError(f"at most {MAX_LIST_ENTRIES} entries per list")
            c.execute(
                "INSERT INTO sender_lists(user_id, kind, entry) VALUES(?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (user_id, kind, entry),
            )
        return entry

    def remove_sender(self, user_id: str, kind: str, entry: str) -> bool:
        return (
            self.store.execute(
                "DELETE FROM sender_lists WHERE user_id=? AND kind=? AND entry=?",
                (user_id, kind, entry),
            )
            == 1
        )
