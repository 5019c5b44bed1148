"""URLs in a message: found in text and HTML, parsed to the host a click would reach.

Phishing hides where a link goes: a user name before ``@``, a numeric or IDN host, link text
that names another site. This module finds URLs (bare, ``www.``, ``hxxp`` defanged, HTML
attributes), reduces each to its host and registrable domain (Public Suffix List), and
compares what a link shows with where it points.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from postvern.filters.htmlscan import Link

# URLs examined per message. Spam that carries more links gains nothing from the rest, and
# each URL costs a parse and lookups.
MAX_URLS = 500
# RFC 1035 §2.3.4: a name is at most 253 characters in text form; longer hosts are junk.
MAX_HOST_CHARS = 253

_TEXT_URL = re.compile(
    r"""(?ix)
    \b(?:(?:https?|hxxps?|h\*\*ps?|ftp)://|www\d{0,3}\.)   # a scheme, defanged or not, or www.
    [^\s<>"'`{}|\\^\[\]]{1,2000}                            # RFC 3986 characters, roughly
    """
)
# A domain-looking word as link text ("paypal.com", "https://www.paypal.com/signin").
_SHOWN_DOMAIN = re.compile(
    r"(?i)^(?:[a-z][a-z0-9+.-]*://)?((?:[\w-]{1,63}\.)+[a-z\u00a1-\uffff]{2,63})(?:[:/?#]\S*)?$"
)
_TRAILING_PUNCT = ".,;:!?)]}'\">"
_DEFANGED = {"hxxp": "http", "hxxps": "https", "h**p": "http", "h**ps": "https"}


@dataclass(frozen=True, slots=True)
class Url:
    """A URL reduced to what a click reaches."""

    raw: str
    scheme: str
    host: str  # lower-case ASCII (IDNA) form, no trailing dot
    path: str
    has_userinfo: bool = False  # "https://paypal.com@evil.example/" shows one host, opens another

    @property
    def is_ip(self) -> bool:
        return host_is_ip(self.host)

    @property
    def domain(self) -> str:
        """The registrable domain ("example.co.uk"), or the host when there is none."""
        return registrable_domain(self.host)


def parse_url(raw: str) -> Url | None:
    """Parse one URL; None when it has no usable host (mailto:, relative, garbage)."""
    text = raw.strip().strip(_TRAILING_PUNCT)
    lower = text[:6].lower()
    for fake, real in _DEFANGED.items():
        if lower.startswith(fake + ":"):
            text = real + text[len(fake) :]
            break
    if text[:4].lower() == "www." or re.match(r"(?i)www\d{0,3}\.", text):
        text = "http://" + text
    if text.startswith("//"):
        text = "http:" + text
    try:
        parts = urllib.parse.urlsplit(text)
        netloc = parts.netloc
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https", "ftp") or not netloc:
        return None
    userinfo, at, hostport = netloc.rpartition("@")
    host = _normalise_host(hostport)
    if not host:
        return None
    return Url(raw, parts.scheme.lower(), host, parts.path, has_userinfo=bool(at and userinfo))


def _normalise_host(hostport: str) -> str:
    host = urllib.parse.unquote(hostport)
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
        return host.lower()
    host = host.rpartition(":")[0] if host.count(":") == 1 else host
    # Browsers treat these as dots (WHATWG URL host parsing, IDNA UTS #46 mapping).
    host = host.replace("\u3002", ".").replace("\uff0e", ".").replace("\uff61", ".")
    host = host.strip(".").lower()
    if not host or len(host) > MAX_HOST_CHARS or any(c in host for c in " \t\r\n/\\"):
        return ""
    return to_ascii_host(host)


def to_ascii_host(host: str) -> str:
    """The IDNA (punycode) form of a host; unencodable labels are kept as they are."""
    if host.isascii():
        return host
    labels = []
    for label in host.split("."):
        try:
            labels.append(label.encode("idna").decode("ascii") if label else label)
        except UnicodeError:
            labels.append(label)
    return ".".join(labels)


def to_unicode_host(host: str) -> str:
    """The Unicode form of a host, decoding each ``xn--`` label that decodes."""
    if "xn--" not in host:
        return host
    labels = []
    for label in host.split("."):
        if label.startswith("xn--"):
            try:
                label = label.encode("ascii").decode("idna")
            except UnicodeError:
                pass
        labels.append(label)
    return ".".join(labels)


@functools.lru_cache(maxsize=8192)
def host_is_ip(host: str) -> bool:
    """True for dotted, bracketed, or the decimal/hex forms browsers accept (WHATWG URL)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return bool(re.fullmatch(r"(?:0x[0-9a-f]+|\d+)(?:\.(?:0x[0-9a-f]+|\d+)){0,3}", host))


@functools.lru_cache(maxsize=1)
def _psl() -> object:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


@functools.lru_cache(maxsize=8192)
def registrable_domain(host: str) -> str:
    """The registrable domain of *host* ("login.paypal.co.uk" → "paypal.co.uk")."""
    if not host or host_is_ip(host):
        return host
    try:
        domain = _psl().privatesuffix(host)  # type: ignore[attr-defined]
    except Exception:
        domain = None
    if domain:
        return str(domain)
    labels = host.split(".")
    return ".".join(labels[-2:])


def _may_hold_url(text: str) -> bool:
    """Whether *text* can hold a match of _TEXT_URL: every one has "://" or "www" in it.
    Most text has neither, and this costs a fraction of the pattern's scan."""
    return "://" in text or "www" in text.lower()


def find_text_urls(text: str) -> list[str]:
    """URLs written in plain text: with a scheme (also ``hxxp`` defanged) or ``www.``."""
    if not _may_hold_url(text):
        return []
    found = []
    for m in _TEXT_URL.finditer(text):
        found.append(m.group(0))
        if len(found) >= MAX_URLS:
            break
    return found


def strip_urls(text: str) -> str:
    """*text* with every URL that :func:`find_text_urls` would find replaced by a space."""
    return _TEXT_URL.sub(" ", text) if _may_hold_url(text) else text


def collect_urls(text: str, html_urls: list[str], html_text: str) -> list[Url]:
    """Every distinct URL of a message, HTML attributes first, then visible text."""
    seen: set[str] = set()
    urls: list[Url] = []
    for raw in [*html_urls, *find_text_urls(text), *find_text_urls(html_text)]:
        if raw in seen:
            continue
        seen.add(raw)
        url = parse_url(raw)
        if url is not None:
            urls.append(url)
            if len(urls) >= MAX_URLS:
                break
    return urls


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A link whose text names one domain while its href goes to another."""

    shown: str
    actual: str


def shown_domain(link_text: str) -> str:
    """The host a link's text claims ("www.paypal.com"), or "" when the text is not one."""
    text = link_text.strip().strip(_TRAILING_PUNCT)
    m = _SHOWN_DOMAIN.match(text)
    if m is None:
        return ""
    host = to_ascii_host(m.group(1).lower().strip("."))
    # "invoice.pdf" or "Mr.Smith" look like names but end in no public suffix.
    return host if has_public_suffix(host) else ""


@functools.lru_cache(maxsize=8192)
def has_public_suffix(host: str) -> bool:
    """True when *host* ends in a suffix the Public Suffix List knows and has a label more."""
    try:
        return _psl().privatesuffix(host, accept_unknown=False) is not None  # type: ignore[attr-defined]
    except Exception:
        return False


def link_mismatches(links: list[Link]) -> list[Mismatch]:
    """Links whose visible text is a domain other than the one the href opens."""
    found: list[Mismatch] = []
    for link in links:
        shown = shown_domain(link.text)
        if not shown or "." not in shown:
            continue
        target = parse_url(link.href)
        if target is None:
            continue
        shown_reg = registrable_domain(shown)
        if shown_reg != target.domain:
            found.append(Mismatch(shown=shown_reg, actual=target.domain))
    return found
