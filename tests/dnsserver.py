"""A real DNS server on 127.0.0.1 for tests, answering from zones held in memory.

It speaks DNS over UDP and TCP on one random free port (dnslib builds and parses the
packets) and behaves like the recursive resolver a mail server would use: it follows CNAME
chains, answers NXDOMAIN only for names with nothing at or below them (NODATA otherwise),
sets TC on UDP answers that do not fit so clients retry over TCP, and can be told to
SERVFAIL, REFUSE or stay silent (a timeout) for chosen names. Zones can be changed while
it runs; every query received is recorded.

Usage::

    from dnsserver import DNSTestServer          # or use the ``dns_server`` fixture

    with DNSTestServer() as server:
        server.add("example.org", "MX", (10, "mx.example.org"))
        server.add("mx.example.org", "A", "192.0.2.1")
        server.add("example.org", "TXT", "v=spf1 mx -all")
        server.add("sel._domainkey.example.org", "TXT", "v=DKIM1; k=rsa; p=" + "A" * 400)
        server.fail("slow.example.org", mode="timeout")
        resolver = server.resolver(timeout=0.5)  # a postvern.dns.Resolver using this server
        settings.dns.nameservers = [server.nameserver]  # "127.0.0.1:PORT" for the config

API of ``DNSTestServer(zones=None, zone_text=None)``:

* ``start()`` / ``stop()`` (also a context manager); ``address`` is ``("127.0.0.1", port)``,
  ``port`` the port, ``nameserver`` the ``"127.0.0.1:PORT"`` string for configuration.
* ``add(name, rtype, *values, ttl=0)`` adds records; ``set(name, rtype, *values, ttl=0)``
  replaces that type's records; ``remove(name, rtype=None)`` drops records; ``clear()``
  drops everything (zones, failures, query log).
* ``load(zones)`` adds a mapping ``{name: {rtype: value or [value, ...]}}`` (a list always
  means several records); ``load_zone_text(text, origin="")`` adds master-file text
  (RFC 1035 §5, parsed by dnslib; indentation is removed first).
* Values: A/AAAA ``"192.0.2.1"``; MX ``(10, "mx.example.org")`` (``"."`` for a null MX);
  TXT ``str`` or ``bytes`` (over 255 octets is split into several strings) or a tuple of
  strings for an explicit multi-string record; PTR/CNAME/NS a target name; SOA ``(mname,
  rname, serial, refresh, retry, expire, minimum)``; TLSA ``(usage, selector, mtype,
  data_bytes)``; SRV ``(priority, weight, port, target)``. Any other type: use zone text.
* Names are matched case-insensitively; Unicode names are stored as A-labels.
* ``fail(name, rtype=None, mode="servfail")`` makes queries for the name (one type or all)
  answer SERVFAIL, ``"refused"`` REFUSED or ``"timeout"`` nothing at all (over UDP and
  TCP); ``unfail(name, rtype=None)`` undoes it. A CNAME loop also answers SERVFAIL.
* ``authentic(name)`` marks the name's answers as DNSSEC-validated (AD bit, RFC 4035
  §3.2.3), as a validating resolver would; every other answer has AD clear.
* ``queries`` is the list of ``(name, rtype)`` received, names lower-case without the dot;
  ``tcp_queries`` those that came over TCP.
* ``resolver(timeout=1.0, cache_size=0)`` returns a ``postvern.dns.Resolver`` for it.
* ``dns_server`` (pytest fixture, function scope): a started server, stopped afterwards.
  To use it in a test module: ``dns_server = dnsserver.dns_server`` after ``import
  dnsserver`` (or have conftest.py import it once for every module).

TTLs default to 0 so that a test changing a zone never reads a stale cached answer; pass
``ttl=`` to test caching. Negative answers carry an SOA whose minimum is 0 for the same reason.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import textwrap
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    MX,
    NS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    TLSA,
    TXT,
    A,
    DNSRecord,
    ZoneParser,
)
from dnslib.dns import RD

from postvern.dns import Resolver

# Longest CNAME chain followed before answering SERVFAIL, as a resolver does on a loop.
MAX_CNAME_CHAIN = 8
# RFC 1035 §4.2.1: UDP answers without EDNS are limited to 512 octets.
UDP_DEFAULT_SIZE = 512
# How often the serving threads look at the stop flag.
POLL_INTERVAL = 0.1
# Bounded so a runaway test cannot grow the log without limit.
MAX_LOGGED_QUERIES = 100_000
FAIL_MODES = ("servfail", "refused", "timeout")

Key = tuple[bytes, ...]


def name_key(name: str | bytes) -> Key:
    """Lower-case labels of a name, the form zones and queries are compared in."""
    if isinstance(name, str):
        text = name if name.isascii() else name.encode("idna").decode("ascii")
        raw = text.encode("ascii")
    else:
        raw = name
    raw = raw.rstrip(b".")
    return tuple(label.lower() for label in raw.split(b".")) if raw else ()


def _txt_strings(value: Any) -> list[bytes]:
    if isinstance(value, tuple):
        return [v.encode() if isinstance(v, str) else bytes(v) for v in value]
    data = value.encode() if isinstance(value, str) else bytes(value)
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


def make_rdata(rtype: str, value: Any) -> RD:
    """dnslib record data from the plain Python forms documented above."""
    rtype = rtype.upper()
    if isinstance(value, RD):
        return value
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        preference, host = value.split(None, 1) if isinstance(value, str) else value
        return MX(host or ".", int(preference))
    if rtype == "TXT":
        return TXT(_txt_strings(value))
    if rtype in ("PTR", "CNAME", "NS"):
        return {"PTR": PTR, "CNAME": CNAME, "NS": NS}[rtype](value)
    if rtype == "SOA":
        mname, rname, *times = value
        return SOA(mname, rname, tuple(int(t) for t in times))
    if rtype == "TLSA":
        usage, selector, mtype, data = value
        return TLSA(usage, selector, mtype, data)
    if rtype == "SRV":
        priority, weight, port, target = value
        return SRV(priority, weight, port, target)
    raise ValueError(f"no Python form for {rtype}; use load_zone_text()")


class DNSTestServer:
    """See the module docstring."""

    def __init__(
        self, zones: Mapping[str, Mapping[str, Any]] | None = None, zone_text: str | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._records: dict[Key, dict[str, list[tuple[int, RD]]]] = {}
        self._failures: dict[tuple[Key, str | None], str] = {}
        self._authentic: set[Key] = set()
        self._queries: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=MAX_LOGGED_QUERIES
        )
        self._tcp_queries: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=MAX_LOGGED_QUERIES
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self.port = 0
        if zones:
            self.load(zones)
        if zone_text:
            self.load_zone_text(zone_text)

    # -- zone data -------------------------------------------------------------------

    def add(self, name: str, rtype: str, *values: Any, ttl: int = 0) -> None:
        with self._lock:
            rrsets = self._records.setdefault(name_key(name), {})
            rrsets.setdefault(rtype.upper(), []).extend((ttl, make_rdata(rtype, v)) for v in values)

    def set(self, name: str, rtype: str, *values: Any, ttl: int = 0) -> None:
        self.remove(name, rtype)
        self.add(name, rtype, *values, ttl=ttl)

    def remove(self, name: str, rtype: str | None = None) -> None:
        key = name_key(name)
        with self._lock:
            if rtype is None:
                self._records.pop(key, None)
            elif key in self._records:
                self._records[key].pop(rtype.upper(), None)
                if not self._records[key]:
                    del self._records[key]

    def load(self, zones: Mapping[str, Mapping[str, Any]]) -> None:
        """Add ``{name: {rtype: value or [value, ...]}}``; a list always means several records."""
        for name, rrsets in zones.items():
            for rtype, values in rrsets.items():
                self.add(name, rtype, *(values if isinstance(values, list) else [values]))

    def load_zone_text(self, text: str, origin: str = "") -> None:
        for rr in ZoneParser(textwrap.dedent(text).strip() + "\n", origin=origin):
            rtype = QTYPE.get(rr.rtype)
            self.add(str(rr.rname), rtype, rr.rdata, ttl=rr.ttl)

    def fail(self, name: str, rtype: str | None = None, mode: str = "servfail") -> None:
        if mode not in FAIL_MODES:
            raise ValueError(f"mode must be one of {FAIL_MODES}")
        with self._lock:
            self._failures[(name_key(name), rtype.upper() if rtype else None)] = mode

    def authentic(self, name: str) -> None:
        with self._lock:
            self._authentic.add(name_key(name))

    def unfail(self, name: str, rtype: str | None = None) -> None:
        with self._lock:
            self._failures.pop((name_key(name), rtype.upper() if rtype else None), None)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._failures.clear()
            self._authentic.clear()
            self._queries.clear()
            self._tcp_queries.clear()

    @property
    def queries(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._queries)

    @property
    def tcp_queries(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._tcp_queries)

    # -- answering -------------------------------------------------------------------

    def _failure(self, key: Key, rtype: str) -> str | None:
        return self._failures.get((key, rtype)) or self._failures.get((key, None))

    def _exists(self, key: Key) -> bool:
        if key in self._records:
            return True
        depth = len(key)
        return any(len(k) > depth and k[-depth:] == key for k in self._records)

    def answer(self, request: DNSRecord, *, tcp: bool = False) -> DNSRecord | None:
        """The reply to one query, or None to stay silent (a simulated timeout)."""
        reply = request.reply(ra=1, aa=0)
        reply.header.ad = 0  # dnslib copies the query's flags; AD is ours to set
        if len(request.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return reply
        question = request.q
        qtype = QTYPE.get(question.qtype)
        key = name_key(bytes(b".".join(question.qname.label)))
        with self._lock:
            reply.header.ad = int(key in self._authentic)
            logged = (b".".join(key).decode("ascii", "replace"), str(qtype))
            self._queries.append(logged)
            if tcp:
                self._tcp_queries.append(logged)
            return self._resolve(reply, key, str(qtype))

    def _resolve(self, reply: DNSRecord, key: Key, qtype: str) -> DNSRecord | None:
        owner = reply.q.qname
        for _ in range(MAX_CNAME_CHAIN):
            mode = self._failure(key, qtype)
            if mode == "timeout":
                return None
            if mode is not None:
                reply.header.rcode = RCODE.SERVFAIL if mode == "servfail" else RCODE.REFUSED
                return reply
            rrsets = self._records.get(key, {})
            if qtype in rrsets or (qtype == "ANY" and rrsets):
                for rtype, records in rrsets.items():
                    if rtype == qtype or qtype == "ANY":
                        for ttl, rdata in records:
                            reply.add_answer(RR(owner, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
                return reply
            if "CNAME" in rrsets:
                ttl, target = rrsets["CNAME"][0]
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=target, ttl=ttl))
                owner = target.label
                key = name_key(bytes(b".".join(target.label.label)))
                continue
            if not self._exists(key):
                reply.header.rcode = RCODE.NXDOMAIN
            # RFC 2308 §3: a negative answer carries the SOA whose minimum is its TTL.
            soa = SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, 0))
            reply.add_auth(RR(owner, QTYPE.SOA, rdata=soa, ttl=0))
            return reply
        reply.header.rcode = RCODE.SERVFAIL
        return reply

    def _handle(self, data: bytes, udp: bool) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        reply = self.answer(request, tcp=not udp)
        if reply is None:
            return None
        packed = reply.pack()
        if udp:
            limit = UDP_DEFAULT_SIZE
            for rr in request.ar:
                if isinstance(rr, EDNS0) or rr.rtype == QTYPE.OPT:
                    limit = max(UDP_DEFAULT_SIZE, rr.rclass)
            if len(packed) > limit:
                truncated = request.reply(ra=1, aa=0)
                truncated.header.tc = 1
                packed = truncated.pack()
        return packed

    # -- serving ---------------------------------------------------------------------

    def start(self) -> DNSTestServer:
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise RuntimeError("no free port for both UDP and TCP")
        tcp.listen(64)
        udp.settimeout(POLL_INTERVAL)
        tcp.settimeout(POLL_INTERVAL)
        self._udp, self._tcp, self.port = udp, tcp, port
        self._stop.clear()
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, name=f"dns-{port}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        # Wake both serving threads now rather than at their next poll.
        with contextlib.suppress(OSError):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
                waker.sendto(b"", self.address)
        with contextlib.suppress(OSError):
            socket.create_connection(self.address, timeout=1).close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    def __enter__(self) -> DNSTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def resolver(self, timeout: float = 1.0, cache_size: int = 0) -> Resolver:
        return Resolver([self.address], timeout=timeout, cache_size=cache_size)

    def _serve_udp(self) -> None:
        assert self._udp is not None
        sock = self._udp
        while not self._stop.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            response = self._handle(data, udp=True)
            if response is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(response, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            thread = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True)
            thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        conn.settimeout(POLL_INTERVAL)
        with conn:
            buffer = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                # RFC 1035 §4.2.2: each message is preceded by its two-octet length.
                while len(buffer) >= 2:
                    (length,) = struct.unpack("!H", buffer[:2])
                    if len(buffer) < 2 + length:
                        break
                    message, buffer = buffer[2 : 2 + length], buffer[2 + length :]
                    response = self._handle(message, udp=False)
                    if response is not None:
                        with contextlib.suppress(OSError):
                            conn.sendall(struct.pack("!H", len(response)) + response)


@pytest.fixture
def dns_server() -> Iterator[DNSTestServer]:
    """A started DNSTestServer with empty zones, stopped after the test."""
    with DNSTestServer() as server:
        yield server
