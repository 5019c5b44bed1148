"""Which secret may open an account, by protocol: the rule the mail protocols ask about.

With two-factor authentication on (TOTP enabled or a passkey registered), IMAP, POP3 and
SMTP AUTH — which have no way to ask for a second factor — accept only app passwords: a
leaked account password alone no longer reads or sends mail. The portal takes the account
password (then the second factor), never an app password: an app password leaked from a
mail client must not open the account's settings.
"""

from __future__ import annotations

from postvern.directory.db import Directory

MAIL_PROTOCOLS = frozenset({"imap", "pop3", "smtp"})
WEB = "web"
# What a mail client is told when the account password is refused for this reason.
APP_PASSWORD_REQUIRED = "use an app password"  # noqa: S105 (a message, not a password)


def two_factor_on(directory: Directory, user_id: str) -> bool:
    rows = directory._rows(
        "SELECT EXISTS(SELECT 1 FROM totp WHERE user_id=? AND enabled=1)"
        " OR EXISTS(SELECT 1 FROM passkeys WHERE user_id=?)",
        (user_id, user_id),
    )
    return bool(rows[0][0])


def disabled(directory: Directory, user_id: str) -> bool:
    """Whether an administrator disabled the account: then no secret opens it anywhere."""
    rows = directory._rows(
        "SELECT disabled FROM account_settings WHERE user_id=? AND disabled=1", (user_id,)
    )
    return bool(rows)


def login_allowed(directory: Directory, user_id: str, slot_kind: str, protocol: str) -> bool:
    """The whole rule for one login: the account is not disabled, and the secret's kind may
    be used over ``protocol`` given the account's second factors."""
    if disabled(directory, user_id):
        return False
    return secret_allowed(slot_kind, protocol, two_factor_on(directory, user_id))


def two_factor_on_address(directory: Directory, address: str) -> bool:
    """Same, by address; False for an address that is no user."""
    user = directory.user(address)
    return user is not None and two_factor_on(directory, user.id)


def secret_allowed(slot_kind: str, protocol: str, two_factor: bool) -> bool:
    """Whether a secret that opened a key slot of ``slot_kind`` may log in over ``protocol``."""
    if protocol == WEB:
        return slot_kind == "password"
    if protocol in MAIL_PROTOCOLS and two_factor:
        return slot_kind == "app"
    return slot_kind in ("password", "app")
