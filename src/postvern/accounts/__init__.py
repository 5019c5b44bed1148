"""Accounts: second factors (TOTP, passkeys and their PRF key slots, recovery codes), portal
sessions and API tokens.

The web portal and the API only render and call this package; IMAP, POP3 and SMTP AUTH ask
it (through :mod:`postvern.accounts.policy`) whether the account password may be used at
all. This module imports nothing, so the directory's migrations can name
:mod:`postvern.accounts.schema` without a cycle.
"""
