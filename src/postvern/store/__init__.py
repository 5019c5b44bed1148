"""The encrypted mailbox store: one SQLite file per user, the sealed spool, the change feed."""
