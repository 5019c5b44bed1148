"""The content filter in child processes (``[filters] processes``) on the real MX.

The same verdicts as in a thread: a virus found by clamd (reached from the child's own
event loop) is refused at DATA, clean mail is labelled, a forged verdict is replaced.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clamd import EICAR, ClamdServer
from dnsserver import DNSTestServer
from harness import DataDir, ServerProcess, mailbox_messages, make_data_dir, set_config
from test_mx_filters import ALICE, mail, send


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory, clamd: ClamdServer) -> Iterator[DataDir]:
    with DNSTestServer() as dns:
        dns.add("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        data = make_data_dir(tmp_path_factory.mktemp("mxp") / "data")
        set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
        set_config(data.path, "filters", {"clamd": clamd.unix_address, "processes": 2})
        with ServerProcess(data):
            yield data


def test_virus_refused_from_a_child_process(mx: DataDir) -> None:
    code, text = send(mx, mail("eicar", "see attached", ("eicar.com", EICAR)))
    assert code == 554 and b"virus" in text


def test_clean_mail_labelled_and_forged_verdict_replaced(mx: DataDir) -> None:
    raw = mail("from a child", "Hi Alice,\n\nthe minutes are below.\n").replace(
        b"Subject:", b"X-Postvern-Spam: no score=-100 (trust me)\r\nSubject:", 1
    )
    assert send(mx, raw)[0] == 250
    (got,) = [m for m in mailbox_messages(mx, ALICE, None) if b"from a child" in m]
    assert got.count(b"X-Postvern-Spam:") == 1 and b"score=" in got and b"trust me" not in got
