"""Every DNS record a mail domain needs, ready to paste into a zone file.

MX, SPF, both DKIM selectors per key (RFC 8463 dual signing), DMARC, MTA-STS (RFC 8461) and
TLS-RPT (RFC 8460), SRV records for client autodiscovery (RFC 6186, RFC 8314) from the same
table as the autoconfig, Autodiscover and Apple profile documents, and their hosts. Long
TXT values are split into 255-octet strings (RFC 7208 §3.3).
"""

from __future__ import annotations

from collections.abc import Sequence

from postvern.directory.db import DKIMKey
from postvern.e2e import wkd
from postvern.emailauth import dkim
from postvern.web.clientservers import OFFERS, ClientServer

TXT_CHUNK = 255


def _txt(value: str) -> str:
    chunks = [value[i : i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)]
    return " ".join(f'"{c}"' for c in chunks)


def records(
    domain: str,
    hostname: str,
    keys: list[DKIMKey],
    sts_policy_id: str,
    servers: Sequence[ClientServer],
) -> str:
    d, h = f"{domain}.", f"{hostname}."
    lines = [
        f"; DNS records for {domain} (mail server {hostname})",
        f"{d}\tIN MX 10 {h}",
        f'{d}\tIN TXT "v=spf1 mx -all"',
    ]
    for key in keys:
        note = "" if key.active else "   ; retired: keep until mail signed with it has aged out"
        lines.append(
            f"{key.selector}._domainkey.{d}\tIN TXT {_txt(dkim.key_record(key.private_key))}{note}"
        )
    lines += [
        # Start at quarantine with strict alignment; move to p=reject once reports are clean.
        f'_dmarc.{d}\tIN TXT "v=DMARC1; p=quarantine; adkim=s; aspf=s;'
        f' rua=mailto:postmaster@{domain}"',
        f'_mta-sts.{d}\tIN TXT "v=STSv1; id={sts_policy_id}"',
        f"mta-sts.{d}\tIN CNAME {h}",
        f'_smtp._tls.{d}\tIN TXT "v=TLSRPTv1; rua=mailto:postmaster@{domain}"',
    ]
    lines += [f"{s.srv_name}.{d}\tIN SRV 0 1 {s.port} {s.host}." for s in servers]
    offered = {s.listener for s in servers}
    # RFC 2782: a target of "." means the service is decidedly not available at this domain.
    lines += [f"_{name}._tcp.{d}\tIN SRV 0 0 0 ." for name, _, _ in OFFERS if name not in offered]
    lines += [
        f"autoconfig.{d}\tIN CNAME {h}",
        f"autodiscover.{d}\tIN CNAME {h}",
        *wkd.dns_records(d, h),
        f"; and for {hostname}: A/AAAA records, and a PTR record for each of its addresses"
        f" naming {hostname}",
    ]
    return "\n".join(lines) + "\n"
