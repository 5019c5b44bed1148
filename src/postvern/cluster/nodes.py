"""The cluster's node list: ``cluster/nodes.toml``, the same file on every node.

``postvern cluster add-node`` writes it on the administrator's machine; every node reads it to
find the others (a front: the mailbox nodes' internal addresses; a mailbox node: its own).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from postvern.config import ConfigError, parse_hostport

CLUSTER_DIR = "cluster"
NODES_FILE = "nodes.toml"
ROLES = ("front", "mailbox")
# A node name is a certificate's DNS name and a file name: one DNS label, lower case.
NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# host:port, [v6]:port: written into nodes.toml unquoted-safe.
ADDRESS = re.compile(r"[A-Za-z0-9.\-]+:[0-9]+|\[[0-9A-Fa-f:.]+\]:[0-9]+")
# A mailbox node's replica: the object-storage URL its replication writes to (its first
# [backup] target), read by a failover. No quotes, spaces or newlines: written unquoted-safe.
REPLICA = re.compile(r"(s3|file)://[A-Za-z0-9._~%+\-/:?&=\[\]]+")


class ClusterError(Exception):
    """The cluster's files are missing or say something impossible."""


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    role: str  # "front" or "mailbox"
    address: str  # host:port (a mailbox node's internal listener; a front's, informational)
    replica: str = ""  # a mailbox node's replication target (failover.py); "" if none

    @property
    def hostport(self) -> tuple[str, int]:
        return parse_hostport(self.address)


def check_name(name: str) -> str:
    if not NODE_NAME.fullmatch(name):
        raise ClusterError(f"{name!r}: a node name is one lower-case DNS label (a-z, 0-9, -)")
    return name


def check_node(name: str, role: str, address: str, replica: str = "") -> Node:
    check_name(name)
    if replica and (role != "mailbox" or not REPLICA.fullmatch(replica)):
        raise ClusterError(f"{name}: a replica is an s3:// or file:// URL, for a mailbox node")
    if role not in ROLES:
        raise ClusterError(f"{name}: role must be one of {', '.join(ROLES)}, not {role!r}")
    try:
        parse_hostport(address)
        if not ADDRESS.fullmatch(address):
            raise ConfigError(f"{address!r}: expected host:port")
    except ConfigError as e:
        raise ClusterError(f"{name}: {e}") from None
    return Node(name, role, address, replica)


def load(cluster_dir: Path) -> dict[str, Node]:
    """Every node of ``cluster_dir/nodes.toml`` by name (empty if there is none yet)."""
    path = cluster_dir / NODES_FILE
    if not path.exists():
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ClusterError(f"{path}: {e}") from None
    table = raw.get("nodes", {})
    if not isinstance(table, dict):
        raise ClusterError(f"{path}: [nodes] must be a table")
    nodes = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ClusterError(f"{path}: [nodes.{name}] must be a table")
        nodes[name] = check_node(
            name, str(entry.get("role")), str(entry.get("address")), str(entry.get("replica", ""))
        )
    return nodes


def save(cluster_dir: Path, nodes: dict[str, Node]) -> None:
    """Rewrite ``nodes.toml`` (names and roles are checked, so no quoting can break it)."""
    lines = ["# Written by `postvern cluster add-node`; the same file goes to every node.", ""]
    for node in sorted(nodes.values(), key=lambda n: n.name):
        lines += [f"[nodes.{node.name}]", f'role = "{node.role}"']
        lines += [f'address = "{node.address}"']
        lines += [f'replica = "{node.replica}"', ""] if node.replica else [""]
    (cluster_dir / NODES_FILE).write_text("\n".join(lines))


def mailbox_nodes(nodes: dict[str, Node]) -> list[Node]:
    return [n for n in nodes.values() if n.role == "mailbox"]
