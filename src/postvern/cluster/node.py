"""Wiring a cluster node into the server (server.py calls :meth:`ClusterNode.attach`).

A **front** keeps every public listener, but its IMAP and POP3 listeners proxy (proxy.py) and
its delivery pipeline writes local copies into the relay queue (relay.py) instead of
mailboxes. A **mailbox** node adds its internal listener (backend.py) at its address in
nodes.toml. Without ``[cluster] role`` nothing here runs: one machine, as before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from postvern.cluster import liveness, move, nodes, pki
from postvern.cluster.admin import ClusterOps
from postvern.cluster.backend import Backend
from postvern.cluster.nodes import CLUSTER_DIR, ClusterError
from postvern.cluster.placement import Placement
from postvern.cluster.portal import PortalClient
from postvern.cluster.proxy import Front, imap_starter, pop3_starter
from postvern.cluster.relay import RELAY_DIR, Relay, RelayRegistry, RelayStore
from postvern.cluster.sharedq import SharedQueue
from postvern.config import ConfigError

if TYPE_CHECKING:
    from postvern.mta.queue import Queue
    from postvern.server import Server

log = logging.getLogger(__name__)


class ClusterNode:
    def __init__(self, server: Server) -> None:
        s = server.settings
        role, name = s.cluster.role, s.cluster.node
        cluster_dir = s.path(CLUSTER_DIR)
        known = nodes.load(cluster_dir)
        me = known.get(name)
        if me is None or me.role != role:
            raise ClusterError(f"node {name!r} is not a {role} node in nodes.toml")
        if s.server.workers not in (0, 1):  # 0, "one per core", is one on a node (workers.py)
            # The relay queue and the internal listener belong to one process; several
            # workers per node would race over both (not built yet).
            raise ClusterError("a cluster node runs as one process: set [server] workers = 1")
        self.node = me
        identity = pki.NodeIdentity.in_dir(cluster_dir)
        placement = Placement(server.app.directory, known)
        executor = server.registry.executor
        self.relay: Relay | None = None
        self.front: Front | None = None
        self.backend: Backend | None = None
        self.portal: PortalClient | None = None  # a front's account portal (portal.py)
        self.shared: SharedQueue | None = None
        # Automatic failover (liveness.py): a mailbox node's lease, a front's watcher.
        self.lease: liveness.NodeLease | None = None
        self.watcher: liveness.Watcher | None = None
        failover_after, redis_url = s.cluster.failover_after, s.abuse.redis_url
        liveness.check_setting(failover_after, redis_url)
        if failover_after and redis_url:
            if role == "front":
                ops = ClusterOps(
                    server.app.directory, known, identity.client_context(move.FAILOVER_ALPN)
                )
                self.watcher = liveness.Watcher(liveness.client(redis_url), name, ops)
            else:
                client = liveness.lease_client(redis_url)
                self.lease = liveness.NodeLease(client, name, failover_after)
        if role == "front":
            self.shared = _shared_queue(server, known)
            store = RelayStore(
                s.path(RELAY_DIR),
                server.app.server_key.derive("cluster relay"),
                self.shared.store if self.shared else None,
            )
            self.relay = Relay(
                store, placement, identity, executor, self.shared.coord if self.shared else None
            )
            if self.shared is not None:
                self.relay.gate = self.shared.gate
                self.shared.relay = store
                self.shared.on_adopted.append(self.relay.wake)
            server.pipeline.registry = RelayRegistry(server.registry, self.relay)  # type: ignore[assignment]
            self.front = Front(
                directory=server.app.directory,
                placement=placement,
                identity=identity,
                gate=server.abuse,
                failure_delay=s.limits.auth_failure_delay,
                executor=executor,
            )
            self.portal = PortalClient(self.front, identity)
        else:
            self.backend = Backend(
                node=me,
                identity=identity,
                placement=placement,
                login=server.login,
                registry=server.registry,
                limits=s.limits,
                server_key=server.app.server_key,
                replicated=lambda: _replicated(server),
                serving=self.lease.serving if self.lease else None,
            )
            if self.lease is not None:
                self.lease.on_fence = self.backend.fence
        self._server = server

    @classmethod
    def attach(cls, server: Server) -> ClusterNode | None:
        """The node this server is, per ``[cluster]``; None on a single machine."""
        if not server.settings.cluster.role:
            return None
        try:
            return cls(server)
        except ClusterError as e:  # said in one line by `postvern serve`, like any config error
            raise ConfigError(f"[cluster] {e}") from None

    def starter(self, name: str, default: Any) -> Any:
        """The listener starter for ``name``: a front proxies IMAP and POP3."""
        if self.front is None:
            return default
        proxies = {
            "imap": imap_starter(self.front, implicit_tls=False),
            "imaps": imap_starter(self.front, implicit_tls=True),
            "pop3": pop3_starter(self.front, implicit_tls=False),
            "pop3s": pop3_starter(self.front, implicit_tls=True),
        }
        return proxies.get(name, default)

    def attach_queue(self, queue: Queue) -> None:
        """The outbound queue, once server.py has opened it: shared too (sharedq.py)."""
        if self.shared is not None:
            queue.shared = self.shared
            self.shared.queue = queue

    async def start(self) -> None:
        if self.shared is not None:
            self.shared.start()  # lease, reconciliation, then watch; nothing sent before
        if self.relay is not None:
            self.relay.start()
        if self.watcher is not None:
            self.watcher.start()
        if self.backend is not None:
            await self._say_stale()
            if self.lease is not None:
                await self.lease.start()  # said if it was failed over; fenced until it holds
            await self.backend.start()
            log.info("mailbox node %s: internal listener on %s", self.node.name, self.node.address)

    async def _say_stale(self) -> None:
        """A node back after a failover or a move keeps its old files: say so at start."""
        app = self._server.app
        stale = await asyncio.to_thread(
            liveness.stale_mailboxes, app.settings.data_dir, app.directory, self.node.name
        )
        if stale:
            log.warning(
                "mailbox node %s holds %d mailbox files of users the directory places on"
                " other nodes (failed over or moved while it was away): it does not serve"
                " them; set them aside",
                self.node.name,
                stale,
            )

    def metrics(self) -> dict[str, float]:
        """Gauges for /metrics (ops/metrics.py): what waits for the mailbox nodes, and what
        went through."""
        if self.relay is not None and self.front is not None:
            return {
                "postvern_cluster_relay_queued": self.relay.queued,
                "postvern_cluster_relayed_total": self.relay.relayed,
                "postvern_cluster_relay_kept": self.relay.kept,
                "postvern_cluster_relay_resent_total": self.relay.resent,
                "postvern_cluster_proxied_sessions_total": self.front.proxied,
                "postvern_cluster_queue_taken_over_total": (
                    self.shared.taken_over if self.shared else 0
                ),
                **_watcher_metrics(self.watcher),
            }
        evicted = len(self.backend.moves.evicted) if self.backend else 0
        return {
            "postvern_cluster_evicted_users": evicted,
            "postvern_cluster_node_serving": int(self.lease.serving()) if self.lease else 1,
        }

    async def stop(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self.lease is not None:
            await self.lease.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self.shared is not None:
            await self.shared.stop()
        if self.backend is not None and self.backend.listener is not None:
            await self.backend.listener.shutdown()


def _shared_queue(server: Server, known: dict[str, nodes.Node]) -> SharedQueue | None:
    """The front's shared queue if ``[cluster] queue_store`` names one (it needs Redis)."""
    s = server.settings
    if not s.cluster.queue_store:
        return None
    if not s.abuse.redis_url:
        raise ClusterError("queue_store needs Redis: set [abuse] redis_url")
    if s.cluster.lease_seconds <= 0:
        raise ClusterError("lease_seconds must be positive")
    me = s.cluster.node
    others = sorted(n.name for n in known.values() if n.role == "front" and n.name != me)
    return SharedQueue.open(
        s.cluster.queue_store, s.abuse.redis_url, me, others,
        server.app.server_key.derive("cluster queue"), s.data_dir, s.cluster.lease_seconds,
    )  # fmt: skip


def _watcher_metrics(watcher: liveness.Watcher | None) -> dict[str, float]:
    """A front's automatic failovers (liveness.py); none when they are off."""
    if watcher is None:
        return {}
    return {
        "postvern_cluster_failover_watching": int(watcher.watching),
        "postvern_cluster_nodes_failed_over_total": watcher.nodes_failed_over,
        "postvern_cluster_users_failed_over_total": watcher.users_failed_over,
        "postvern_cluster_users_not_failed_over_total": watcher.users_not_failed_over,
    }


def _replicated(server: Server) -> float | None:
    """The start of the node's last completed replication to object storage (0.0: none yet
    since it started); None when it does not replicate (no [backup] targets)."""
    backup = server.backup
    return None if backup.service is None else backup.last_point_started
