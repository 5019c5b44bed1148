"""Anti-abuse: rate limits, built-in fail2ban-style bans, DNS blocklists and greylisting.

Listeners and the login path talk to one object, :class:`Abuse`; the modules behind it are
one concern each (``network`` keys, ``ratelimit`` counters, ``bans``, ``dnsbl``,
``greylist``, ``store`` and ``shared`` for where state lives).
"""

from postvern.abuse.bans import Ban, BanError, parse_duration, utc_text
from postvern.abuse.dnsbl import DNSBL, DNSBLConfigError, Listing
from postvern.abuse.greylist import GreylistPolicy
from postvern.abuse.network import AddressError
from postvern.abuse.personal import subject
from postvern.abuse.refusal import Reason, Refusal
from postvern.abuse.service import MX_SERVICES, Abuse

__all__ = [
    "DNSBL",
    "MX_SERVICES",
    "Abuse",
    "AddressError",
    "Ban",
    "BanError",
    "DNSBLConfigError",
    "GreylistPolicy",
    "Listing",
    "Reason",
    "Refusal",
    "parse_duration",
    "subject",
    "utc_text",
]
