"""The administrator's side of ``postvern cluster move`` and ``drain`` (move.py is the nodes').

Run where the CA lives (``DATA/cluster/``, with its admin certificate) and the directory is
reachable (``DATA/postvern.toml``). A move:

1. marks the user as moving in the directory;
2. EVICT on the source node: its sessions end with BYE [UNAVAILABLE], its mailbox closes,
   and from now on it refuses the user (fronts keep new mail queued, clients retry);
3. EXPORT from the source, IMPORT into the target: the encrypted files as they are;
4. flips the map source → target by compare-and-set (which also clears "moving");
5. RELEASE on the source: the old files go aside under ``moved/``.

A failure before step 4 undoes what was done (the target's partial copy set aside, the
source serving again); after it, the user already lives on the target.

A failover (``postvern cluster failover DEAD``) has no source to ask: it checks that the node
does not answer over mutual TLS, then for each of its users has the new node RESTORE the
user from the dead node's replica (failover.py) and flips the map by compare-and-set; the
fronts then send what the replica lacks. The same code (:class:`ClusterOps`) runs in a front
for an automatic failover (liveness.py), with the front's certificate instead of the admin's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from postvern.app import App
from postvern.cluster import move, nodes, pki
from postvern.cluster.nodes import CLUSTER_DIR, ClusterError, Node
from postvern.cluster.placement import Placement, rendezvous
from postvern.directory.db import Directory, User

log = logging.getLogger(__name__)
T = TypeVar("T")

ADMIN_NAME = "admin"  # the administrator's certificate: role "admin", kept with the CA
# Evicting waits up to move.EVICT_GRACE on the node; a copy of a large mailbox takes longer.
REQUEST_TIMEOUT = 600.0
# A node that does not answer `cluster status` within this is reported down.
PROBE_TIMEOUT = 5.0
# A failover restores this many users at once: each restore waits on object storage and on
# the new node's disk, so a few overlap well, and the node's worker threads stay free for
# the users it already serves.
FAILOVER_PARALLEL = 4


def issue_admin(cluster_dir: Path) -> Path:
    return pki.issue_node(cluster_dir, ADMIN_NAME, "admin")


def admin_identity(cluster_dir: Path) -> pki.NodeIdentity:
    folder = cluster_dir / pki.NODES_SUBDIR / ADMIN_NAME
    return pki.NodeIdentity(
        cluster_dir / pki.CA_CERT, folder / pki.NODE_CERT, folder / pki.NODE_KEY
    )


class NodeSession:
    """One admin connection to a mailbox node."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, node: Node, context: ssl.SSLContext) -> NodeSession:
        host, port = node.hostport
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=node.name, limit=1 << 20
        )
        return cls(reader, writer)

    async def _answer(self) -> str:
        line = (await self.reader.readline()).decode("ascii", "replace").rstrip("\r\n")
        if not line.startswith("OK"):
            raise ClusterError(f"the node refused: {line or 'connection closed'}")
        return line

    async def request(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        async with asyncio.timeout(REQUEST_TIMEOUT):
            return await self._answer()

    async def transfer(self, user_id: str, target: NodeSession) -> tuple[int, int]:
        """EXPORT from this node straight into IMPORT on ``target``, a piece at a time;
        (files, bytes)."""
        count = int((await self.request(f"EXPORT {user_id}")).split(" ")[1])
        target.writer.write(f"IMPORT {user_id} {count}\r\n".encode())
        total = 0
        async with asyncio.timeout(REQUEST_TIMEOUT):
            for _ in range(count):
                head = await self.reader.readline()
                parts = head.decode("ascii", "replace").split(" ")
                if len(parts) != 3 or parts[0] != "FILE":
                    raise ClusterError("malformed EXPORT")
                target.writer.write(head)
                remaining = int(parts[2])
                total += remaining
                while remaining:
                    chunk = await self.reader.read(min(move.CHUNK, remaining))
                    if not chunk:
                        raise ClusterError("the source node closed inside a file")
                    target.writer.write(chunk)
                    await target.writer.drain()
                    remaining -= len(chunk)
            await self._answer()
            await target._answer()
        return count, total

    def close(self) -> None:
        self.writer.close()


@dataclass
class MoveReport:
    address: str
    source: str
    target: str
    files: int
    bytes: int
    seconds: float


@dataclass
class FailoverReport:
    address: str
    source: str
    target: str
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    point: str = ""  # when the replica's point was taken (UTC)
    error: str = ""


class ClusterOps:
    """Failover and probes, for the administrator (:class:`Mover`, the admin certificate)
    and for a front's watcher (liveness.py, the front's certificate, ALPN
    ``postvern-failover``). The watcher runs inside a server's event loop, so the directory
    is asked in a worker thread here."""

    def __init__(
        self, directory: Directory, known: dict[str, Node], context: ssl.SSLContext
    ) -> None:
        self.directory = directory
        self.nodes = known
        self.placement = Placement(directory, known)
        self.context = context

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def _node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None or node.role != "mailbox":
            raise ClusterError(f"{name!r} is not a mailbox node in nodes.toml")
        return node

    async def failover(
        self,
        dead_name: str,
        *,
        to: str | None = None,
        force: bool = False,
        among: list[str] | None = None,
        fenced_ok: bool = False,
    ) -> list[FailoverReport]:
        """Every user of the dead node restored on another from its replica, the map flipped.

        Refused while the node answers over mutual TLS (it may still be serving), unless
        ``force``, or ``fenced_ok`` and it says it serves nobody (its liveness lease is gone:
        liveness.py). The users are spread over ``among`` (default: every other mailbox
        node), or all go ``to`` one. A user whose restore fails stays on the dead node (its
        mail waits in the fronts' queues) and is reported; running again retries only those."""
        dead = self._node(dead_name)
        if not dead.replica:
            raise ClusterError(f"nodes.toml names no replica for {dead.name} (add-node --replica)")
        state = await self._probe(dead)
        fenced = fenced_ok and state.endswith(" serving=no")
        if not state.startswith("DOWN") and not fenced and not force:
            raise ClusterError(
                f"{dead.name} answers over mutual TLS ({state}): not failing over a live node"
                " (cluster move or drain it; --force if its data is lost anyway)"
            )
        others = [n for n in nodes.mailbox_nodes(self.nodes) if n.name != dead.name]
        if among is not None:
            others = [n for n in others if n.name in among]
        if to is not None:
            others = [self._node(to)]
        if not others or dead in others:
            raise ClusterError("no other mailbox node to fail over to")
        users = await self._db(self.directory.users_on_node, dead.name)
        at_once = asyncio.Semaphore(FAILOVER_PARALLEL)

        async def one(user: User) -> FailoverReport:
            async with at_once:
                return await self._fail_over(user, dead, rendezvous(user.id, others))

        return list(await asyncio.gather(*(one(u) for u in users)))

    async def _fail_over(self, user: User, dead: Node, target: Node) -> FailoverReport:
        """One user: RESTORE on the target, then the map flipped by compare-and-set."""
        directory = self.directory
        report = FailoverReport(user.address, dead.name, target.name)
        started = time.monotonic()
        await self._db(directory.set_user_moving, user.id, True)
        try:
            session = await NodeSession.open(target, self.context)
            try:
                answer = await session.request(f"RESTORE {user.id} {dead.replica}")
            finally:
                session.close()
            _, _, files, size, created = answer.split(" ")
            if not await self._db(directory.move_mailbox_node, user.id, dead.name, target.name):
                raise ClusterError("the user's node changed during the failover")
        except (OSError, ClusterError, TimeoutError, ssl.SSLError, ValueError) as e:
            await self._db(directory.set_user_moving, user.id, False)
            report.error = str(e) or type(e).__name__
            return report
        report.files, report.bytes = int(files), int(size)
        report.point = datetime.fromtimestamp(float(created), UTC).isoformat(" ", "seconds")
        report.seconds = time.monotonic() - started
        return report

    async def status(self, notes: dict[str, str] | None = None) -> list[str]:
        """One line per node: role, address, users placed there, and whether it answers;
        then ``notes`` for the node, if any (its liveness lease: liveness.py)."""
        placed = await self._db(self.directory.mailbox_nodes)
        lines = []
        for node in sorted(self.nodes.values(), key=lambda n: n.name):
            line = f"{node.name}\t{node.role}\t{node.address}"
            if node.role == "mailbox":
                line += f"\tusers={placed.get(node.name, 0)}\t{await self._probe(node)}"
            if notes and notes.get(node.name):
                line += f"\t{notes[node.name]}"
            lines.append(line)
        return lines

    async def _probe(self, node: Node) -> str:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                session = await NodeSession.open(node, self.context)
                try:
                    return "up " + (await session.request("STATUS")).removeprefix("OK ")
                finally:
                    session.close()
        except (OSError, ClusterError, TimeoutError, ssl.SSLError) as e:
            return f"DOWN ({type(e).__name__})"


class Mover(ClusterOps):
    """The administrator's commands, where the CA and its admin certificate live."""

    def __init__(self, data_dir: Path) -> None:
        self.app = App.open(data_dir)
        cluster_dir = data_dir / CLUSTER_DIR
        context = admin_identity(cluster_dir).client_context(move.ALPN)
        super().__init__(self.app.directory, nodes.load(cluster_dir), context)

    def close(self) -> None:
        self.app.close()

    async def move(self, address: str, target_name: str) -> MoveReport:
        started = time.monotonic()
        target = self._node(target_name)
        user = self.app.directory.user(address)
        if user is None:
            raise ClusterError(f"no user {address}")
        source = self.placement.node_for(user.id)
        if source.name == target.name:
            return MoveReport(address, source.name, target.name, 0, 0, 0.0)
        directory = self.app.directory
        directory.set_user_moving(user.id, True)
        src = await NodeSession.open(source, self.context)
        dst: NodeSession | None = None
        flipped = imported = False
        try:
            await src.request(f"EVICT {user.id}")
            dst = await NodeSession.open(target, self.context)
            # The target installs the files only once all have arrived (move._install).
            count, size = await src.transfer(user.id, dst)
            imported = True
            if not directory.move_mailbox_node(user.id, source.name, target.name):
                raise ClusterError("the user's node changed during the move")
            flipped = True
            await src.request(f"RELEASE {user.id} moved")
        except BaseException:
            src.close()
            if dst is not None:
                dst.close()
            if not flipped:
                await self._undo(user.id, source, target if imported else None)
            raise
        src.close()
        dst.close()
        return MoveReport(
            address, source.name, target.name, count, size, time.monotonic() - started
        )

    async def _undo(self, user_id: str, source: Node, target: Node | None) -> None:
        """Serve the user from the source again (fresh connections: the old ones may have
        stopped mid-file); ``target``: set aside the copy it had installed."""
        log.warning("move abandoned; the source node serves the user again")
        self.app.directory.set_user_moving(user_id, False)
        try:
            for node, how in ((target, "moved"), (source, "stay")):
                if node is not None:
                    session = await NodeSession.open(node, self.context)
                    try:
                        await session.request(f"RELEASE {user_id} {how}")
                    finally:
                        session.close()
        except (OSError, ClusterError, TimeoutError, ssl.SSLError):
            log.exception("undoing the move failed; check both nodes")

    async def drain(self, node_name: str) -> list[MoveReport]:
        """Move every user of ``node_name`` to the other mailbox nodes (rendezvous)."""
        self._node(node_name)
        others = [n for n in nodes.mailbox_nodes(self.nodes) if n.name != node_name]
        if not others:
            raise ClusterError("no other mailbox node to drain to")
        reports = []
        for user in self.app.directory.users_on_node(node_name):
            reports.append(await self.move(user.address, rendezvous(user.id, others).name))
        return reports
