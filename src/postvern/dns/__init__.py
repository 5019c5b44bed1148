"""DNS for the mail server: an asyncio stub resolver with a bounded TTL cache.

Everything that asks DNS (email authentication, MX selection, MTA-STS, DNSBLs) goes through
one ``Resolver``, which is configured from ``[dns]`` in the settings so tests can point it
at a loopback server.
"""

from postvern.dns.resolver import (
    Answer,
    DNSError,
    DNSNameError,
    DNSTempError,
    DNSTimeout,
    Resolver,
    TLSAAnswer,
    TLSARecord,
)

__all__ = [
    "Answer",
    "DNSError",
    "DNSNameError",
    "DNSTempError",
    "DNSTimeout",
    "Resolver",
    "TLSAAnswer",
    "TLSARecord",
]
