"""Fixtures shared by every test module."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import cluster_shared
from clamd import clamd_fixture
from cluster_shared import shared_cluster, tls_redis
from dnsserver import dns_server
from harness import DataDir, make_data_dir
from pg_server import pg_database, pg_server
from seaweed import seaweed

# Shared fixtures defined in helper modules: a real clamd, a loopback DNS server, SeaweedFS,
# a private PostgreSQL (once per session) and a fresh database of it, and the one cluster (with
# its TLS Redis) that the cluster test modules of the same shape share (tests/cluster_shared.py).
__all__ = [
    "clamd_fixture",
    "data_dir",
    "dns_server",
    "pg_database",
    "pg_server",
    "seaweed",
    "shared_cluster",
    "tls_redis",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{cluster_shared.LAST_MARK}: runs after every other test of the shared cluster",
    )


@pytest.hookimpl(trylast=True)  # after deselection and any other plugin's order
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    cluster_shared.order(items)  # the shared cluster's tests together (cluster_shared.py)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    cluster_shared.after(item, nextitem)  # its nodes stopped after its last test


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    """A fresh data directory (postvern init) with users alice and bob on example.test."""
    return make_data_dir(tmp_path / "data")


@pytest.fixture(autouse=True)
def _umask_kept() -> Iterator[None]:
    """A test that runs ``cli.main`` in-process leaves the command's umask 077 behind; the
    next tests' files for other programs (a Dovecot passwd file read by its auth user)
    must not depend on which tests ran first."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)
