"""The inbound pipeline's e2e stage: each local copy, encrypted to its user's key if they chose.

Called for every per-user copy after the trace headers are added and before the copy is
stored or sealed to the spool, so the store never sees the plaintext of a user who turned
encryption on. Synchronous and CPU-bound: the pipeline runs it in its worker pool.
"""

from __future__ import annotations

import logging

from postvern.directory.db import Directory, User
from postvern.e2e import openpgp, smime
from postvern.e2e.keys import Format, KeyStore
from postvern.e2e.protect import already_encrypted

log = logging.getLogger(__name__)


class EncryptionFailed(Exception):
    """The user's key could not be encrypted to; the copy is not stored in the clear."""


def protect_copy(directory: Directory, user: User, raw: bytes) -> bytes:
    """``raw`` as it should be stored for ``user``: encrypted to their key when they turned
    encryption on, unless it is encrypted already (never wrapped twice).

    Fails closed: if encryption was asked for and cannot be done, :class:`EncryptionFailed`
    is raised and the pipeline answers 451, so nothing is stored readable and the sender
    retries (the administrator sees why in the log, without the key or the message).
    """
    keys = KeyStore(directory).get(user.id)
    if keys is None or keys.encrypt is None or already_encrypted(raw):
        return raw
    try:
        if keys.encrypt is Format.OPENPGP and keys.openpgp is not None:
            return openpgp.encrypt_message(raw, keys.openpgp, keys.subject)
        if keys.encrypt is Format.SMIME and keys.smime is not None:
            return smime.encrypt_message(raw, keys.smime, keys.subject)
    except Exception:
        log.warning(
            "could not encrypt a copy to a user's %s key: see `postvern user key show`",
            keys.encrypt.value,
        )
        raise EncryptionFailed(keys.encrypt.value) from None
    raise EncryptionFailed(keys.encrypt.value)
