"""``postvern doctor``: check a live installation and say exactly what is wrong.

Each check looks at the real thing — the DNS records as the configured resolver sees them,
the certificate file, a connection to each listener, the data directory on disk, the
kernel's settings, clamd and Redis — and gives one :class:`Result` per fact, ``ok``, ``warn``
(works, but should be looked at) or ``FAIL``. The command exits non-zero when any check
fails. Expected DNS records are what ``postvern dns`` prints (:mod:`postvern.ops.dnsrecords`),
read back from its zone-file text, so the two can never disagree.

Kernel state is read from files under ``root`` (``/proc/sys``, ``/proc/swaps``,
``/sys/kernel/mm``), so a container's or a test's view can be given; the clock's state comes
from adjtimex(2), as ``timedatectl`` reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import enum
import os
import re
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509 import verification

from postvern import config
from postvern.app import App
from postvern.backup import BackupStatus, last_backup, last_verified_restore
from postvern.crypto import tls
from postvern.dns import Resolver
from postvern.dns.resolver import DNSError
from postvern.e2e.keys import KeyStore
from postvern.filters.clamd import ClamdClient, ClamdError
from postvern.mta import QUEUE_FILE, QueueStore
from postvern.ops import dnsrecords
from postvern.web import clientservers, mtasts

# A listener, clamd or Redis that is up answers in milliseconds; one that has not answered by
# then is as good as down for a client.
PROBE_SECONDS = 5.0
# Listeners whose clients start TLS at once (RFC 8314 §3.3, RFC 8314 §3.2, HTTPS).
IMPLICIT_TLS = frozenset({"submissions", "imaps", "pop3s", "https"})
# What each protocol's greeting starts with, and how to leave politely afterwards, so the
# probe is a complete exchange and never looks like a scan (abuse/portscan.py).
GREETING = {"smtp": b"220", "imap": b"* OK", "pop3": b"+OK"}
GOODBYE = {"smtp": b"QUIT\r\n", "imap": b"a LOGOUT\r\n", "pop3": b"QUIT\r\n"}
# Listener names map to their protocol by prefix.
PROTOCOL = {
    "smtp": "smtp",
    "submission": "smtp",
    "submissions": "smtp",
    "imap": "imap",
    "imaps": "imap",
    "pop3": "pop3",
    "pop3s": "pop3",
}
# Below this many days a certificate is a warning (the server's daily log line starts too).
CERTIFICATE_WARN_DAYS = tls.EXPIRY_WARNING_DAYS
# Where Debian keeps the system's trusted CAs (ca-certificates).
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Offending paths named in one data-directory line; the rest are counted.
SHOWN_PATHS = 3
# adjtimex(2): the return value TIME_ERROR means the kernel clock is not synchronised
# (STA_UNSYNC set, as ntpd, chrony and systemd-timesyncd leave it until they have a source).
TIME_ERROR = 5
# struct timex is 208 bytes on 64-bit Linux; a larger zeroed buffer is safe (modes = 0 reads).
TIMEX_BUFFER = 512
# A core_pattern piping to one of these writes no core file anywhere.
CORE_SINKS = ("|/bin/false", "|/usr/bin/false", "|/bin/true", "|/usr/bin/true")


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"  # works, but should be looked at
    FAIL = "FAIL"  # broken, or unsafe: the command exits non-zero
    SKIP = "skip"  # not applicable here (not configured, not available yet)


@dataclass(frozen=True, slots=True)
class Result:
    check: str
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status.value:<5} {self.check:<28} {self.detail}"

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "detail": self.detail}


def failed(results: Iterable[Result]) -> bool:
    return any(r.status is Status.FAIL for r in results)


# -- DNS -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    name: str  # lower case, no trailing dot
    rtype: str
    value: str  # TXT strings joined


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def expected_records(text: str) -> list[Record]:
    """The records of ``postvern dns`` output (its zone-file lines), comments dropped."""
    found = []
    for line in text.splitlines():
        if not line or line.startswith(";"):
            continue
        name, _, rest = line.partition("\t")
        _, rtype, value = rest.split(None, 2)
        # A TXT value is its quoted strings, concatenated (RFC 7208 §3.3); a comment may follow.
        value = "".join(_QUOTED.findall(value)) if rtype == "TXT" else value.split(";", 1)[0]
        found.append(Record(name.rstrip(".").lower(), rtype, value.strip()))
    return found


def _tags(record: str) -> dict[str, str]:
    """Tag=value pairs of a DKIM, DMARC, MTA-STS or TLS-RPT record, whitespace removed."""
    tags = {}
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = re.sub(r"\s+", "", value)
    return tags


class DNSChecks:
    def __init__(self, resolver: Resolver, app: App, domain: str) -> None:
        self.resolver = resolver
        self.app = app
        self.domain = domain
        s = app.settings
        policy = mtasts.policy_text([s.hostname], s.mta.sts_mode)
        self.sts_id = mtasts.policy_id(policy)
        self.hostname = s.hostname.lower().rstrip(".")
        self.keys = app.directory.dkim_keys(domain)
        text = dnsrecords.records(
            domain, s.hostname, self.keys, self.sts_id, clientservers.client_servers(s)
        )
        self.expected = expected_records(text)

    def _result(self, what: str, status: Status, detail: str) -> Result:
        return Result(f"dns {self.domain} {what}", status, detail)

    async def _txt(self, name: str, prefix: str) -> list[str]:
        values = [b.decode("utf-8", "replace") for b in await self.resolver.txt(name)]
        return [v for v in values if v.lower().startswith(prefix.lower())]

    async def run(self) -> list[Result]:
        out: list[Result] = []
        for check in (self.mx, self.spf, self.dkim, self.dmarc, self.mta_sts, self.tls_rpt):
            try:
                out += await check()
            except DNSError as e:
                out.append(self._result(check.__name__, Status.FAIL, f"lookup failed: {e}"))
        if KeyStore(self.app.directory).published(self.domain):
            out += await self._host_resolves("wkd", f"openpgpkey.{self.domain}")
        return out

    async def mx(self) -> list[Result]:
        hosts = [(p, h.lower().rstrip(".")) for p, h in await self.resolver.mx(self.domain)]
        if any(h == self.hostname for _, h in hosts):
            return [self._result("MX", Status.OK, f"points at {self.hostname}")]
        seen = ", ".join(f"{p} {h}" for p, h in hosts) or "none"
        return [self._result("MX", Status.FAIL, f"published: {seen}; expected 10 {self.hostname}.")]

    async def spf(self) -> list[Result]:
        want = next(r.value for r in self.expected if r.rtype == "TXT" and r.name == self.domain)
        found = await self._txt(self.domain, "v=spf1 ")
        if not found:
            return [self._result("SPF", Status.FAIL, f'no SPF record; publish "{want}"')]
        if len(found) > 1:
            # RFC 7208 §4.5: more than one record is a permanent error for every receiver.
            return [self._result("SPF", Status.FAIL, f"{len(found)} SPF records; keep one")]
        if found[0].split() != want.split():
            return [self._result("SPF", Status.WARN, f'"{found[0]}" differs from "{want}"')]
        return [self._result("SPF", Status.OK, found[0])]

    async def dkim(self) -> list[Result]:
        out = []
        for key in self.keys:
            name = f"{key.selector}._domainkey.{self.domain}"
            want = next(r.value for r in self.expected if r.name == name)
            found = await self._txt(name, "v=DKIM1")
            what = f"DKIM {key.selector}"
            if not found:
                out.append(self._result(what, Status.FAIL, f"no key record at {name}"))
            elif _tags(found[0]).get("p") != _tags(want).get("p"):
                out.append(self._result(what, Status.FAIL, f"{name} publishes another key"))
            else:
                state = "signing" if key.active else "retired, still published"
                out.append(self._result(what, Status.OK, f"{key.algorithm} key ({state})"))
        return out

    async def dmarc(self) -> list[Result]:
        found = await self._txt(f"_dmarc.{self.domain}", "v=DMARC1")
        if not found:
            return [self._result("DMARC", Status.FAIL, f"no record at _dmarc.{self.domain}")]
        return [self._result("DMARC", Status.OK, f"p={_tags(found[0]).get('p', '?')}")]

    async def mta_sts(self) -> list[Result]:
        found = await self._txt(f"_mta-sts.{self.domain}", "v=STSv1")
        if not found:
            return [self._result("MTA-STS", Status.FAIL, f"no record at _mta-sts.{self.domain}")]
        published = _tags(found[0]).get("id", "")
        if published != self.sts_id:
            # RFC 8461 §3.1: senders refetch the policy only when the id changes.
            return [
                self._result(
                    "MTA-STS",
                    Status.FAIL,
                    f"id={published} but the policy served has id={self.sts_id}",
                )
            ]
        out = [self._result("MTA-STS", Status.OK, f"id={published}")]
        return out + await self._host_resolves("MTA-STS host", f"mta-sts.{self.domain}")

    async def tls_rpt(self) -> list[Result]:
        found = await self._txt(f"_smtp._tls.{self.domain}", "v=TLSRPTv1")
        if not found:
            return [self._result("TLS-RPT", Status.FAIL, f"no record at _smtp._tls.{self.domain}")]
        return [self._result("TLS-RPT", Status.OK, _tags(found[0]).get("rua", "?"))]

    async def _host_resolves(self, what: str, name: str) -> list[Result]:
        if await self.resolver.a(name) or await self.resolver.aaaa(name):
            return [self._result(what, Status.OK, f"{name} resolves")]
        return [
            self._result(what, Status.FAIL, f"{name} has no address (CNAME to {self.hostname})")
        ]


# -- TLS -----------------------------------------------------------------------------------


def check_certificate(settings: config.Settings, alert_days: int) -> list[Result]:
    path = settings.path(settings.tls.cert)
    try:
        chain = x509.load_pem_x509_certificates(path.read_bytes())
        info = tls.read_certificate(path)
    except (OSError, ValueError, tls.TLSConfigError) as e:
        return [Result("tls certificate", Status.FAIL, f"cannot read {path}: {e}")]
    out = []
    days = info.days_left()
    if days < 0:
        out.append(Result("tls expiry", Status.FAIL, f"expired on {info.expires}"))
    elif days < alert_days:
        out.append(Result("tls expiry", Status.FAIL, f"{days} days left ({info.expires}): renew"))
    elif days < CERTIFICATE_WARN_DAYS:
        out.append(Result("tls expiry", Status.WARN, f"{days} days left ({info.expires})"))
    else:
        out.append(Result("tls expiry", Status.OK, f"{days} days left ({info.expires})"))
    hostname = settings.hostname.lower().rstrip(".")
    if any(_name_matches(n, hostname) for n in info.names):
        out.append(Result("tls names", Status.OK, ", ".join(info.names)))
    else:
        out.append(
            Result("tls names", Status.FAIL, f"{', '.join(info.names)}: {hostname} not among them")
        )
    leaf = chain[0]
    if leaf.issuer == leaf.subject:
        detail = "self-signed: senders enforcing MTA-STS and most clients will not trust it"
        out.append(Result("tls chain", Status.WARN, detail))
        return out
    bundle = settings.path(settings.tls.ca_bundle) if settings.tls.ca_bundle else SYSTEM_CA_BUNDLE
    try:
        store = verification.Store(x509.load_pem_x509_certificates(bundle.read_bytes()))
        verifier = (
            verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName(hostname))
        )
        verifier.verify(leaf, chain[1:])
    except (OSError, ValueError, verification.VerificationError) as e:
        out.append(Result("tls chain", Status.FAIL, f"does not verify: {e}"))
    else:
        out.append(Result("tls chain", Status.OK, f"verifies to a CA in {bundle}"))
    return out


def _name_matches(pattern: str, hostname: str) -> bool:
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):  # RFC 6125 §6.4.3: the wildcard covers one label
        return hostname.partition(".")[2] == pattern[2:]
    return pattern == hostname


# -- listeners -----------------------------------------------------------------------------


async def probe_listener(name: str, address: str, hostname: str) -> Result:
    host, port = config.parse_hostport(address)
    # Not a bind: a listener on all addresses is probed through loopback.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104  # nosec B104
    context = None
    if name in IMPLICIT_TLS:
        context = ssl.create_default_context()
        context.check_hostname = False  # the certificate is checked on its own, above
        context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=hostname if context else None
            )
            try:
                if name == "https":
                    writer.write(
                        f"GET /healthz HTTP/1.1\r\nHost: {hostname}\r\n"
                        "Connection: close\r\n\r\n".encode()
                    )
                    first = await reader.readline()
                    ok = first.split(b" ")[1:2] == [b"200"]
                else:
                    first = await reader.readline()
                    ok = first.startswith(GREETING[PROTOCOL[name]])
                    writer.write(GOODBYE[PROTOCOL[name]])
                    with contextlib.suppress(OSError):
                        await writer.drain()
                        await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        return Result(
            f"listener {name}", Status.FAIL, f"{address}: no answer in {PROBE_SECONDS:g} s"
        )
    except (OSError, ssl.SSLError) as e:
        return Result(f"listener {name}", Status.FAIL, f"{address}: {e.strerror or e}")
    if not ok:
        said = first[:60].decode("ascii", "replace").strip()
        return Result(f"listener {name}", Status.FAIL, f"{address}: unexpected answer {said!r}")
    return Result(f"listener {name}", Status.OK, f"{address} answers")


# -- the data directory --------------------------------------------------------------------


def check_data_dir(data_dir: Path) -> list[Result]:
    """Everything under the data directory belongs to its owner and to nobody else."""
    try:
        owner = data_dir.stat().st_uid
    except OSError as e:
        return [Result("data directory", Status.FAIL, f"{data_dir}: {e.strerror}")]
    foreign: list[str] = []
    open_modes: list[str] = []
    count = 0
    for top, dirs, files in os.walk(data_dir):
        for entry in [top, *(os.path.join(top, f) for f in files)]:
            if entry != top and entry in dirs:
                continue
            try:
                st = os.lstat(entry)
            except OSError:
                continue  # removed while we walked (a spool file imported)
            if stat.S_ISLNK(st.st_mode):
                continue
            count += 1
            if st.st_uid != owner:
                foreign.append(entry)
            if st.st_mode & 0o077:
                open_modes.append(f"{entry} ({stat.S_IMODE(st.st_mode):04o})")
    out = []
    if foreign:
        out.append(
            Result("data ownership", Status.FAIL, _some(foreign, f"not owned by uid {owner}"))
        )
    else:
        out.append(Result("data ownership", Status.OK, f"{count} entries owned by uid {owner}"))
    if open_modes:
        out.append(Result("data modes", Status.FAIL, _some(open_modes, "open to group or others")))
    else:
        out.append(Result("data modes", Status.OK, "nothing open to group or others"))
    return out


def _some(items: list[str], what: str) -> str:
    shown = ", ".join(items[:SHOWN_PATHS])
    more = f" and {len(items) - SHOWN_PATHS} more" if len(items) > SHOWN_PATHS else ""
    return f"{what}: {shown}{more}"


def check_disk(data_dir: Path, min_percent: float) -> Result:
    st = os.statvfs(data_dir)
    percent = 100.0 * st.f_bavail / st.f_blocks if st.f_blocks else 0.0
    free = st.f_bavail * st.f_frsize / 2**30
    detail = f"{percent:.1f}% free ({free:.1f} GiB) on the data directory's file system"
    if percent < min_percent:
        return Result("disk", Status.FAIL, f"{detail}, under {min_percent:g}%")
    return Result("disk", Status.OK, detail)


# -- the host ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """The kernel's settings as files under ``root`` (``/`` on the host itself)."""

    root: Path = Path("/")

    def read(self, relative: str) -> str | None:
        try:
            return (self.root / relative).read_text().strip()
        except OSError:
            return None

    def core_dumps(self) -> Result:
        pattern = self.read("proc/sys/kernel/core_pattern")
        suid = self.read("proc/sys/fs/suid_dumpable")
        problems = []
        if pattern is None or not pattern.startswith(CORE_SINKS):
            problems.append(f"kernel.core_pattern = {pattern!r} writes core files")
        if suid not in ("0", None):
            problems.append(f"fs.suid_dumpable = {suid}")
        if problems:
            return Result("core dumps", Status.FAIL, "; ".join(problems))
        return Result("core dumps", Status.OK, f"off (kernel.core_pattern = {pattern})")

    def swap(self) -> Result:
        text = self.read("proc/swaps")
        if text is None:
            return Result("swap", Status.SKIP, "no /proc/swaps")
        devices = [line.split()[0] for line in text.splitlines()[1:] if line.strip()]
        plain = [d for d in devices if not self._encrypted(d)]
        if plain:
            return Result("swap", Status.FAIL, f"unencrypted swap in use: {', '.join(plain)}")
        if devices:
            return Result("swap", Status.OK, f"encrypted only: {', '.join(devices)}")
        return Result("swap", Status.OK, "off")

    def _encrypted(self, device: str) -> bool:
        """A dm-crypt device: its device-mapper UUID starts with CRYPT- (cryptsetup)."""
        try:
            real = os.path.realpath(self.root / device.lstrip("/"))
        except OSError:
            return False
        uuid = self.read(f"sys/block/{os.path.basename(real)}/dm/uuid")
        return uuid is not None and uuid.startswith("CRYPT-")

    def transparent_huge_pages(self) -> Result:
        text = self.read("sys/kernel/mm/transparent_hugepage/enabled")
        if text is None:
            return Result("transparent huge pages", Status.SKIP, "not in this kernel")
        if "[never]" in text:
            return Result("transparent huge pages", Status.OK, "never")
        return Result("transparent huge pages", Status.FAIL, f"{text} (want [never])")


def check_clock() -> Result:
    """The kernel's own view of synchronisation (adjtimex(2), read-only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        state = libc.adjtimex(ctypes.create_string_buffer(TIMEX_BUFFER))
    except (OSError, AttributeError):
        return Result("clock", Status.SKIP, "adjtimex(2) not available")
    if state == TIME_ERROR:
        return Result(
            "clock",
            Status.FAIL,
            "not synchronised (install and start chrony or systemd-timesyncd): DKIM, TOTP"
            " and TLS need the right time",
        )
    if state < 0:
        return Result(
            "clock", Status.SKIP, f"adjtimex(2) failed: {os.strerror(ctypes.get_errno())}"
        )
    return Result("clock", Status.OK, "synchronised")


# -- services ------------------------------------------------------------------------------


async def check_clamd(address: str | None) -> Result:
    if address is None:
        return Result("clamd", Status.WARN, "not configured: mail is not scanned for viruses")
    try:
        await ClamdClient(address, timeout=PROBE_SECONDS, connect_timeout=PROBE_SECONDS).ping()
    except ClamdError as e:
        return Result("clamd", Status.FAIL, f"{address}: {e}")
    return Result("clamd", Status.OK, f"{address} answers PING")


async def check_redis(url: str | None) -> Result:
    if url is None:
        return Result("redis", Status.SKIP, "not configured (bans and limits are per node)")
    import redis.asyncio
    import redis.exceptions

    client = redis.asyncio.Redis.from_url(
        url, socket_timeout=PROBE_SECONDS, socket_connect_timeout=PROBE_SECONDS
    )
    try:
        await client.ping()
    except (redis.exceptions.RedisError, OSError) as e:
        return Result("redis", Status.FAIL, f"{_redact(url)}: {e}")
    finally:
        await client.aclose()
    return Result("redis", Status.OK, f"{_redact(url)} answers PING")


def _redact(url: str) -> str:
    """A Redis URL without its password (it may carry one: redis://:secret@host)."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def check_queue(app: App, max_age_hours: float, now: float | None = None) -> Result:
    s = app.settings
    path = s.path(QUEUE_FILE)
    if not path.exists():
        return Result("queue", Status.OK, "empty (no queue yet)")
    with QueueStore.open(path, app.server_key.derive("queue"), create=False) as store:
        entries = store.list_entries()
    if not entries:
        return Result("queue", Status.OK, "empty")
    now = time.time() if now is None else now
    oldest = min(e.created for e in entries)
    hours = (now - oldest) / 3600
    detail = f"{len(entries)} entries, the oldest queued {hours:.1f} h ago"
    if hours > max_age_hours:
        return Result("queue", Status.FAIL, f"{detail} (over {max_age_hours:g} h: stuck?)")
    return Result("queue", Status.OK, detail)


def check_backup(s: config.Settings, now: float | None = None) -> list[Result]:
    """The last snapshot and the last test restore, as the server recorded them.

    A snapshot older than twice the full-snapshot interval means replication and the daily
    full have both stopped; a test restore older than twice its interval means the weekly
    proof that backups can be brought back is not happening.
    """
    b = s.backup
    if not b.targets:
        return [Result("backup", Status.SKIP, "no [backup] targets configured")]
    now = time.time() if now is None else now
    made, tested = last_backup(s.data_dir), last_verified_restore(s.data_dir)
    return [
        _backup_result("backup", made, b.full_interval_hours * 2, now, Status.FAIL),
        # No test restore yet is normal in a new installation's first week: a warning.
        _backup_result(
            "backup restore test", tested, b.verify_interval_hours * 2, now, Status.WARN
        ),
    ]


def _backup_result(
    check: str, status: BackupStatus, max_hours: float, now: float, never: Status
) -> Result:
    if status.when is None:
        if status.detail:
            return Result(check, Status.FAIL, f"never succeeded; the last attempt: {status.detail}")
        return Result(check, never, "never done yet (postvern backup run | verify)")
    hours = (now - status.when) / 3600
    if not status.ok:
        return Result(check, Status.FAIL, f"the last attempt failed: {status.detail}")
    if hours > max_hours:
        return Result(
            check, Status.FAIL, f"the last success is {hours:.1f} h old (over {max_hours:g} h)"
        )
    return Result(check, Status.OK, f"{hours:.1f} h ago ({status.detail})")


# -- all together --------------------------------------------------------------------------

CHECKS = (
    "dns",
    "tls",
    "listeners",
    "data",
    "disk",
    "core",
    "swap",
    "thp",
    "clock",
    "clamd",
    "redis",
    "queue",
    "backup",
    "directory",
)


async def run(
    app: App, *, host: Host | None = None, skip: frozenset[str] = frozenset()
) -> list[Result]:
    """Every check, in a stable order; ``skip`` names checks (from CHECKS) to leave out."""
    s = app.settings
    host = host or Host()
    out: list[Result] = []

    async def section(name: str, work: Callable[[], Awaitable[list[Result]]]) -> None:
        if name in skip:
            out.append(Result(name, Status.SKIP, "skipped (--skip)"))
        else:
            out.extend(await work())

    async def dns() -> list[Result]:
        resolver = Resolver.from_settings(s)
        found = []
        for domain in app.directory.domains():
            found += await DNSChecks(resolver, app, domain).run()
        return found

    async def listeners() -> list[Result]:
        configured = {
            f.name: getattr(s.listen, f.name)
            for f in dataclasses.fields(s.listen)
            if getattr(s.listen, f.name) is not None
        }
        return list(
            await asyncio.gather(*(probe_listener(n, a, s.hostname) for n, a in configured.items()))
        )

    def now(fn: Callable[[], Result | list[Result]]) -> Callable[[], Awaitable[list[Result]]]:
        async def wrapped() -> list[Result]:
            result = await asyncio.to_thread(fn)
            return result if isinstance(result, list) else [result]

        return wrapped

    async def one(coro: Callable[[], Awaitable[Result]]) -> list[Result]:
        return [await coro()]

    await section("dns", dns)
    await section("tls", now(lambda: check_certificate(s, s.ops.certificate_alert_days)))
    await section("listeners", listeners)
    await section("data", now(lambda: check_data_dir(s.data_dir)))
    await section("disk", now(lambda: check_disk(s.data_dir, s.ops.disk_free_min_percent)))
    await section("core", now(host.core_dumps))
    await section("swap", now(host.swap))
    await section("thp", now(host.transparent_huge_pages))
    await section("clock", now(check_clock))
    await section("clamd", lambda: one(lambda: check_clamd(s.filters.clamd)))
    await section("redis", lambda: one(lambda: check_redis(s.abuse.redis_url)))
    await section("queue", now(lambda: check_queue(app, s.ops.queue_max_age_hours)))
    await section("backup", now(lambda: check_backup(s)))
    await section("directory", now(lambda: _directory(app)))
    return out


def _directory(app: App) -> list[Result]:
    from postvern.ops.doctor_directory import check_directory, check_node_map

    return check_directory(app.settings) + check_node_map(app.settings, app.directory)
