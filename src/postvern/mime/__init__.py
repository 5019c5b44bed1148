"""MIME parsing: the structure IMAP describes, section extraction, text for search."""
