"""Run inside a network namespace of its own (``unshare -n``): bans mirrored into nftables.

Lays out the table the Ansible role creates, starts the real server with
``[abuse] nftables_set``, scans two of its listeners from 127.0.0.1, and reports as JSON
whether the kernel set got the address, whether the kernel then dropped a new connection,
and whether lifting the ban took the element out again. Never run it outside a namespace:
tests/test_ops_portscan.py starts it with ``unshare -n``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import ServerProcess, make_data_dir, set_config

TABLE = """
table inet postvern {
    set banned { type ipv4_addr; flags interval, timeout; }
    set banned6 { type ipv6_addr; flags interval, timeout; }
    chain input {
        type filter hook input priority -10; policy accept;
        ip saddr @banned drop
        ip6 saddr @banned6 drop
    }
}
"""


def in_set() -> bool:
    out = subprocess.run(["nft", "list", "set", "inet", "postvern", "banned"], capture_output=True)
    return b"127.0.0.1" in out.stdout


def wait(condition, seconds: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def connects(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return True
    except OSError:
        return False


def main() -> None:
    assert open("/proc/self/ns/net").fileno()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["nft", "-f", "-"], input=TABLE.encode(), check=True)
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data_dir(Path(tmp) / "data", passwords={}, listeners=("smtp", "imap"))
        set_config(data.path, "abuse", {"allowlist": [], "scan_listeners": 2,
                                        "nftables_set": "inet postvern banned"})  # fmt: skip
        with ServerProcess(data):
            for name in ("smtp", "imap"):  # touch two listeners, say nothing
                with socket.create_connection(data.addr(name), timeout=5):
                    pass
            result["in_kernel_set"] = wait(in_set)
            result["dropped"] = not connects(data.addr("smtp"))
            cli = [sys.executable, "-m", "postvern.cli", "--data", str(data.path)]
            subprocess.run([*cli, "ban", "remove", "127.0.0.1"], check=True, capture_output=True)
            result["lifted"] = wait(lambda: not in_set())
            result["connects_again"] = connects(data.addr("smtp"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
