"""IMAP4rev2 (RFC 9051) and IMAP4rev1 (RFC 3501): a sans-I/O protocol core and its session.

The core (:mod:`.protocol`, :mod:`.parser`, :mod:`.grammar`, :mod:`.serialize`) turns bytes into
typed commands and typed responses back into bytes; it never touches a socket or a mailbox.
"""
