"""The HTTPS listener: MTA-STS policy for our domains, autoconfig, hardening headers."""

from __future__ import annotations

import http.client
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import DataDir, ServerProcess, client_tls_context, make_data_dir
from postvern.web import mtasts


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    data = make_data_dir(
        tmp_path_factory.mktemp("web") / "data",
        passwords={},
        listeners=("https", "imaps", "submissions", "submission"),
    )
    with ServerProcess(data):
        yield data


def get(data: DataDir, path: str, host: str) -> http.client.HTTPResponse:
    h, port = data.addr("https")
    conn = http.client.HTTPSConnection(h, port, context=client_tls_context(), timeout=10)
    conn.request("GET", path, headers={"Host": host})
    return conn.getresponse()


def test_mta_sts_policy_for_our_domain_only(web: DataDir) -> None:
    r = get(web, "/.well-known/mta-sts.txt", "mta-sts.example.test")
    assert r.status == 200
    body = r.read().decode()
    assert body.startswith("version: STSv1\r\nmode: testing\r\nmx: mx.example.test\r\n")
    assert "max_age: 604800" in body
    # One HSTS policy for the whole host, the portal's: two years, with subdomains.
    assert r.headers["Strict-Transport-Security"] == "max-age=63072000; includeSubDomains"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert get(web, "/.well-known/mta-sts.txt", "mta-sts.other.test").status == 404


def test_policy_id_is_stable_and_changes_with_the_policy() -> None:
    a = mtasts.policy_text(["mx.example.test"], "testing")
    b = mtasts.policy_text(["mx.example.test"], "enforce")
    assert mtasts.policy_id(a) == mtasts.policy_id(a) != mtasts.policy_id(b)
    assert mtasts.policy_id(a).isalnum() and len(mtasts.policy_id(a)) <= 32


def test_autoconfig_lists_configured_listeners(web: DataDir) -> None:
    r = get(web, "/mail/config-v1.1.xml?emailaddress=alice@example.test", "autoconfig.example.test")
    assert r.status == 200
    root = ET.fromstring(r.read())
    servers = [
        (s.get("type"), s.findtext("socketType"), int(s.findtext("port") or 0))
        for s in root.iter()
        if s.tag in ("incomingServer", "outgoingServer")
    ]
    assert servers == [
        ("imap", "SSL", web.addr("imaps")[1]),
        ("smtp", "SSL", web.addr("submissions")[1]),
        ("smtp", "STARTTLS", web.addr("submission")[1]),
    ]
    assert get(web, "/mail/config-v1.1.xml", "autoconfig.nowhere.test").status == 404


def test_unknown_paths_and_health(web: DataDir, tmp_path: Path) -> None:
    assert get(web, "/etc/passwd", "example.test").status == 404
    r = get(web, "/healthz", "mx.example.test")
    assert r.status == 200 and r.read() == b"ok\n"
