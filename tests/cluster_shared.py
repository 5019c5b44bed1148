"""One real cluster for the whole session, shared by the test modules whose clusters have
the same shape (tests/test_cluster.py, tests/test_cluster_portal.py,
tests/test_cluster_accounts.py).

Starting a cluster (two fronts, two mailbox nodes, PostgreSQL, Redis over TLS) costs about a
minute on a loaded 2-core machine, so those modules share this one instead of each starting
its own. The fixtures are imported into tests/conftest.py: a session-scoped fixture defined in
a test module and imported by another would be made once per importing module.

The fronts carry the union of the settings those modules need; none of them changes what a
test of another module shows:

- ``[accounts] reauth_minutes = 0``: every mailbox action in the portal asks for the password
  again, so a confirmation on one front is seen on the other (test_cluster_portal.py).
- ``[abuse] auth_failures_per_ip = FAILURES_TO_BAN`` with 127.0.0.1 and ::1 allowlisted: a
  guesser from GUESSER is banned quickly while every other test's client (127.0.0.1) never
  is, whatever it got wrong (test_cluster_accounts.py).
- ``[kdf] time_cost = FRONT_TIME_COST``, unlike the mailbox nodes' test parameters: a key
  slot made on a front would carry it (test_cluster_accounts.py).

Order. The tests that share it use their own users or restore what they change (passwords, a
disabled flag, a stopped or killed front or node, a moved user), so they pass in any module
order and alone — except the ones marked ``LAST_MARK`` (test_cluster.py's drain, which leaves
every user on mbx1, and its failover, which restarts the mailbox nodes replicating to
SeaweedFS and then kills mbx1 for good). :func:`order` (called by
conftest's ``pytest_collection_modifyitems``, after every other plugin has ordered and
deselected) puts every test that uses the cluster together where the first of them was, in
file order, with the marked ones last among them, in theirs. Once the last of them is done
:func:`after` stops the nodes (conftest's ``pytest_runtest_teardown``), so four idle nodes do
not replicate and poll through the rest of the session; the session's end stops them again,
which does nothing if they are stopped.
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
# The mark of a test that leaves the shared cluster unfit for others: it runs after them.
LAST_MARK = "last_on_shared_cluster"
FIXTURE = "shared_cluster"

# The session's cluster while its fixture is up (for :func:`after`).
_kits: list[ClusterKit] = []


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
    tmp_path_factory: pytest.TempPathFactory,
    tls_redis: TlsRedis,
    pg_server: PostgresTestServer,
) -> Iterator[ClusterKit]:
    """Two fronts and two mailbox nodes, the directory in PostgreSQL, Redis over TLS, no
    replicas (a front keeps a copy a replicating node acknowledged until it is replicated,
    and test_cluster_accounts.py finds none of a removed user's files anywhere); the fronts
    set as the module docstring says. Every node is running when a test gets it; see the
    module docstring for the order."""
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
        _kits.append(kit)
        try:
            yield kit
        finally:
            _kits.remove(kit)


def _uses(item: pytest.Item) -> bool:
    return FIXTURE in getattr(item, "fixturenames", ())


def order(items: list[pytest.Item]) -> None:
    """The cluster's tests together where the first was; ``LAST_MARK`` ones last of them."""
    users = [item for item in items if _uses(item)]
    if not users:
        return
    at = items.index(users[0])  # every item before it is not a user
    last = [item for item in users if item.get_closest_marker(LAST_MARK)]
    first = [item for item in users if not item.get_closest_marker(LAST_MARK)]
    others = [item for item in items[at:] if not _uses(item)]
    items[at:] = [*first, *last, *others]


def after(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test of the cluster (see :func:`order`): its nodes stopped."""
    if _kits and _uses(item) and (nextitem is None or not _uses(nextitem)):
        _kits[-1].stop_all()
