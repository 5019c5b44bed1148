"""Backups: encrypted snapshots, continuous replication, targets, verify, restore, import/export.

The package reads the store's files, never a user's key: mailbox files are copied as the
ciphertext they are, and an outer layer (:mod:`postvern.backup.objects`) encrypts every object
again under a per-snapshot key wrapped to an offline key pair and to the server key.
"""

from postvern.backup.catalog import BackupStatus, last_backup, last_verified_restore

# For ``postvern doctor``: "the last backup and the last verified restore".
__all__ = ["BackupStatus", "last_backup", "last_verified_restore"]
