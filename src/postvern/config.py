"""One typed settings object, read from ``postvern.toml`` with ``POSTVERN_*`` overrides.

Every listener, limit, resolver and external service is a setting with a default that
works on one machine with nothing but Python. Environment overrides use the form
``POSTVERN_<SECTION>__<KEY>`` (for example ``POSTVERN_LISTEN__IMAP=127.0.0.1:1143``), so a
container or a test can change one value without rewriting the file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "postvern.toml"


class ConfigError(Exception):
    """The configuration file is missing, unreadable or names an invalid value."""


def parse_hostport(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"{value!r}: expected host:port")
        host, port = value, str(default_port)
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{value!r}: port is not a number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{value!r}: port out of range")
    return host, number


@dataclass
class Listen:
    """Listener addresses, each ``"host:port"`` or absent (not listening)."""

    smtp: str | None = None
    submission: str | None = None
    submissions: str | None = None
    imap: str | None = None
    imaps: str | None = None
    pop3: str | None = None
    pop3s: str | None = None
    https: str | None = None


@dataclass
class TLS:
    cert: str = "tls/cert.pem"
    key: str = "tls/key.pem"
    # Outbound hops validate against the system CA store unless a bundle is given (tests).
    ca_bundle: str | None = None


@dataclass
class DNS:
    # Empty means the system resolver (/etc/resolv.conf).
    nameservers: list[str] = field(default_factory=list)
    timeout: float = 5.0
    cache_size: int = 4096


@dataclass
class EmailAuth:
    # ARC sealers (forwarders, mailing lists) whose recorded DMARC pass we accept when DMARC
    # fails only because of their forwarding (RFC 7489 §6.7, RFC 8617 §7.2).
    arc_trusted_domains: list[str] = field(default_factory=list)


@dataclass
class KDF:
    """Argon2id parameters for new key slots (RFC 9106 §4, second recommended option)."""

    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 4


@dataclass
class Limits:
    smtp_line: int = 4096  # RFC 5321 §4.5.3.1.4 asks for ≥ 512 for commands, 1000 for text
    message_size: int = 50 * 1024 * 1024
    recipients: int = 100
    smtp_errors: int = 10
    connections: int = 500
    connections_per_ip: int = 20
    smtp_idle_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: server timeout ≥ 5 minutes
    smtp_session_timeout: float = 1800.0
    imap_line: int = 65536
    imap_literal: int = 50 * 1024 * 1024
    imap_literal_unauth: int = 4096
    imap_idle_timeout: float = 1800.0  # RFC 9051 §5.4: autologout ≥ 30 minutes
    imap_sessions_per_user: int = 50
    search_depth: int = 32
    pop3_idle_timeout: float = 600.0  # RFC 1939 §3: autologout ≥ 10 minutes
    auth_failure_delay: float = 1.0
    # A successful login is remembered (login_cache.py) for this long after its last use, and
    # for as long as the user has a mailbox open; a repeated login then skips Argon2id. 0 turns
    # the cache off.
    login_cache_seconds: float = 300.0
    # A mailbox stays open this long after its last session ends, so a client reconnecting
    # at once does not reopen it; at most store.service.MAX_LINGERING at a time.
    mailbox_linger_seconds: float = 30.0
    default_quota: int = 0  # bytes; 0 means unlimited


@dataclass
class Abuse:
    redis_url: str | None = None
    allowlist: list[str] = field(default_factory=list)
    dnsbl: list[str] = field(default_factory=list)
    greylisting: bool = False
    connections_per_ip_per_minute: int = 60
    messages_per_ip_per_hour: int = 1000
    recipients_per_ip_per_hour: int = 5000
    messages_per_sender_per_day: int = 2000
    submissions_per_user_per_day: int = 1000
    auth_failures_per_ip: int = 10
    auth_failures_per_account: int = 20
    unknown_rcpt_per_ip: int = 20
    ban_seconds: int = 600
    ban_max_seconds: int = 7 * 86400
    dnsbl_timeout: float = 2.0
    # RFC 6647 §2.1 practice: retry accepted after 5 minutes, within a day; a triplet that
    # passed is remembered for 36 days (a month of weekly mail, with slack).
    greylist_delay: float = 300.0
    greylist_window: float = 86400.0
    greylist_pass_period: float = 36 * 86400.0
    # Port-scan and garbage detection (abuse/portscan.py): this many offences (a connection
    # that never completed a protocol exchange, spoke another protocol, or failed its TLS
    # handshake) within the window, or this many listeners touched without an exchange,
    # earn a ban through the ordinary ban logic. 0 turns the detection off.
    scan_offences: int = 10
    scan_listeners: int = 3
    scan_window: float = 600.0
    # "inet postvern banned": keep this nftables set in step with the bans (abuse/nftables.py).
    nftables_set: str | None = None


@dataclass
class Filters:
    clamd: str | None = None  # "unix:/path" or "host:port"; None disables scanning
    clamd_timeout: float = 30.0
    on_scanner_failure: str = "tempfail"  # or "accept"
    spam_junk_score: float = 5.0
    spam_reject_score: float = 15.0
    url_blocklist: str | None = None
    attachment_policy: str = "reject"  # or "quarantine"
    # Child processes that run the content filter (delivery/filtering.py); 0 runs it in a
    # thread of the server process, where its Python holds the GIL beside the event loop.
    processes: int = 0


@dataclass
class MTA:
    port: int = 25  # tests run several instances on one machine and change it
    max_queue_days: float = 5.0
    retry_base: float = 300.0
    concurrency_per_domain: int = 4
    connect_timeout: float = 30.0
    # The MTA-STS policy served for our domains. "testing" until the certificate is one that
    # senders can validate; then "enforce" (RFC 8461 §5).
    sts_mode: str = "testing"
    # For running several instances on one machine (tests, a lab): accept MX records that
    # point at loopback, and fetch MTA-STS policies from another port than 443.
    allow_loopback_mx: bool = False
    sts_policy_port: int = 443


@dataclass
class Server:
    # The event loop: "asyncio" or "uvloop" (libuv; bench/smtp_ingest.py --event-loop
    # measured ~9% less CPU per message and ~10% more messages per second with it).
    event_loop: str = "asyncio"
    # Worker processes sharing the listeners (workers.py): 0 is one per core; 1 is a single
    # process without a supervisor. Each worker is one event loop on one core.
    workers: int = 0


@dataclass
class AccountsPolicy:
    """What users may do for themselves in the account portal and API (accounts/)."""

    # Exporting all mail needs a login or a confirmation (password or authenticator code)
    # this recent: a session left open on a shared machine cannot walk off with the mailbox.
    reauth_minutes: float = 10.0
    # Users may forward their own mail to outside addresses (SRS and ARC keep it passing
    # SPF and DMARC at the next hop), to at most this many; false ignores forwards set.
    forwarding: bool = True
    max_forwards: int = 5


@dataclass
class Log:
    level: str = "info"
    # Client addresses cut to /24 (IPv4) or /48 (IPv6), accounts as daily pseudonyms.
    anonymise: bool = True
    format: str = "text"  # or "json": one JSON object per line
    # Log files (besides stderr) go here, one per day, removed after retention_days; so are
    # the daily pseudonym keys, after which old lines can no longer be linked to anyone.
    directory: str | None = None
    retention_days: int = 30


@dataclass
class Ops:
    """The watchdog and ``postvern doctor`` (ops/)."""

    # Below this share of free space on the data directory's file system: an alert.
    disk_free_min_percent: float = 10.0
    # An outbound message queued longer than this means delivery is stuck: an alert.
    queue_max_age_hours: float = 24.0
    # Certificate expiry closer than this: an alert (doctor warns from 30 days).
    certificate_alert_days: int = 14
    watchdog_interval: float = 300.0
    # Bans added within one watchdog interval that make a spike; failed share of deliveries.
    ban_spike: int = 50
    delivery_failure_ratio: float = 0.5
    # POSTed a JSON alert as well as mailing the postmaster (an https:// URL), when set.
    webhook: str | None = None
    # Shown in /.well-known/security.txt (RFC 9116 §2.5.3); empty: mailto:postmaster@.
    security_contact: str = ""


@dataclass
class Backup:
    """Encrypted snapshots and continuous replication (backup/, docs/disaster-recovery.md)."""

    # Where snapshots go, all at once: "file:///path" or "s3://bucket/prefix?endpoint=URL&
    # region=NAME" (credentials from boto3's usual chain). Empty: no backups.
    targets: list[str] = field(default_factory=list)
    # A full snapshot this often (unchanged pieces are referenced, not uploaded again).
    full_interval_hours: float = 24.0
    # Changes are shipped this often (0: no continuous replication): the RPO is this plus
    # the time one replication takes.
    replicate_seconds: float = 15.0
    # The server restores its newest snapshot into a scratch directory and checks it.
    verify_interval_hours: float = 168.0
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 12
    # Replication points kept for point-in-time restores of one user.
    keep_points_hours: float = 48.0


@dataclass
class Cluster:
    """One node of a cluster (postvern/cluster/, docs/cluster.md); an empty role: one machine."""

    role: str = ""  # "front" or "mailbox"
    node: str = ""  # this node's name in cluster/nodes.toml and its certificate
    # A front's shared queue (cluster/sharedq.py): an s3:// URL every front reaches, where each
    # accepted message is durable before 250 so that another front can take it over; empty:
    # each front's queues live on its disk only. Needs Redis ([abuse] redis_url).
    queue_store: str = ""
    # A front holds a lease in Redis this long without renewing it (renewed every third of it);
    # when it lapses, another front takes the front's queued mail over.
    lease_seconds: float = 10.0
    # Automatic failover of a dead mailbox node (cluster/liveness.py): each mailbox node holds
    # a liveness lease in Redis this long (renewed every 2 s) and stops serving on its own
    # before it lapses; a front fails a node over once its lease has been gone a margin
    # longer. 0 (the default): off, `postvern cluster failover` is the administrator's
    # decision -- a wrong automatic one moves every user of a node that was only cut off
    # from Redis. Set the same value on every node; needs Redis ([abuse] redis_url).
    failover_after: float = 0.0


@dataclass
class DirectoryDB:
    """Where the directory lives (directory/pg.py, docs/cluster.md)."""

    # Empty: the encrypted SQLite file in the data directory (one machine). For several
    # nodes, "postgresql://USER@HOST:PORT/DBNAME": always TLS with sslmode=verify-full
    # over TCP (a URL asking for less is refused); a Unix socket (?host=/run/postgresql)
    # needs none.
    url: str | None = None
    # The root CA that signed the PostgreSQL server's certificate ("system": the OS store).
    ca: str | None = None
    # The password's file (mode 0600), never the URL; or a client certificate and its key.
    password_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    # Connections each server process keeps to PostgreSQL at most (opened as callers need
    # them): its directory calls run this many at once (docs/cluster.md). 1: one, in turn.
    pool: int = 4


@dataclass
class Settings:
    data_dir: Path
    hostname: str = "localhost"
    primary_domain: str = "localhost"
    # The local user that postmaster@ and abuse@ of every domain reach unless the domain has
    # a user or alias of that name; empty means the first user created.
    postmaster: str = ""
    listen: Listen = field(default_factory=Listen)
    tls: TLS = field(default_factory=TLS)
    dns: DNS = field(default_factory=DNS)
    emailauth: EmailAuth = field(default_factory=EmailAuth)
    kdf: KDF = field(default_factory=KDF)
    limits: Limits = field(default_factory=Limits)
    abuse: Abuse = field(default_factory=Abuse)
    filters: Filters = field(default_factory=Filters)
    mta: MTA = field(default_factory=MTA)
    accounts: AccountsPolicy = field(default_factory=AccountsPolicy)
    server: Server = field(default_factory=Server)
    log: Log = field(default_factory=Log)
    backup: Backup = field(default_factory=Backup)
    ops: Ops = field(default_factory=Ops)
    directory: DirectoryDB = field(default_factory=DirectoryDB)
    cluster: Cluster = field(default_factory=Cluster)

    def path(self, relative: str | os.PathLike[str]) -> Path:
        """Resolve a path from the config relative to the data directory."""
        p = Path(relative)
        return p if p.is_absolute() else self.data_dir / p

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        return [parse_hostport(s, default_port=53) for s in self.dns.nameservers]


_SECTIONS: dict[str, type] = {
    name: typing.cast(type, kind)
    for name, kind in typing.get_type_hints(Settings).items()
    if dataclasses.is_dataclass(kind)
}


_TOP_LEVEL = ("hostname", "primary_domain", "postmaster")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Check a TOML (or environment string) value against the field's annotation."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list")
        return [_coerce(name, args[0], v) for v in value]
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false")
        return value
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string")
        return value
    return value


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[{where}] unknown setting: {sorted(unknown)[0]}")
    return cls(**{k: _coerce(f"{where}.{k}", hints[k], v) for k, v in table.items()})


def _env_overrides(environ: typing.Mapping[str, str]) -> dict[str, dict[str, str] | str]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith("POSTVERN_"):
            continue
        rest = key[len("POSTVERN_") :].lower()
        section, sep, name = rest.partition("__")
        # Other POSTVERN_* variables (POSTVERN_DATA, POSTVERN_SERVER_KEY, test hooks) are
        # not settings; only names of sections and top-level settings are read here.
        if sep and section in _SECTIONS:
            out.setdefault(section, {})[name] = value
        elif not sep and section in _TOP_LEVEL:
            out[section] = value
    return out


def load(data_dir: Path, environ: typing.Mapping[str, str] | None = None) -> Settings:
    """Read ``postvern.toml`` from ``data_dir`` and apply ``POSTVERN_*`` overrides."""
    environ = os.environ if environ is None else environ
    path = data_dir / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run `postvern init` first)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    for section, value in _env_overrides(environ).items():
        if isinstance(value, dict):
            raw.setdefault(section, {}).update(value)
        else:
            raw[section] = value
    return from_mapping(data_dir, raw)


def from_mapping(data_dir: Path, raw: dict[str, Any]) -> Settings:
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            kwargs[key] = _build(_SECTIONS[key], value, key)
        elif key in _TOP_LEVEL:
            kwargs[key] = _coerce(key, str, value)
        else:
            raise ConfigError(f"unknown setting: {key}")
    settings = Settings(data_dir=data_dir, **kwargs)
    for name in dataclasses.fields(Listen):
        addr = getattr(settings.listen, name.name)
        if addr is not None:
            parse_hostport(addr)
    for ns in settings.dns.nameservers:
        parse_hostport(ns, default_port=53)
    return settings


def render(settings: Settings) -> str:
    """Write settings back as TOML (used by ``postvern init``)."""
    lines = [
        "# Postvern configuration. Every setting has a default; see README.md.",
        f'hostname = "{settings.hostname}"',
        f'primary_domain = "{settings.primary_domain}"',
        "# postmaster@ and abuse@ of every domain go here (empty: the first user created)",
        f"postmaster = {_toml_str(settings.postmaster)}",
        "",
    ]
    for section in _SECTIONS:
        obj = getattr(settings, section)
        lines.append(f"[{section}]")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                lines.append(f"# {f.name} =")
            elif isinstance(value, bool):
                lines.append(f"{f.name} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{f.name} = {value}")
            elif isinstance(value, list):
                lines.append(f"{f.name} = [{', '.join(_toml_str(v) for v in value)}]")
            else:
                lines.append(f"{f.name} = {_toml_str(str(value))}")
        lines.append("")
    return "\n".join(lines)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
