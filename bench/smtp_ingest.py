"""SMTP ingest benchmark: the whole inbound pipeline of ``postvern serve`` against a bare sink
and against Postfix, the same load from the same client in the same run.

N messages of ~10 KB, each signed by its sender domain with Ed25519 and RSA (RFC 8463 dual
signing), go over C concurrent reused STARTTLS connections from 127.0.0.1 to:

  * sink — a minimal asyncio SMTP server in its own process (``serve_smtp`` with a handler
    that answers 250 and keeps nothing): the cost of SMTP, TLS and the client alone;
  * postvern — a real ``postvern serve`` (tests/harness.py set-up): SPF, DKIM and DMARC
    checked against a loopback DNS server, the content filter, rate-limit accounting, and
    every message sealed (HPKE) and fsynced into the spool of a locked mailbox before 250;
  * postfix — a private Postfix instance (config, queue and data directories in a temp dir,
    127.0.0.1 on a high port, virtual(8) delivery into a Maildir; nothing can leave: every
    non-local transport is ``error:``). Postfix does no SPF/DKIM/DMARC or content checks
    here (no milters); its 250 means "in the queue", so its delivery into the Maildir is
    timed too.

Prints messages per second (at the client: 250s received / wall time), per-message latency,
server CPU per message, and peak memory: VmHWM for the single-process servers, the peak of
the summed PSS of all processes for Postfix (sampled every 0.2 s). Every message is counted
at the receiving end (Postvern: the sealed spool, then opened and checked with the user's
key; Postfix: Maildir files). CPU per message is the steadier figure on a shared machine.

DNS answers carry a 300 s TTL, as real sender domains' records do, so Postvern's resolver
cache works as in production. That includes the client's HELO name (``common.Target.helo``),
which publishes its own SPF record as sending hosts do (RFC 7208 §2.3): without a record
the HELO check got NXDOMAIN, and the test DNS server's negative answers carry a zero TTL (for
the tests of caching), so every message cost a real query, which no real resolver's cache
would. The sending IP is not allowlisted (its rate limits are raised above the load
instead, so the accounting still runs).

``--workers 1,2`` runs Postvern once per worker count (``[server] workers``; 1 is the single
process, more are a supervisor and that many workers sharing the listener): CPU and PSS are
then summed over the process tree, as for Postfix.

Usage: python bench/smtp_ingest.py [--messages 5000] [--connections 16] [--size 10000]
                                   [--only sink,postvern,postfix] [--profile] [--workers 1,2]
                                   [--keep-profile PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import pstats
import random
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common  # first: it puts tests/ on sys.path for the imports below
from common import Job, LoadResult, MemorySampler, SinkProcess, Target, send_all
from dnsserver import DNSTestServer
from harness import (
    DataDir,
    ServerProcess,
    free_port,
    mailbox_messages,
    make_data_dir,
    set_config,
)
from mta_kit import TestCA
from postvern.emailauth import dkim

DOMAIN = "example.test"
HOSTNAME = "mx.example.test"
RECIPIENT = f"alice@{DOMAIN}"
PASSWORD = "bench-correct-horse"
# Records of real sender domains live for minutes to hours; 300 s is at the short end.
DNS_TTL = 300
# Warm-up messages sent (and counted) before the clock starts: they load what a server
# loads lazily on its first message (the spam model, DNS answers, code paths).
WARMUP = 32
# After the last 250, how long a queueing server (Postfix) gets to deliver everything.
DELIVERY_WAIT = 300.0
POSTFIX = "/usr/sbin/postfix"
# Server log lines shown when messages were refused, to say why.
LOG_LINES_ON_REFUSAL = 15


# --- The load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderDomain:
    name: str
    rsa_key: bytes
    ed_key: bytes

    def zone(self) -> dict[str, str]:
        return {
            self.name: "v=spf1 ip4:127.0.0.1 -all",
            f"r1._domainkey.{self.name}": dkim.key_record(self.rsa_key),
            f"e1._domainkey.{self.name}": dkim.key_record(self.ed_key),
            f"_dmarc.{self.name}": "v=DMARC1; p=reject",
        }


def sender_domains(count: int) -> list[SenderDomain]:
    return [
        SenderDomain(
            f"s{i}.bench.test",
            dkim.generate_private_key("rsa-sha256"),
            dkim.generate_private_key("ed25519-sha256"),
        )
        for i in range(count)
    ]


def _load_keys_once() -> None:
    """Worker initialiser. Parsing a PEM RSA key (with its full validation) costs ~15 ms,
    several times the signature: the client side of the benchmark loads each key once.
    Only these signing workers are patched, never the server."""
    cached = functools.lru_cache(maxsize=64)(dkim.load_private_key)
    dkim.load_private_key = cached


def _sign_batch(args: tuple[list[tuple[str, bytes]], list[SenderDomain]]) -> list[bytes]:
    """Dual-sign messages (Ed25519 first, RSA outermost) in a worker process."""
    messages, domains = args
    by_name = {d.name: d for d in domains}
    signed = []
    for domain_name, raw in messages:
        d = by_name[domain_name]
        raw = dkim.sign(raw, d.name, "e1", d.ed_key, "ed25519-sha256") + raw
        signed.append(dkim.sign(raw, d.name, "r1", d.rsa_key, "rsa-sha256") + raw)
    return signed


def make_jobs(count: int, size: int, domains: list[SenderDomain]) -> list[Job]:
    """``count`` dual-signed messages from the sender domains in turn, all to the one user."""
    rng = random.Random(7)
    unsigned = []
    for i in range(count):
        d = domains[i % len(domains)]
        raw = common.text_message(rng, f"m-{i}", f"news@{d.name}", RECIPIENT, size)
        unsigned.append((d.name, raw))
    workers = max(1, min(2, os.cpu_count() or 1))
    chunk = max(1, (count + workers * 4 - 1) // (workers * 4))
    batches = [(unsigned[i : i + chunk], domains) for i in range(0, count, chunk)]
    with concurrent.futures.ProcessPoolExecutor(workers, initializer=_load_keys_once) as pool:
        signed = [m for batch in pool.map(_sign_batch, batches) for m in batch]
    return [
        Job(f"news@{name}", [RECIPIENT], data)
        for (name, _), data in zip(unsigned, signed, strict=True)
    ]


def marker_of(raw: bytes) -> str | None:
    start = raw.find(b"\r\nX-Bench-Id: ")
    if start < 0:
        return None
    end = raw.index(b"\r\n", start + 2)
    return raw[start + 14 : end].decode()


# --- Figures ----------------------------------------------------------------------------------


@dataclass
class Figures:
    system: str
    messages: int
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_message: float
    peak_rss_mib: float  # VmHWM (one process) or the peak of the summed RSS (a tree)
    peak_pss_mib: float  # peak of the summed PSS, sampled
    arrived: int
    refused: dict[str, int] = field(default_factory=dict)
    delivered_per_second: float | None = None  # Postfix: 250 is "queued", not "delivered"
    note: str = ""


def figures(system: str, m: Measured, rss_kib: int, arrived: int, **extra: object) -> Figures:
    r = m.result
    return Figures(
        system=system,
        messages=r.accepted,
        seconds=r.seconds,
        per_second=r.accepted / r.seconds if r.seconds else 0.0,
        p50_ms=r.percentile(50) * 1000,
        p99_ms=r.percentile(99) * 1000,
        cpu_ms_per_message=m.cpu_seconds / max(1, r.accepted) * 1000,
        peak_rss_mib=rss_kib / 1024,
        peak_pss_mib=m.sampler.peak_pss_kib / 1024,
        arrived=arrived,
        refused=r.refused,
        **extra,  # type: ignore[arg-type]
    )


@dataclass
class Measured:
    result: LoadResult
    cpu_seconds: float  # the server's (process tree's) CPU during the timed load
    sampler: MemorySampler
    settled_seconds: float  # until ``settled`` held after the load (delivery), else = load
    profile: str = ""


def measure(
    target: Target,
    jobs: list[Job],
    connections: int,
    pid: int,
    *,
    after_warmup: Callable[[], object] = lambda: None,
    settled: Callable[[], bool] = lambda: True,
    spy_on: Path | None = None,
) -> Measured:
    """Warm up on one connection, then run the timed load while sampling the server's
    memory (and, with ``spy_on``, profiling it with py-spy into that file); the clock and
    the CPU account go on until ``settled()`` (delivery done)."""
    warm, timed = jobs[:WARMUP], jobs[WARMUP:]
    asyncio.run(send_all(target, warm, 1))
    after_warmup()
    spy = common.PySpy(pid, spy_on) if spy_on else contextlib.nullcontext()
    with MemorySampler(pid) as sampler, spy:
        cpu0 = common.tree_cpu_seconds(pid)
        start = time.perf_counter()
        result = asyncio.run(send_all(target, timed, connections))
        wait_for(settled, DELIVERY_WAIT)
        settled_seconds = time.perf_counter() - start
        cpu = common.tree_cpu_seconds(pid) - cpu0
    profile = spy.summary() if isinstance(spy, common.PySpy) else ""
    return Measured(result, cpu, sampler, settled_seconds, profile)


def wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for delivery")
        time.sleep(0.05)


# --- The sink ---------------------------------------------------------------------------------


def run_sink(root: Path, ca: TestCA, jobs: list[Job], connections: int) -> Figures:
    cert, key = ca.issue(HOSTNAME)
    with SinkProcess("127.0.0.1", free_port(), cert, key, HOSTNAME, connections + 8) as sink:
        m = measure(Target("127.0.0.1", sink.port), jobs, connections, sink.pid)
        rss = common.peak_rss_kib(sink.pid)
        arrived = int(sink.stats()["accepted"])
    return figures("bare sink (serve_smtp)", m, rss, arrived)


# --- Postvern ---------------------------------------------------------------------------------


def postvern_data(
    root: Path,
    dns: DNSTestServer,
    connections: int,
    total: int,
    filter_processes: int = 0,
    workers: int = 1,
) -> DataDir:
    data = make_data_dir(
        root / f"postvern-{workers}",
        passwords={RECIPIENT: PASSWORD},
        listeners=("smtp",),
        hostname=HOSTNAME,
    )
    set_config(data.path, "server", {"workers": workers})
    set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
    if filter_processes:
        set_config(data.path, "filters", {"processes": filter_processes})
    set_config(
        data.path,
        "limits",
        {"connections_per_ip": max(20, connections + 4), "auth_failure_delay": 0.05},
    )
    # Not allowlisted: the per-IP and per-sender accounting runs, with room for the load.
    room = total * 4
    set_config(
        data.path,
        "abuse",
        {
            "allowlist": [],
            "connections_per_ip_per_minute": room,
            "messages_per_ip_per_hour": room,
            "recipients_per_ip_per_hour": room,
            "messages_per_sender_per_day": room,
        },
    )
    return data


@dataclass
class Verification:
    spooled: int
    opened: int
    folders: dict[str, int]
    all_pass: int  # spf=pass, two dkim=pass and dmarc=pass in our Authentication-Results
    duplicates: int
    missing: int


def verify_postvern(data: DataDir, jobs: list[Job]) -> Verification:
    """Count the sealed files, then log in (importing the spool) and check every message."""
    app = data.app()
    try:
        user = app.directory.user(RECIPIENT)
        spooled = app.accounts.spool.count(user.id)
    finally:
        app.close()
    folders: dict[str, int] = {}
    seen: Counter[str] = Counter()
    all_pass = 0
    for folder in ("INBOX", "Junk"):
        messages = mailbox_messages(data, RECIPIENT, folder)
        folders[folder] = len(messages)
        for raw in messages:
            marker = marker_of(raw)
            if marker is not None:
                seen[marker] += 1
            head = raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
            ours = [
                f
                for f in head.split(b"\r\n")
                if f.startswith(b"Authentication-Results: " + HOSTNAME.encode())
            ]
            if ours and all(t in ours[0] for t in (b"spf=pass", b"dmarc=pass")):
                all_pass += ours[0].count(b"dkim=pass") >= 2
    expected = {marker_of(j.data) for j in jobs}
    return Verification(
        spooled=spooled,
        opened=sum(folders.values()),
        folders=folders,
        all_pass=all_pass,
        duplicates=sum(c - 1 for c in seen.values() if c > 1),
        missing=len(expected - set(seen)),
    )


def run_postvern(
    root: Path,
    dns: DNSTestServer,
    jobs: list[Job],
    connections: int,
    profile: bool,
    filter_processes: int = 0,
    event_loop: str = "asyncio",
    workers: int = 1,
    keep_profile: Path | None = None,
) -> tuple[Figures, Verification, str]:
    """The load against ``postvern serve``; with ``profile``, py-spy samples it during the
    timed load (or, without py-spy, cProfile records its event-loop thread throughout)."""
    data = postvern_data(root, dns, connections, len(jobs), filter_processes, workers)
    use_spy = profile and common.find_py_spy() is not None
    cprofile_out = root / "postvern.prof"
    env = cprofile_env(root, cprofile_out) if profile and not use_spy else {}
    if event_loop == "uvloop":
        env = uvloop_env(root, env)
    env = {**env, "POSTVERN_SERVER__WORKERS": str(workers)}
    with ServerProcess(data, env=env) as server:
        assert server.proc is not None
        pid = server.proc.pid
        target = Target("127.0.0.1", data.addr("smtp")[1])
        m = measure(
            target, jobs, connections, pid, spy_on=root / "postvern.spy" if use_spy else None
        )
        # One process: its own peak (VmHWM); a supervisor and workers: the summed peak.
        rss = common.peak_rss_kib(pid) if workers == 1 else m.sampler.peak_rss_kib
        log_tail = server.output[-LOG_LINES_ON_REFUSAL:] if m.result.refused else []
    report = m.profile
    if use_spy:
        spy_file = root / "postvern.spy"
        report += "\n" + stage_breakdown(spy_file)
        if keep_profile is not None:
            keep_profile.write_bytes(spy_file.read_bytes())
    if log_tail:
        report = "\n".join(["postvern refused messages; the end of its log:", *log_tail, report])
    if profile and not use_spy and cprofile_out.exists():
        report = summarise_cprofile(cprofile_out)
    check = verify_postvern(data, jobs)
    label = f"postvern serve, {workers} worker{'s' if workers > 1 else ''}"
    note = f"summed over up to {m.sampler.peak_processes} processes" if workers > 1 else ""
    return figures(label, m, rss, check.opened, note=note), check, report


# --- Profiling the server ---------------------------------------------------------------------


def cprofile_env(root: Path, out: Path) -> dict[str, str]:
    """Profile the server's main thread (the event loop) with cProfile, through a
    sitecustomize module that starts the profiler and dumps it at a clean exit."""
    site = root / "cprofile-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, cProfile\n"
        "_p = cProfile.Profile()\n_p.enable()\n"
        f"atexit.register(lambda: (_p.disable(), _p.dump_stats({str(out)!r})))\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def uvloop_env(root: Path, env: dict[str, str]) -> dict[str, str]:
    """Run the server on uvloop (measuring it before it becomes a setting): a sitecustomize
    module sets uvloop's event-loop policy, which ``asyncio.run`` then uses."""
    site = root / "uvloop-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import asyncio, uvloop\nasyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
    )
    path = os.pathsep.join([str(site), env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))])
    return {**env, "PYTHONPATH": path}


# Where a py-spy sample's time goes: the stage of the innermost frame that names one (a
# frame's file as py-spy prints it, "(package/module.py:line)"; the first match in this
# order), so that dkimpy under our DKIM counts for DKIM and logging under the pipeline for
# logging; "threads" is the pool's own hand-off work, "event loop" asyncio's.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("(logging/",)),
    ("filter", ("(postvern/filters/",)),
    ("SPF", ("(postvern/emailauth/spf.py",)),
    ("DKIM", ("(postvern/emailauth/dkim", "(postvern/emailauth/canon.py",
              "(postvern/emailauth/domainkeys.py", "(dkim/")),
    ("ARC", ("(postvern/emailauth/arc.py",)),
    ("DMARC", ("(postvern/emailauth/dmarc.py",)),
    ("auth headers/results", ("(postvern/emailauth/",)),
    ("DNS", ("(postvern/dns/", "(dns/")),
    ("abuse accounting", ("(postvern/abuse/", "(limits/", "(apsw")),
    ("spool/encryption/fsync", ("(postvern/store/", "(postvern/crypto/", "(postvern/e2e/",
                                "(postvern/durable.py", "(cryptography/", "(hpke")),
    ("directory/rules", ("(postvern/directory/", "(postvern/delivery/userrules.py")),
    ("header rewriting/pipeline", ("(postvern/delivery/", "(postvern/mime/")),
    ("SMTP core (sans-I/O)", ("(postvern/smtp/protocol.py", "(postvern/smtp/commands.py",
                              "(postvern/smtp/events.py", "(postvern/smtp/replies.py",
                              "(postvern/smtp/address.py")),
    ("SMTP session/handler", ("(postvern/smtp/", "(postvern/net.py")),
    ("TLS", ("(ssl.py", "(asyncio/sslproto.py")),
    ("threads (pool hand-offs)", ("(threading.py", "(concurrent/", "(asyncio/threads.py")),
    ("event loop", ("(asyncio/", "(selectors.py", "(uvloop")),
]  # fmt: skip


def stage_breakdown(path: Path) -> str:
    """Shares of py-spy's samples per pipeline stage (see STAGES), from its raw output."""
    if not path.exists():
        return ""
    shares: Counter[str] = Counter()
    total = 0
    for frames, count in common.py_spy_stacks(path):
        total += count
        stage = "other"
        for frame in reversed(frames[1:]):
            found = next((n for n, keys in STAGES if any(k in frame for k in keys)), None)
            if found is not None:
                stage = found
                break
        shares[stage] += count
    if not total:
        return ""
    lines = [f"py-spy samples by pipeline stage ({total} samples):"]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in shares.most_common()]
    return "\n".join(lines)


def summarise_cprofile(path: Path, top: int = 25) -> str:
    import io

    buffer = io.StringIO()
    stats = pstats.Stats(str(path), stream=buffer)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumtime").print_stats(top)
    return "cProfile of the event-loop thread (worker threads are not seen):\n" + buffer.getvalue()


# --- Postfix ----------------------------------------------------------------------------------

POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = {owner}
setgid_group = {setgid}
myhostname = {hostname}
mydomain = {domain}
myorigin = {domain}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = texthash:{root}/conf/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
# Nothing may leave this machine: every transport that could reach outside is an error.
default_transport = error:5.7.1 nothing leaves this benchmark
relay_transport = error:5.7.1 nothing leaves this benchmark
smtpd_peername_lookup = no
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtpd_client_connection_count_limit = 0
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
"""

# Debian's master.cf without chroot, without any SMTP/LMTP client or pipe transport, and with
# the one smtpd on a loopback high port.
POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix: its own config, queue, data and Maildir under ``root``.

    Run as root, Postfix drops to ``mail_owner`` (Debian's ``postfix`` user) for its
    daemons; the queue subdirectories are created and owned by ``postfix check``
    (post-install), the data directory and the Maildir base are chowned here. ``start-fg``
    keeps the master in the foreground as our child; ``stop`` is ``postfix stop``.
    """

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        import grp
        import pwd

        self.root = root
        self.conf = root / "conf"
        self.port = free_port()
        owner = pwd.getpwnam("postfix")
        self.uid, self.gid = owner.pw_uid, owner.pw_gid
        self.setgid = grp.getgrnam("postdrop").gr_name
        self.cert, self.key = cert, key
        self.proc: subprocess.Popen[bytes] | None = None
        self.maildir = root / "mail" / "alice"

    def configure(self) -> None:
        # Postfix's daemons run as the postfix user and must reach the queue and Maildir
        # (the enclosing temp dir is ours, created 0700).
        self.root.mkdir()
        self.root.chmod(0o755)
        self.root.parent.chmod(0o711)
        for d in ("conf", "queue", "data", "mail"):
            (self.root / d).mkdir()
        os.chown(self.root / "data", self.uid, self.gid)
        os.chown(self.root / "mail", self.uid, self.gid)
        values = {
            "root": self.root, "owner": "postfix", "setgid": self.setgid, "hostname": HOSTNAME,
            "domain": DOMAIN, "uid": self.uid, "gid": self.gid, "cert": self.cert,
            "key": self.key, "port": self.port,
        }  # fmt: skip
        (self.conf / "main.cf").write_text(POSTFIX_MAIN.format(**values))
        (self.conf / "master.cf").write_text(POSTFIX_MASTER.format(**values))
        (self.conf / "vmailbox").write_text(f"{RECIPIENT} alice/\n")

    def postfix(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.conf), *command], capture_output=True, text=True, timeout=60
        )

    def start(self) -> PostfixInstance:
        self.configure()
        check = self.postfix("check")
        if check.returncode != 0:
            raise RuntimeError(
                f"postfix check failed: {check.stderr}{self.log_tail()}\n"
                f"(run `script -qc 'postfix -c {self.conf} check' /dev/null` to see why)"
            )
        log = (self.root / "start-fg.out").open("wb")
        self.proc = subprocess.Popen(
            [POSTFIX, "-c", str(self.conf), "start-fg"], stdout=log, stderr=log
        )
        deadline = time.monotonic() + common.START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("postfix exited:\n" + self.log_tail())
            if self._greets():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("postfix did not greet in time:\n" + self.log_tail())

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                return s.recv(64).startswith(b"220")
        except OSError:
            return False

    @property
    def master_pid(self) -> int:
        return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])

    def delivered(self) -> int:
        return sum(
            1 for sub in ("new", "cur") if (self.maildir / sub).is_dir()
            for _ in os.scandir(self.maildir / sub)
        )  # fmt: skip

    def log_tail(self, lines: int = 20) -> str:
        log = self.root / "maillog"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        self.postfix("stop")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.postfix("abort")
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_postfix(root: Path, ca: TestCA, jobs: list[Job], connections: int) -> Figures:
    cert, key = ca.issue(HOSTNAME)
    with PostfixInstance(root / "postfix", cert, key) as postfix:
        m = measure(
            Target("127.0.0.1", postfix.port),
            jobs,
            connections,
            postfix.master_pid,
            after_warmup=lambda: wait_for(lambda: postfix.delivered() >= WARMUP, DELIVERY_WAIT),
            settled=lambda: postfix.delivered() >= len(jobs),
        )
        arrived = postfix.delivered()
    return figures(
        "postfix 3.7 (no auth checks)",
        m,
        m.sampler.peak_rss_kib,
        arrived,
        delivered_per_second=m.result.accepted / m.settled_seconds,
        note=f"summed over up to {m.sampler.peak_processes} processes",
    )


# --- Main -------------------------------------------------------------------------------------


def print_table(rows: list[Figures]) -> None:
    print(
        f"{'':30}{'msg/s':>8}{'seconds':>9}{'p50 ms':>8}{'p99 ms':>8}{'CPU ms/msg':>11}"
        f"{'peak RSS':>11}{'peak PSS':>11}{'arrived':>9}"
    )
    for f in rows:
        print(
            f"{f.system:30}{f.per_second:>8.0f}{f.seconds:>9.2f}{f.p50_ms:>8.1f}{f.p99_ms:>8.1f}"
            f"{f.cpu_ms_per_message:>11.2f}{f.peak_rss_mib:>7.1f} MiB{f.peak_pss_mib:>7.1f} MiB"
            f"{f.arrived:>9}"
        )
        if f.delivered_per_second is not None:
            print(f"{'  delivered into the Maildir':30}{f.delivered_per_second:>8.0f}")
        if f.refused:
            print(f"{'  refused':30}{f.refused}")
        if f.note:
            print(f"{'':30}({f.note})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--size", type=int, default=10_000, help="bytes per message (about)")
    parser.add_argument("--sender-domains", type=int, default=8)
    parser.add_argument(
        "--only", default="sink,postvern,postfix", help="comma-separated: sink,postvern,postfix"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile Postvern: py-spy if installed (beside this Python or on PATH), else cProfile",
    )
    parser.add_argument(
        "--filter-processes",
        type=int,
        default=0,
        help="[filters] processes for Postvern (0: the filter in a thread)",
    )
    parser.add_argument(
        "--keep-profile",
        type=Path,
        help="with --profile and py-spy: keep its raw stacks here (PATH-<workers>.spy)",
    )
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated [server] workers counts for Postvern"
    )
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    if "postfix" in systems and (os.geteuid() != 0 or not Path(POSTFIX).exists()):
        print("postfix: needs root and /usr/sbin/postfix; left out\n")
        systems.remove("postfix")

    print(
        f"SMTP ingest: {args.messages} messages of ~{args.size} bytes (+{WARMUP} warm-up), "
        f"{args.connections} connections, STARTTLS, Ed25519+RSA DKIM-signed by "
        f"{args.sender_domains} sender domains\n{common.machine_load()} at the start"
    )
    started = time.perf_counter()
    domains = sender_domains(args.sender_domains)
    rows: list[Figures] = []
    checks: list[tuple[str, Verification]] = []
    report = ""
    with tempfile.TemporaryDirectory(prefix="postvern-ingest-") as tmp, DNSTestServer() as dns:
        root = Path(tmp)
        for d in domains:
            for name, txt in d.zone().items():
                dns.add(name, "TXT", txt, ttl=DNS_TTL)
        dns.add(Target("", 0).helo, "TXT", "v=spf1 ip4:127.0.0.1 -all", ttl=DNS_TTL)
        ca = TestCA(root)
        total = args.messages + WARMUP
        # The same signed messages for every system (each has its own mailbox).
        jobs = make_jobs(total, args.size, domains)
        print(f"  {total} messages signed in {time.perf_counter() - started:.0f} s", flush=True)
        for system in systems:
            begun = time.perf_counter()
            if system == "sink":
                rows.append(run_sink(root, ca, jobs, args.connections))
            elif system == "postvern":
                for count in worker_counts:
                    fig, check, part = run_postvern(
                        root,
                        dns,
                        jobs,
                        args.connections,
                        args.profile,
                        args.filter_processes,
                        args.event_loop,
                        count,
                        args.keep_profile.with_name(f"{args.keep_profile.name}-{count}.spy")
                        if args.keep_profile
                        else None,
                    )
                    rows.append(fig)
                    checks.append((fig.system, check))
                    report += part
                    print(f"  {fig.system}: {fig.per_second:.0f} msg/s", flush=True)
            elif system == "postfix":
                rows.append(run_postfix(root, ca, jobs, args.connections))
            took = time.perf_counter() - begun
            print(f"  {system}: done in {took:.0f} s ({common.machine_load()})", flush=True)
    print(f"\n{common.machine_load()} at the end; {time.perf_counter() - started:.0f} s in all\n")
    print_table(rows)
    by = {r.system.split()[0]: r for r in rows}
    print()
    for pv in (r for r in rows if r.system.startswith("postvern")):
        for other in ("bare", "postfix"):
            base = by.get(other)
            if base is None:
                continue
            label = "bare sink" if other == "bare" else "Postfix"
            print(
                f"{pv.system} / {label}: {pv.per_second / base.per_second:.3g}× msg/s, "
                f"{pv.cpu_ms_per_message / base.cpu_ms_per_message:.3g}× CPU per message, "
                f"{pv.peak_pss_mib / base.peak_pss_mib:.3g}× peak PSS"
            )
            if base.delivered_per_second is not None:
                print(
                    f"{pv.system} / {label} (until in the mailbox): "
                    f"{pv.per_second / base.delivered_per_second:.3g}×"
                )
    for system, check in checks:
        print(
            f"\n{system} arrivals: {check.spooled} sealed in the spool; "
            f"opened with the user's key: {check.opened} ({check.folders}); "
            f"SPF+DKIM×2+DMARC pass: {check.all_pass}; "
            f"missing {check.missing}, duplicates {check.duplicates}"
        )
    problems = [
        f"{r.system}: {r.arrived} of {args.messages + WARMUP} arrived"
        for r in rows
        if r.arrived != args.messages + WARMUP
    ]
    for system, check in checks:
        if check.missing or check.duplicates or check.spooled != check.opened:
            problems.append(f"{system}: missing, duplicated or unreadable messages")
    if report:
        print("\n" + report)
    print(
        json.dumps(
            {
                "rows": [asdict(r) for r in rows],
                "postvern_checks": {s: asdict(c) for s, c in checks},
            }
        )
    )
    if problems:
        raise SystemExit("NOT EVERY MESSAGE ARRIVED: " + "; ".join(problems))


if __name__ == "__main__":
    main()
