"""``postvern cluster …``: the internal CA and the node list, on the administrator's machine.

Each command prints one line per result and any failure as one ``postvern: …`` line on
stderr with a non-zero exit, like every other command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from postvern.cluster import admin, liveness, nodes, pki
from postvern.cluster.nodes import CLUSTER_DIR, ClusterError


def cmd_cluster_init(args: argparse.Namespace) -> int:
    cluster_dir = args.data / CLUSTER_DIR
    ca = pki.init_ca(cluster_dir)
    admin.issue_admin(cluster_dir)  # for move and drain: role "admin", stays with the CA
    print(f"internal CA created: {ca} (its key {cluster_dir / pki.CA_KEY} stays here)")
    return 0


def _print_move(report: admin.MoveReport) -> None:
    print(
        f"{report.address}: {report.source} -> {report.target}"
        f" ({report.files} files, {report.bytes} bytes, {report.seconds:.2f} s)"
    )


def cmd_cluster_move(args: argparse.Namespace) -> int:
    mover = admin.Mover(args.data)
    try:
        _print_move(asyncio.run(mover.move(args.user, args.node)))
    finally:
        mover.close()
    return 0


async def _status(mover: admin.Mover) -> list[str]:
    """Every node; with Redis, each mailbox node's liveness lease and automatic failover."""
    redis_url = mover.app.settings.abuse.redis_url
    names = [n.name for n in nodes.mailbox_nodes(mover.nodes)]
    notes = await liveness.describe(redis_url, names) if redis_url else None
    return await mover.status(notes)


def cmd_cluster_status(args: argparse.Namespace) -> int:
    mover = admin.Mover(args.data)
    try:
        lines = asyncio.run(_status(mover))
    finally:
        mover.close()
    for line in lines:
        print(line)
    # A node that answers but is fenced (serving=no: no liveness lease) serves nobody either.
    return 0 if all("DOWN" not in line and "serving=no" not in line for line in lines) else 1


def cmd_cluster_drain(args: argparse.Namespace) -> int:
    mover = admin.Mover(args.data)
    try:
        for report in asyncio.run(mover.drain(args.node)):
            _print_move(report)
    finally:
        mover.close()
    return 0


def cmd_cluster_failover(args: argparse.Namespace) -> int:
    mover = admin.Mover(args.data)
    try:
        reports = asyncio.run(mover.failover(args.node, to=args.to, force=args.force))
    finally:
        mover.close()
    failed = 0
    for r in reports:
        if r.error:
            failed += 1
            print(f"{r.address}: NOT failed over to {r.target}: {r.error}")
        else:
            print(
                f"{r.address}: {r.source} -> {r.target} from the replica of"
                f" {r.point} ({r.files} files, {r.bytes} bytes, {r.seconds:.2f} s)"
            )
    return 1 if failed else 0


def cmd_cluster_rejoin(args: argparse.Namespace) -> int:
    """A mailbox node failed over automatically serves again (its users stay where they are)."""
    mover = admin.Mover(args.data)
    try:
        mover._node(args.node)
        redis_url = mover.app.settings.abuse.redis_url
    finally:
        mover.close()
    if not redis_url:
        raise ClusterError("no Redis ([abuse] redis_url): there is no failover mark to remove")
    if not asyncio.run(liveness.rejoin(redis_url, args.node)):
        raise ClusterError(f"{args.node} is not marked as failed over")
    print(f"{args.node}: may take its lease again; it serves the users the directory places on it")
    return 0


def cmd_cluster_add_node(args: argparse.Namespace) -> int:
    cluster_dir = args.data / CLUSTER_DIR
    node = nodes.check_node(args.name, args.role, args.address, args.replica or "")
    known = nodes.load(cluster_dir)
    folder = pki.issue_node(cluster_dir, node.name, node.role)
    known[node.name] = node
    nodes.save(cluster_dir, known)
    print(f"{node.name}: {node.role} at {node.address}; certificate and key in {folder}")
    return 0


def cmd_cluster_list(args: argparse.Namespace) -> int:
    for node in sorted(nodes.load(args.data / CLUSTER_DIR).values(), key=lambda n: n.name):
        print(f"{node.name}\t{node.role}\t{node.address}")
    return 0


def _guarded(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except (ClusterError, OSError, TimeoutError) as e:
            print(f"postvern: {e}", file=sys.stderr)
            return 1

    return run


def register(sub: Any) -> None:
    """Add the ``cluster`` group to the CLI."""
    p = sub.add_parser("cluster", help="several machines: the internal CA and the nodes")
    g = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    p = g.add_parser("init", help="create the internal CA in DATA/cluster/")
    p.set_defaults(func=_guarded(cmd_cluster_init))
    p = g.add_parser("add-node", help="issue a node its certificate and add it to nodes.toml")
    p.add_argument("name", help="the node's name: one DNS label")
    p.add_argument("--role", required=True, choices=nodes.ROLES)
    p.add_argument(
        "--address",
        required=True,
        metavar="HOST:PORT",
        help="where other nodes reach it (a mailbox node's internal listener)",
    )
    p.add_argument(
        "--replica",
        metavar="URL",
        help="a mailbox node's replication target (its first [backup] target), for failover",
    )
    p.set_defaults(func=_guarded(cmd_cluster_add_node))
    p = g.add_parser("list", help="the nodes of nodes.toml")
    p.set_defaults(func=_guarded(cmd_cluster_list))
    p = g.add_parser(
        "status", help="every node, its users, and whether it answers and serves (exit 1 if not)"
    )
    p.set_defaults(func=_guarded(cmd_cluster_status))
    p = g.add_parser("move", help="move a user's mailbox to another mailbox node, live")
    p.add_argument("user", help="the user's address")
    p.add_argument("node", help="the mailbox node to move to")
    p.set_defaults(func=_guarded(cmd_cluster_move))
    p = g.add_parser("drain", help="move every user of a mailbox node to the others")
    p.add_argument("node")
    p.set_defaults(func=_guarded(cmd_cluster_drain))
    p = g.add_parser(
        "failover", help="bring a dead mailbox node's users back on others from their replicas"
    )
    p.add_argument("node", help="the dead mailbox node")
    p.add_argument("--to", metavar="NODE", help="one node for all (default: spread by hashing)")
    p.add_argument("--force", action="store_true", help="even if the node answers over mutual TLS")
    p.set_defaults(func=_guarded(cmd_cluster_failover))
    p = g.add_parser(
        "rejoin", help="let a mailbox node that was failed over automatically serve again"
    )
    p.add_argument("node", help="the mailbox node (set its old mailbox files aside first)")
    p.set_defaults(func=_guarded(cmd_cluster_rejoin))
