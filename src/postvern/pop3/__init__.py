"""POP3 (RFC 1939) with CAPA, STLS and SASL PLAIN: a sans-I/O protocol core and its session.

The core (:mod:`.protocol`) turns bytes into events and answers into bytes; it never touches a
socket or a mailbox. :mod:`.session` runs one connection on asyncio against the store, and
:mod:`.server` opens the listener.
"""
