"""Key material: the server key, key slots that wrap mailbox keys, the sealed spool, TLS."""
