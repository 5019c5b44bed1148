"""The accounts tables, created in the directory database by its migration 6.

They sit beside the users and key slots they belong to (every row goes with its user, ON
DELETE CASCADE) and share the directory's encryption. A shipped migration never changes:
later changes get a migration of their own.
"""

from __future__ import annotations

import apsw

V6 = """
-- TOTP (RFC 6238): the shared secret sealed again under its own server subkey (totp.py),
-- whether enrolment finished, and the last time step used (a code is never accepted twice).
CREATE TABLE totp(
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    secret BLOB NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 0,
    last_step INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL
);
-- Single-use recovery codes for a lost second factor, as keyed hashes.
CREATE TABLE recovery_codes(
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    digest BLOB NOT NULL UNIQUE,
    created INTEGER NOT NULL
);
-- WebAuthn credentials. prf_salt is set when the passkey is also a key slot (kind
-- 'passkey', label = the credential id in base64url): its PRF output wraps the mailbox key.
CREATE TABLE passkeys(
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    credential_id BLOB NOT NULL UNIQUE,
    public_key BLOB NOT NULL,
    sign_count INTEGER NOT NULL,
    name TEXT NOT NULL,
    prf_salt BLOB,
    created INTEGER NOT NULL,
    last_used INTEGER
);
-- Scoped API tokens, as keyed hashes.
CREATE TABLE api_tokens(
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    digest BLOB NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    created INTEGER NOT NULL,
    last_used INTEGER,
    UNIQUE(user_id, name)
);
-- What the portal needs per user: the admin role, a disabled flag, the Junk threshold.
CREATE TABLE account_settings(
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL DEFAULT 'user' CHECK(role IN ('user', 'admin')),
    disabled INTEGER NOT NULL DEFAULT 0,
    junk_threshold REAL
);
-- The user's own allow and block lists of senders and domains.
CREATE TABLE sender_lists(
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK(kind IN ('allow', 'block')),
    entry TEXT NOT NULL,
    PRIMARY KEY(user_id, kind, entry)
);
-- Recent logins: the client's network only (a /24 or /48), never its address.
CREATE TABLE login_history(
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    at INTEGER NOT NULL,
    network TEXT NOT NULL,
    method TEXT NOT NULL
);
CREATE INDEX login_history_user ON login_history(user_id, at);
-- One-time invitation links: the invited user sets their own password.
CREATE TABLE invitations(
    digest BLOB PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    quota INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
-- Key slots gain the kind 'passkey' (SQLite cannot alter a CHECK: the table is rebuilt).
CREATE TABLE keyslots_v6(
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK(kind IN ('password', 'app', 'recovery', 'passkey')),
    label TEXT,
    tag BLOB,
    salt BLOB NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    params TEXT NOT NULL,
    created INTEGER NOT NULL,
    last_used INTEGER
);
INSERT INTO keyslots_v6 SELECT id, user_id, kind, label, tag, salt, nonce, ciphertext, params,
    created, last_used FROM keyslots;
DROP TABLE keyslots;
ALTER TABLE keyslots_v6 RENAME TO keyslots;
CREATE INDEX keyslots_user ON keyslots(user_id, kind);
CREATE UNIQUE INDEX keyslots_tag ON keyslots(tag) WHERE tag IS NOT NULL;
"""


def migrate_v6(conn: apsw.Connection) -> None:
    conn.execute(V6)
