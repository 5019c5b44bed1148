"""One real cluster for the whole session, shared by the test modules whose clusters have
the same shape (tests/test_cluster_portal.py, tests/test_cluster_accounts.py).

Starting a cluster (two fronts, two mailbox nodes, PostgreSQL, Redis over TLS) costs about a
minute on a 2-core machine, so those modules share this one instead of each starting its
own. The fixtures are imported into tests/conftest.py: a session-scoped fixture defined in a
test module and imported by another would be made once per importing module.

The fronts carry the union of the settings those modules need; none of them changes what a
test of the other module shows:

- ``[accounts] reauth_minutes = 0``: every mailbox action in the portal asks for the password
  again, so a confirmation on one front is seen on the other (test_cluster_portal.py).
- ``[abuse] auth_failures_per_ip = FAILURES_TO_BAN`` with 127.0.0.1 and ::1 allowlisted: a
  guesser from GUESSER is banned quickly while every other test's client (127.0.0.1) never
  is, whatever it got wrong (test_cluster_accounts.py).
- ``[kdf] time_cost = FRONT_TIME_COST``, unlike the mailbox nodes' test parameters: a key
  slot made on a front would carry it (test_cluster_accounts.py).

The tests that share it use their own users or restore what they change (passwords, a
disabled flag, a stopped node), so they pass in any module order and alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster_kit import FRONTS, ClusterKit, TlsRedis, build
from harness import TEST_KDF, set_config
from pg_server import PostgresTestServer

# The fronts ban a client after this many failed logins (the default is 10): a guesser
# reaches it quickly. It comes from its own loopback address, so no other test's client is
# banned with it.
FAILURES_TO_BAN = 3
GUESSER = "127.0.0.3"
# The fronts are given Argon2id parameters of their own, unlike the mailbox nodes' (the test
# ones): a key slot made on a front would carry these.
FRONT_TIME_COST = int(TEST_KDF["time_cost"]) + 1


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """redis-server over verified TLS, for the shared cluster and the tests that look in it."""
    server = TlsRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_cluster(
    tmp_path_factory: pytest.TempPathFactory, tls_redis: TlsRedis, pg_server: PostgresTestServer
) -> Iterator[ClusterKit]:
    """Two fronts and two mailbox nodes, the directory in PostgreSQL, Redis over TLS, no
    replicas; the fronts set as the module docstring says. Every node is running."""
    kit = build(
        tmp_path_factory.mktemp("cluster"),
        redis_url=tls_redis.url,
        directory=pg_server.new_database().settings(),
    )
    for front in FRONTS:
        path = kit.nodes[front].path
        set_config(path, "accounts", {"reauth_minutes": 0})
        abuse = {"auth_failures_per_ip": FAILURES_TO_BAN, "allowlist": ["127.0.0.1", "::1"]}
        set_config(path, "abuse", abuse)
        set_config(path, "kdf", {"time_cost": FRONT_TIME_COST})
    with kit.running():
        yield kit
