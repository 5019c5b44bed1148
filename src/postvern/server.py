"""Wiring: build the shared services, open every configured listener, stop cleanly on a signal.

Nothing protocol-specific lives here. Each listener kind maps to a function that starts an
``asyncio.Server`` for it; this module owns the event loop, the order of start-up (services
before listeners) and of shutdown (stop accepting, let sessions finish briefly, lock every
mailbox, close the databases).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from postvern import config, handoff, workers
from postvern.abuse import Abuse
from postvern.abuse.nftables import NftablesError, NftablesSet
from postvern.abuse.portscan import ScanDetector
from postvern.app import App
from postvern.backup.replicate import BackupTask
from postvern.cluster.node import ClusterNode
from postvern.crypto import tls
from postvern.delivery.filtering import FilterStage
from postvern.delivery.forward import AliasForwarder
from postvern.delivery.pipeline import InboundPipeline, Transaction
from postvern.delivery.srs import SRS
from postvern.dns import Resolver
from postvern.e2e.wkd import WKD
from postvern.emailauth.signing import Signer
from postvern.filters.clamd import ClamdClient, ClamdError
from postvern.filters.learning import JunkLearner
from postvern.hardening import no_core_dumps
from postvern.imap.server import start_imap_server
from postvern.login import LoginService
from postvern.mta import QUEUE_FILE, OutboundMTA, Queue
from postvern.mta.runner import AttemptReport
from postvern.mta.wake import WAKE_FILE, wake
from postvern.net import Admission, ChannelServer, event_loop_factory
from postvern.ops import retention
from postvern.ops.metrics import Metrics, Snapshot
from postvern.ops.reload import Reloader
from postvern.ops.watchdog import Watchdog
from postvern.pop3.server import start_pop3_server
from postvern.smtp.mx import MXHandler
from postvern.smtp.session import serve_smtp
from postvern.smtp.submission import SubmissionHandler
from postvern.store.service import MailboxRegistry
from postvern.web.portal.routes import account_routes
from postvern.web.server import start_web_server

log = logging.getLogger("postvern")

READY_LINE = "postvern: ready"
# On SIGTERM, sessions get this long to finish what they are doing before the loop stops.
SHUTDOWN_GRACE_SECONDS = 5.0
# The certificate is looked at on start and then this often, so a warning about its expiry
# (tls.EXPIRY_WARNING_DAYS) reaches the log daily while there is time to renew it.
CERTIFICATE_CHECK_SECONDS = 86400.0
# How long start-up waits for clamd to answer PING: one that is up answers in milliseconds.
CLAMD_PROBE_SECONDS = 2.0


class Listener(Protocol):
    async def shutdown(self, grace: float = ...) -> None: ...


Starter = Callable[["Server", str, int], Awaitable[Listener]]


class StartupError(Exception):
    """A listener could not be opened (address in use, no permission)."""


class Server:
    def __init__(self, app: App, role: workers.Role | None = None) -> None:
        self.app = app
        # Which worker this is (workers.py); worker 0 of 1 is the single process.
        self.role = role or workers.Role()
        self._mta_lock: workers.MTALock | None = None
        self._mta_start: asyncio.Task[None] | None = None
        self.settings = app.settings
        s = self.settings
        self.tls_context = tls.server_context(s.path(s.tls.cert), s.path(s.tls.key))
        junk_score = s.filters.spam_junk_score
        self.registry = MailboxRegistry(
            app.accounts,
            hook_factory=lambda box: JunkLearner(box, s.hostname, junk_score),
            linger_seconds=s.limits.mailbox_linger_seconds,
        )
        self.resolver = Resolver.from_settings(s)
        self.abuse = Abuse(s, s.data_dir, app.server_key.derive("abuse"), self.resolver)
        self.login = LoginService(
            app.accounts,
            self.registry,
            self.abuse,
            failure_delay=s.limits.auth_failure_delay,
            cache_seconds=s.limits.login_cache_seconds,
        )
        self.pipeline = InboundPipeline(
            hostname=s.hostname,
            directory=app.directory,
            registry=self.registry,
            resolver=self.resolver,
            arc_trusted_domains=frozenset(s.emailauth.arc_trusted_domains),
            content_filter=FilterStage(s, app.directory),
            default_quota=s.limits.default_quota,
        )
        self.signer = Signer(app.directory)
        self.srs = SRS(app.server_key.derive("srs"))
        self.queue: Queue | None = None
        self.mta: OutboundMTA | None = None
        self.servers: list[tuple[str, Listener]] = []
        self._certificate_watch: asyncio.Task[None] | None = None
        self.exporter = Metrics(self.snapshot)  # ops/metrics.py: /metrics
        self.watchdog = Watchdog(
            s,
            self.exporter,
            self.snapshot,
            self._ban_times,
            self._mail_postmaster,
            refresh=self.refresh_metrics,
        )
        self._queue_stats = (0, 0.0)  # entries, age of the oldest (refreshed per scrape)
        self.scans = ScanDetector(
            self.abuse,
            offences=s.abuse.scan_offences,
            listeners=s.abuse.scan_listeners,
            window=s.abuse.scan_window,
            on_offence=lambda kind: self.exporter.scan_offences.labels(kind.value).inc(),
        )
        spec = s.abuse.nftables_set
        self.nftables = NftablesSet(spec, self.abuse.bans, time.time) if spec else None
        self._certificate_expiry = self._read_certificate_expiry()
        self.backup = BackupTask(app, self.registry, self._mail_postmaster)  # backup/
        self.cluster = ClusterNode.attach(self)  # cluster/: a front or mailbox node, or None

    # -- operations (ops/): metrics, watchdog ---------------------------------------------

    def snapshot(self) -> Snapshot:
        entries, oldest = self._queue_stats
        return Snapshot(
            sessions={n: getattr(srv, "active_sessions", 0) for n, srv in self.servers},
            kdf_runs=self.login.kdf_runs,
            warm_logins=self.login.warm_logins,
            mailboxes_unlocked=self.registry.unlocked_count,
            bans_active=len(self.abuse.bans()),
            outbound_in_flight=self.mta.in_flight if self.mta else 0,
            queue_entries=entries,
            queue_oldest_seconds=oldest,
            certificate_expiry_timestamp=self._certificate_expiry,
            extra={**self.backup.metrics(), **(self.cluster.metrics() if self.cluster else {})},
        )

    async def refresh_metrics(self) -> bytes:
        if self.queue is not None:
            created = await self.queue.call(lambda st: [e.created for e in st.list_entries()])
            oldest = time.time() - min(created) if created else 0.0
            self._queue_stats = (len(created), oldest)
        return self.exporter.render()

    def _ban_times(self) -> list[tuple[str, float]]:
        return [(b.network, b.updated) for b in self.abuse.bans()]

    async def _mail_postmaster(self, message: bytes) -> None:
        await self._bounce(message, f"postmaster@{self.settings.primary_domain}")

    def _count_delivery(self, report: AttemptReport) -> None:
        for outcome in report.outcomes.values():
            self.exporter.deliveries.labels(str(outcome)).inc()

    def _read_certificate_expiry(self) -> float:
        s = self.settings
        try:
            return tls.read_certificate(s.path(s.tls.cert)).not_after.timestamp()
        except tls.TLSConfigError:
            return 0.0

    def certificate_reloaded(self) -> None:
        """After SIGHUP (ops/reload.py): the expiry metric and warning follow the new one."""
        self._certificate_expiry = self._read_certificate_expiry()
        self._check_certificate()

    def metrics(self) -> dict[str, float]:
        return {
            "postvern_kdf_runs_total": self.login.kdf_runs,
            "postvern_warm_logins_total": self.login.warm_logins,
            "postvern_mailboxes_unlocked": self.registry.unlocked_count,
            "postvern_bans_active": len(self.abuse.bans()),
            "postvern_outbound_in_flight": self.mta.in_flight if self.mta else 0,
        }

    def admission(self, service: str) -> Admission:
        """The connect-time check of IMAP and POP3 listeners: bans and connection rate."""

        async def admit(ip: str) -> str | None:
            refusal = await self.abuse.on_connect(ip, service)
            return None if refusal is None else refusal.text

        return admit

    async def start(self) -> None:
        first = self.role.first  # what must exist once runs in worker 0 (workers.py)
        if first:
            self._check_certificate()
            self._certificate_watch = asyncio.create_task(self._watch_certificate())
            await self._check_scanner()
        if not self.role.alone:
            self.abuse.share_between_workers()
            self.registry.watch_other_processes()
        await self.abuse.start()
        ChannelServer.observer = self.scans.observe  # abuse/portscan.py
        if self.nftables is not None and first:
            try:
                await self.nftables.start()
            except NftablesError as e:
                log.warning("bans are not enforced in nftables: %s", e)
        await self._start_outbound()
        if first:
            await self.backup.start()
        if self.cluster is not None:
            await self.cluster.start()  # cluster/: the relay, or a mailbox node's listener
        listen = self.settings.listen
        for name, starter in STARTERS.items():
            address = getattr(listen, name)
            if address is None or not self.role.serves(name):
                continue
            host, port = config.parse_hostport(address)
            try:
                if self.cluster is not None:  # a cluster front proxies IMAP and POP3
                    starter = self.cluster.starter(name, starter)
                server = await starter(self, host, port)
            except OSError as e:
                await self.stop()
                raise StartupError(f"cannot listen for {name} on {address}: {e.strerror}") from None
            self.servers.append((name, server))
            log.info("listening for %s on %s", name, address)
        if first:
            self.watchdog.start()

    def _check_certificate(self) -> None:
        """Warn in the log when the certificate is near its end (or past it)."""
        s = self.settings
        try:
            problem = tls.read_certificate(s.path(s.tls.cert)).expiry_problem()
        except tls.TLSConfigError as e:
            problem = str(e)
        if problem is not None:
            log.warning("%s", problem)

    async def _watch_certificate(self) -> None:
        while True:
            await asyncio.sleep(CERTIFICATE_CHECK_SECONDS)
            self._check_certificate()

    async def _check_scanner(self) -> None:
        """Say once, at start, when mail is not being scanned for viruses, and why."""
        f = self.settings.filters
        if f.clamd is None:
            log.warning(
                "mail is NOT scanned for viruses: no clamd configured"
                " (install clamav-daemon and set [filters] clamd)"
            )
            return
        try:
            client = ClamdClient(
                f.clamd, timeout=CLAMD_PROBE_SECONDS, connect_timeout=CLAMD_PROBE_SECONDS
            )
            await client.ping()
        except ClamdError as e:
            outcome = "accepted unscanned" if f.on_scanner_failure == "accept" else "deferred"
            log.warning("%s at %s: mail will be %s until it answers", e, f.clamd, outcome)
        else:
            log.info("scanning mail for viruses with clamd at %s", f.clamd)

    async def _start_outbound(self) -> None:
        """The queue, the MTA that empties it, and the forwarding that fills it."""
        s = self.settings
        self.queue = await Queue.open(s.path(QUEUE_FILE), self.app.server_key.derive("queue"))
        if self.cluster is not None:  # a front's queue is shared (cluster/sharedq.py)
            self.cluster.attach_queue(self.queue)
        self.pipeline.srs = self.srs
        self.pipeline.forwarder = AliasForwarder(
            srs=self.srs, signer=self.signer, queue=self.queue, authserv_id=s.hostname
        )
        if not self.role.first:
            # Only worker 0 delivers (so each message is delivered once); the others tell
            # its MTA of every enqueue through the FIFO the CLI uses (mta/wake.py).
            fifo = s.path(WAKE_FILE)

            def wake_worker_zero(_due: object) -> None:
                wake(fifo)

            self.queue.subscribe(wake_worker_zero)
            return
        self.mta = OutboundMTA(
            s,
            self.queue,
            self.resolver,
            bounce=self._bounce,
            policy_port=s.mta.sts_policy_port,
            allow_loopback_mx=s.mta.allow_loopback_mx,
            on_report=self._count_delivery,
        )
        if self.role.alone:
            await self.mta.start()
        else:
            self._mta_lock = workers.MTALock(s.data_dir)
            self._mta_start = asyncio.create_task(self._start_mta_locked(self.mta))

    async def _start_mta_locked(self, mta: OutboundMTA) -> None:
        """Worker 0 of several: start the MTA once no other server's MTA runs (a SIGUSR2
        predecessor's stops with its workers)."""
        assert self._mta_lock is not None
        await self._mta_lock.acquire()
        await mta.start()

    async def _bounce(self, message: bytes, address: str) -> None:
        """A delivery status notification: local senders get it in their INBOX."""
        assert self.queue is not None
        if not await self.pipeline.is_local_domain(address.rpartition("@")[2]):
            await self.queue.enqueue("", [address], message)
            return
        reply, recipient = await self.pipeline.check_recipient(address)
        if recipient is None and reply.code >= 500:
            # The sender is gone (or its aliases lead nowhere): the notice goes to the
            # postmaster, as a double bounce does in Postfix, rather than nowhere.
            log.warning("a bounce for a local address nobody has any more goes to the postmaster")
            postmaster = f"postmaster@{self.settings.primary_domain}"
            reply, recipient = await self.pipeline.check_recipient(postmaster)
        if recipient is None:
            raise RuntimeError(f"local delivery of a bounce refused ({reply.code}); retried later")
        txn = Transaction(
            client_ip=None,
            helo=self.settings.hostname,
            mail_from="",
            protocol="ESMTP",
            recipients=[recipient],
        )
        reply = await self.pipeline.store(txn, message)
        if not reply.is_positive:
            raise RuntimeError("local delivery of a bounce failed; it will be retried")

    async def stop(self) -> None:
        await self.watchdog.stop()
        ChannelServer.observer = None
        if self.nftables is not None:
            await self.nftables.stop()
        await self.backup.stop()
        if self._certificate_watch is not None:
            self._certificate_watch.cancel()
        await asyncio.gather(
            *(server.shutdown(SHUTDOWN_GRACE_SECONDS) for _, server in self.servers),
            return_exceptions=True,
        )
        self.servers.clear()
        if self._mta_start is not None:
            self._mta_start.cancel()
            await asyncio.gather(self._mta_start, return_exceptions=True)
        if self.mta is not None:
            await self.mta.stop()
        if self._mta_lock is not None:
            self._mta_lock.release()
        if self.queue is not None:
            await self.queue.close()
        await self.abuse.close()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.registry.close()


async def _start_mx(server: Server, host: str, port: int) -> Listener:
    s = server.settings
    return await serve_smtp(
        host,
        port,
        lambda: MXHandler(server.pipeline, s.primary_domain, server.abuse),
        hostname=s.hostname,
        ssl_context=server.tls_context,
        limits=s.limits,
    )


def _start_submission(implicit_tls: bool) -> Starter:
    async def start(server: Server, host: str, port: int) -> Listener:
        s = server.settings
        # A cluster front has AUTH checked by the user's mailbox node (cluster/portal.py).
        auth = (server.cluster.portal if server.cluster else None) or server.login
        return await serve_smtp(
            host,
            port,
            lambda: SubmissionHandler(
                login=auth,
                directory=server.app.directory,
                pipeline=server.pipeline,
                signer=server.signer,
                queue=server.queue,
                hostname=s.hostname,
                primary_domain=s.primary_domain,
                abuse=server.abuse,
            ),
            hostname=s.hostname,
            ssl_context=server.tls_context,
            implicit_tls=implicit_tls,
            limits=s.limits,
        )

    return start


def _start_imap(implicit_tls: bool) -> Starter:
    async def start(server: Server, host: str, port: int) -> Listener:
        s = server.settings
        return await start_imap_server(
            host,
            port,
            login=server.login,
            registry=server.registry,
            ssl_context=server.tls_context,
            implicit_tls=implicit_tls,
            limits=s.limits,
            hostname=s.hostname,
            admission=server.admission("imap"),
        )

    return start


def _start_pop3(implicit_tls: bool) -> Starter:
    async def start(server: Server, host: str, port: int) -> Listener:
        return await start_pop3_server(
            host,
            port,
            login=server.login,
            ssl_context=server.tls_context,
            implicit_tls=implicit_tls,
            limits=server.settings.limits,
            admission=server.admission("pop3"),
        )

    return start


async def _start_web(server: Server, host: str, port: int) -> Listener:
    return await start_web_server(
        host,
        port,
        settings=server.settings,
        directory_check=server.pipeline.is_local_domain,
        ssl_context=server.tls_context,
        metrics=server.refresh_metrics,
        routes=[
            *WKD(server.app.directory).routes(server.pipeline.is_local_domain),
            *account_routes(
                server.app,
                server.login,
                server.abuse,
                server.resolver,
                server.cluster.portal if server.cluster else None,  # a front: cluster/portal.py
            ),
        ],
    )


STARTERS: dict[str, Starter] = {
    "smtp": _start_mx,
    "submission": _start_submission(implicit_tls=False),
    "submissions": _start_submission(implicit_tls=True),
    "imap": _start_imap(implicit_tls=False),
    "imaps": _start_imap(implicit_tls=True),
    "pop3": _start_pop3(implicit_tls=False),
    "pop3s": _start_pop3(implicit_tls=True),
    "https": _start_web,
}


async def _serve(
    app: App,
    banner: Callable[[config.Settings], str] | None,
    role: workers.Role,
    supervisor: int | None,
) -> int:
    server = Server(app, role)
    try:
        await server.start()
    except StartupError as e:
        print(f"postvern: {e}", file=sys.stderr)
        return 1
    handoff.close_unclaimed()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, Reloader(server).reload)  # ops/reload.py
    if supervisor is not None:
        # A worker: the supervisor prints the ready line, owns postvern.pid and answers
        # SIGUSR2 (workers.py); this process says ready on the pipe it was given.
        workers.watch_supervisor(supervisor, stop.set)
        log.info("worker %d of %d ready", role.index, role.count)
        handoff.tell_predecessor()
        await stop.wait()
        await server.stop()
        return 0
    loop.add_signal_handler(signal.SIGUSR2, handoff.Restart(server, stop.set).request)
    if banner is not None:
        print(banner(app.settings), flush=True)
    handoff.write_pid_file(app.settings.data_dir)
    print(READY_LINE, flush=True)
    handoff.tell_predecessor()  # after a SIGUSR2 restart: the old server stops accepting now
    await stop.wait()
    log.info("shutting down")
    await server.stop()
    handoff.remove_pid_file(app.settings.data_dir)
    return 0


def run(data_dir: Path, banner: Callable[[config.Settings], str] | None = None) -> int:
    no_core_dumps()
    # Until the loop's handlers are in place, a reload or restart request (systemctl reload
    # during start-up) must not stop the server, which is what their default action does.
    for early in (signal.SIGHUP, signal.SIGUSR2):
        signal.signal(early, signal.SIG_IGN)
    role = workers.role_from_environment()
    supervisor = workers.supervisor_pipe()
    if supervisor is None:
        settings = config.load(data_dir)
        count = workers.worker_count(settings)
        if count > 1:
            # The supervisor holds no key: it opens the listeners and runs the workers.
            retention.configure(settings)
            handoff.inherit(settings.listen)
            return asyncio.run(workers.supervise(settings, count, banner, READY_LINE))
    app = App.open(data_dir)
    retention.configure(app.settings)
    workers.label_log_records(role)
    handoff.inherit(app.settings.listen)  # systemd's or a predecessor's sockets (handoff.py)
    if not role.alone:
        workers.balance_accepts()  # the sockets are shared with the other workers
    try:
        loop_factory = event_loop_factory(app.settings.server.event_loop)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(app, banner, role, supervisor))
    finally:
        app.close()
