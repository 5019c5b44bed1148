"""The pure parts of the MTA: MTA-STS record and policy parsing and MX matching, MX ordering,
back-off, DSN construction (read back with the email package), the HTTP response parser,
and the queue's storage rules (encryption at rest, group commit, admin operations)."""

from __future__ import annotations

import asyncio
import collections
import email
import email.policy
import random
import time
from email.message import EmailMessage
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta_kit import status_blocks
from postvern.encdb import WrongKey
from postvern.mta import EntryNotFound, InvalidEnvelope, Queue, QueueRecipient, QueueStore, admin
from postvern.mta.client import Disposition, Outcome, clean_text, enhanced_status, xtext
from postvern.mta.dsn import (
    Action,
    DSNError,
    OriginalMessage,
    RecipientReport,
    build_dsn,
    header_block,
)
from postvern.mta.httpsget import HTTPError, ResponseParser, ResponseTooLarge, build_request
from postvern.mta.mtasts import (
    Mode,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
    parse_txt_records,
)
from postvern.mta.route import MailLoop, NoUsableMX, NullMX, order_mx, refused_host
from postvern.mta.runner import MAX_RETRY_INTERVAL, RETRY_JITTER, retry_delay, wants_notice

KEY = b"k" * 32

# --- MTA-STS --------------------------------------------------------------------------------


def test_txt_record_id() -> None:
    assert parse_txt("v=STSv1; id=20160831085700Z;") == "20160831085700Z"
    assert parse_txt("v=STSv1;id=abc") == "abc"
    assert parse_txt("v=STSv1; id=abc; ext=value") == "abc"


@pytest.mark.parametrize(
    "record",
    [
        "v=STSv2; id=abc",
        "id=abc; v=STSv1",
        "v=STSv1",
        "v=STSv1; id=",
        "v=STSv1; id=has-dash",
        "v=STSv1; id=" + "a" * 33,
        "v=STSv1; id=a; id=b",
        "v=STSv1; garbage",
    ],
)
def test_invalid_txt_records(record: str) -> None:
    with pytest.raises(PolicyError):
        parse_txt(record)


def test_txt_records_other_records_ignored_duplicates_void() -> None:
    assert parse_txt_records([b"v=spf1 -all", b"v=STSv1; id=x1"]) == "x1"
    # RFC 8461 §3.1: more than one STS record means no policy.
    assert parse_txt_records([b"v=STSv1; id=a", b"v=STSv1; id=b"]) is None
    assert parse_txt_records([]) is None
    assert parse_txt_records([b"v=STSv1; id=\xff"]) is None


def test_policy_parsing() -> None:
    text = (
        b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\n"
        b"mx: *.Example.NET\r\nmax_age: 86400\r\n"
    )
    policy = parse_policy(text)
    assert policy.mode is Mode.ENFORCE
    assert policy.mx == ("mail.example.com", "*.example.net")
    assert policy.max_age == 86400
    assert policy.matches("MAIL.example.com.")
    assert policy.matches("mx1.example.net")
    assert not policy.matches("example.net")
    assert not policy.matches("a.b.example.net")


def test_policy_max_age_capped_and_extensions_ignored() -> None:
    policy = parse_policy(b"version: STSv1\nmode: testing\nmx: a.test\nmax_age: 9999999999\nx: y\n")
    assert policy.max_age == 31_557_600
    assert policy.mode is Mode.TESTING


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 1\n").mode is Mode.NONE


@pytest.mark.parametrize(
    "text",
    [
        b"mode: enforce\nmx: a.test\nmax_age: 1\n",  # no version
        b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
        b"version: STSv1\nmode: enforce\nmx: a.test\n",  # no max_age
        b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
        b"version: STSv1\nmode: enforce\nmode: none\nmx: a.test\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: *\nmax_age: 1\n",
        b"version: STSv1\nmode enforce\nmx: a.test\nmax_age: 1\n",
        b"\xff\xfe",
        b"version: STSv1\nmode: enforce\nmax_age: 1\n" + b"mx: a.test\n" * 300,
    ],
)
def test_invalid_policies(text: bytes) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_mx_pattern_matching() -> None:
    assert mx_matches("mx.example.org", "mx.example.org")
    assert mx_matches("*.example.org", "a.example.org")
    assert not mx_matches("*.example.org", "example.org")
    assert not mx_matches("*.example.org", "a.b.example.org")
    assert not mx_matches("*.example.org", ".example.org")
    assert not mx_matches("mx.example.org", "mx.example.org.evil")


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_policy_parser_never_raises_anything_else(data: bytes) -> None:
    try:
        parse_policy(data)
    except PolicyError:
        pass


@given(st.lists(st.binary(max_size=80), max_size=4))
@settings(max_examples=300, deadline=None)
def test_txt_parser_never_raises(records: list[bytes]) -> None:
    parse_txt_records(records)


# --- MX ordering ----------------------------------------------------------------------------


def test_mx_order_by_preference_with_equal_ones_shuffled() -> None:
    records = [(20, "b1.test"), (10, "a.test"), (20, "b2.test"), (30, "c.test")]
    seen: collections.Counter[tuple[str, ...]] = collections.Counter()
    for seed in range(50):
        hosts = order_mx(records, frozenset(), random.Random(seed))
        names = [h.name for h in hosts]
        assert names[0] == "a.test" and names[-1] == "c.test"
        seen[tuple(names[1:3])] += 1
    assert set(seen) == {("b1.test", "b2.test"), ("b2.test", "b1.test")}


def test_null_mx_and_refused_names() -> None:
    with pytest.raises(NullMX):
        order_mx([(0, "")], frozenset(), random.Random(1))
    with pytest.raises(NoUsableMX):
        order_mx([(10, "localhost"), (20, "")], frozenset(), random.Random(1))
    hosts = order_mx([(5, "mx.localhost"), (10, "real.test")], frozenset(), random.Random(1))
    assert [h.name for h in hosts] == ["real.test"]
    assert refused_host("LOCALHOST.") and refused_host("") and not refused_host("mx.test")


def test_own_name_drops_it_and_everything_less_preferred() -> None:
    local = frozenset({"me.test"})
    with pytest.raises(MailLoop):
        order_mx([(10, "me.test"), (20, "other.test")], local, random.Random(1))
    hosts = order_mx(
        [(5, "better.test"), (10, "me.test"), (20, "worse.test")], local, random.Random(1)
    )
    assert [h.name for h in hosts] == ["better.test"]


# --- Back-off and notification rules --------------------------------------------------------


def test_retry_delay_doubles_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    base = 300.0
    for attempts in range(1, 40):
        delay = retry_delay(attempts, base, rng)
        nominal = min(base * 2 ** (attempts - 1), MAX_RETRY_INTERVAL)
        assert nominal * (1 - RETRY_JITTER) <= delay <= nominal * (1 + RETRY_JITTER)
    assert len({round(retry_delay(3, base, rng), 6) for _ in range(20)}) > 1


def test_notify_rules() -> None:
    assert wants_notice(None, "FAILURE") and wants_notice(None, "DELAY")
    assert not wants_notice(None, "SUCCESS")
    assert not wants_notice(frozenset({"NEVER"}), "FAILURE")
    assert wants_notice(frozenset({"SUCCESS"}), "SUCCESS")
    assert not wants_notice(frozenset({"SUCCESS"}), "FAILURE")


# --- Replies --------------------------------------------------------------------------------


def test_reply_classification() -> None:
    assert enhanced_status(550, "5.1.1 No such user") == "5.1.1"
    assert enhanced_status(550, "No such user") == "5.0.0"
    assert enhanced_status(451, "5.1.1 mismatched class") == "4.0.0"
    assert Outcome.from_reply(250, "2.0.0 ok").disposition is Disposition.DELIVERED
    assert Outcome.from_reply(421, "4.3.2 bye").disposition is Disposition.TEMPORARY
    assert Outcome.from_reply(554, "5.7.1 no").diagnostic == "smtp; 554 5.7.1 no"
    assert clean_text("a\r\nb\x00c\tz" + "x" * 1000).startswith("a b c z")
    assert len(clean_text("x" * 1000)) == 512
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"


# --- DSN ------------------------------------------------------------------------------------


ORIGINAL = b"From: a@x.test\r\nSubject: Hi\r\nMessage-ID: <1@x.test>\r\n\r\nBODY-MARKER\r\n"


def _dsn(**kw: object) -> EmailMessage:
    original = OriginalMessage(
        sender="a@x.test",
        message=ORIGINAL,
        arrival=time.time() - 60,
        queue_id="Q1",
        envid=kw.pop("envid", None),  # type: ignore[arg-type]
        ret=kw.pop("ret", None),  # type: ignore[arg-type]
    )
    reports = kw.pop("reports", None) or [
        RecipientReport(
            final_recipient="b@y.test",
            action=Action.FAILED,
            status="5.1.1",
            remote_mta="mx.y.test",
            diagnostic="smtp; 550 5.1.1 " + "very long reason " * 20,
            last_attempt=time.time(),
        )
    ]
    raw = build_dsn("out.x.test", original, reports)  # type: ignore[arg-type]
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    return cast(EmailMessage, email.message_from_bytes(raw, policy=email.policy.default))


def test_dsn_structure() -> None:
    parsed = _dsn(envid="E1")
    assert parsed.get_content_type() == "multipart/report"
    parts = list(parsed.iter_parts())
    types = [p.get_content_type() for p in parts]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = status_blocks(parsed)
    assert blocks[0]["Reporting-MTA"] == "dns; out.x.test"
    assert blocks[0]["Original-Envelope-Id"] == "E1"
    assert blocks[1]["Status"] == "5.1.1"
    # The long diagnostic was folded and unfolds to what the remote said.
    assert " ".join(str(blocks[1]["Diagnostic-Code"]).split()).endswith("very long reason")
    assert "BODY-MARKER" not in parsed.as_string()
    assert "MAILER-DAEMON@out.x.test" in str(parsed["From"])


def test_dsn_ret_full_and_mixed_actions() -> None:
    reports = [
        RecipientReport("b@y.test", Action.FAILED, "5.0.0", diagnostic="X-Postvern; nope"),
        RecipientReport("c@y.test", Action.DELAYED, "4.4.1", will_retry_until=time.time()),
    ]
    parsed = _dsn(ret="FULL", reports=reports)
    assert "Undelivered" in parsed["Subject"]
    parts = list(parsed.iter_parts())
    assert parts[2].get_content_type() == "message/rfc822"
    assert "BODY-MARKER" in parsed.as_string()
    blocks = status_blocks(parsed)
    assert [b["Action"] for b in blocks[1:]] == ["failed", "delayed"]
    assert "Will-Retry-Until" in blocks[2]


def test_dsn_refuses_the_null_sender() -> None:
    original = OriginalMessage(sender="", message=ORIGINAL, arrival=0.0, queue_id="Q")
    report = RecipientReport("b@y.test", Action.FAILED, "5.0.0")
    with pytest.raises(DSNError):
        build_dsn("h.test", original, [report])


def test_dsn_utf8_addresses_use_the_global_type() -> None:
    original = OriginalMessage(sender="ålice@x.test", message=ORIGINAL, arrival=0.0, queue_id="Q")
    raw = build_dsn("h.test", original, [RecipientReport("bøb@y.test", Action.FAILED, "5.1.1")])
    parsed = cast(EmailMessage, email.message_from_bytes(raw, policy=email.policy.default))
    types = [p.get_content_type() for p in parsed.iter_parts()]
    assert types[1] == "message/global-delivery-status"
    assert "utf-8; bøb@y.test".encode() in raw


def test_dsn_injection_in_remote_text_is_neutralised() -> None:
    report = RecipientReport(
        "b@y.test", Action.FAILED, "5.0.0", diagnostic="smtp; 550 x\r\nBcc: victim@z.test"
    )
    original = OriginalMessage(sender="a@x.test", message=ORIGINAL, arrival=0.0, queue_id="Q")
    raw = build_dsn("h.test", original, [report])
    assert b"\r\nBcc:" not in raw


def test_header_block() -> None:
    assert header_block(b"A: 1\nB: 2\n\nbody") == b"A: 1\r\nB: 2\r\n"
    assert header_block(b"A: 1\r\n\r\nbody\r\n\r\nmore") == b"A: 1\r\n"


# --- HTTP response parser -------------------------------------------------------------------


def _parse(data: bytes, chunk: int = 7, **kw: int) -> object:
    parser = ResponseParser(**kw)
    for i in range(0, len(data), chunk):
        response = parser.feed(data[i : i + chunk])
        if response is not None:
            return response
    return parser.eof()


def test_http_content_length_chunked_and_until_close() -> None:
    body = b"version: STSv1\r\n"
    r = _parse(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\n\r\n"
        + body
    )
    assert r.status == 200 and r.body == body and r.media_type == "text/plain"  # type: ignore[attr-defined]
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;x=1\r\nversi\r\nb\r\non: STSv1\r\n\r\n0\r\nT: 1\r\n\r\n"
    )
    assert _parse(chunked).body == body  # type: ignore[attr-defined]
    assert _parse(b"HTTP/1.0 200 OK\r\n\r\n" + body).body == body  # type: ignore[attr-defined]
    assert _parse(b"HTTP/1.1 301 Moved\r\nLocation: x\r\nContent-Length: 0\r\n\r\n").status == 301  # type: ignore[attr-defined]


def test_http_limits_are_enforced_before_reading() -> None:
    with pytest.raises(ResponseTooLarge):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: 65537\r\n\r\n")
    with pytest.raises(ResponseTooLarge):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10001\r\n")
    with pytest.raises(ResponseTooLarge):
        ResponseParser(max_head=100).feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200)
    parser = ResponseParser(max_body=10)
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\n12345")
    with pytest.raises(ResponseTooLarge):
        parser.feed(b"678901")


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    ],
)
def test_http_malformed(data: bytes) -> None:
    with pytest.raises(HTTPError):
        _parse(data)


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_http_parser_never_raises_anything_else(data: bytes) -> None:
    try:
        _parse(b"HTTP/1.1 200 OK\r\n" + data, chunk=13, max_body=200, max_head=300)
    except HTTPError:
        pass


def test_http_request_names_the_port_only_when_needed() -> None:
    assert b"Host: mta-sts.a.test\r\n" in build_request("mta-sts.a.test", "/p")
    assert b"Host: mta-sts.a.test:8443\r\n" in build_request("mta-sts.a.test", "/p", 8443)


# --- Queue storage --------------------------------------------------------------------------


def read_all(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.is_file())


async def test_queue_is_encrypted_at_rest_and_needs_its_key(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    queue = await Queue.open(path, KEY)
    await queue.enqueue(
        "a@x.test", ["plain-recipient@y.test"], b"Subject: s\r\n\r\nPLAINTEXT-MARKER\r\n"
    )
    on_disk = await asyncio.to_thread(read_all, tmp_path)
    assert b"PLAINTEXT-MARKER" not in on_disk
    assert b"plain-recipient" not in on_disk
    await queue.close()
    with pytest.raises(WrongKey):
        QueueStore.open(path, b"z" * 32)
    with QueueStore.open(path, KEY) as store:
        assert store.pending_count() == 1


async def test_enqueue_validates_the_envelope(tmp_path: Path) -> None:
    queue = await Queue.open(tmp_path / "q.sqlite", KEY)
    try:
        for bad in (
            dict(mail_from="not an address", recipients=["b@y.test"]),
            dict(mail_from="a@x.test", recipients=[]),
            dict(mail_from="a@x.test", recipients=["postmaster"]),
            dict(mail_from="a@x.test", recipients=["b@-bad-.test"]),
            dict(
                mail_from="a@x.test",
                recipients=[QueueRecipient("b@y.test", notify=frozenset({"SOMETIMES"}))],
            ),
        ):
            with pytest.raises(InvalidEnvelope):
                await queue.enqueue(bad["mail_from"], bad["recipients"], b"x")  # type: ignore[arg-type]
        with pytest.raises(InvalidEnvelope):
            await queue.enqueue("a@x.test", ["b@y.test"], b"x", ret="SOME")
        assert await queue.pending_count() == 0
        # Duplicates collapse; IDNA domains are routed by their A-label.
        queue_id = await queue.enqueue("", ["b@y.test", "b@y.test", "c@bücher.test"], b"x")
        info = await queue.info(queue_id)
        assert info is not None
        assert [r.address for r in info.recipients] == ["b@y.test", "c@bücher.test"]
        assert info.recipients[1].domain == "xn--bcher-kva.test"
    finally:
        await queue.close()


async def test_concurrent_enqueues_share_commits(tmp_path: Path) -> None:
    queue = await Queue.open(tmp_path / "q.sqlite", KEY)
    try:
        ids = await asyncio.gather(
            *(queue.enqueue("a@x.test", [f"u{n}@y.test"], b"m") for n in range(50))
        )
        assert len(set(ids)) == 50
        assert await queue.pending_count() == 50
        # A failing write in the same batch does not undo the others.
        results = await asyncio.gather(
            queue.enqueue("a@x.test", ["ok@y.test"], b"m", queue_id="SAME"),
            queue.enqueue("a@x.test", ["dup@y.test"], b"m", queue_id="SAME"),
            return_exceptions=True,
        )
        assert results[0] == "SAME" and isinstance(results[1], Exception)
        assert await queue.pending_count() == 51
    finally:
        await queue.close()


async def test_admin_list_show_retry_delete(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    queue = await Queue.open(path, KEY)
    message = b"Subject: Admin test\r\nFrom: a@x.test\r\n\r\nADMIN-BODY-SECRET\r\n"
    first = await queue.enqueue("a@x.test", ["b@y.test", "c@z.test"], message, envid="E7")
    second = await queue.enqueue("", ["d@y.test"], b"Subject: other\r\n\r\nbody\r\n")
    await queue.close()

    # The CLI opens its own store on the file.
    with QueueStore.open(path, KEY) as store:
        entries = admin.list_entries(store)
        assert [e.id for e in entries] == [first, second]
        assert entries[0].sender == "a@x.test" and entries[1].sender == "<>"
        assert [r.address for r in entries[0].recipients] == ["b@y.test", "c@z.test"]
        assert all(r.state == "pending" for r in entries[0].recipients)
        text = admin.format_list(entries)
        assert first in text and "b@y.test" in text
        assert "ADMIN-BODY-SECRET" not in text

        detail = admin.show_entry(store, first)
        assert detail.envid == "E7"
        assert "Subject: Admin test" in detail.headers
        shown = admin.format_detail(detail)
        assert "Subject: Admin test" in shown and "ADMIN-BODY-SECRET" not in shown

        store.conn.execute("UPDATE recipients SET next_attempt = next_attempt + 3600")
        assert admin.retry_entries(store, first) == 2
        assert all(
            r.next_attempt is not None and r.next_attempt <= time.time()
            for r in admin.show_entry(store, first).summary.recipients
        )
        assert admin.retry_entries(store) == 3

        admin.delete_entry(store, second)
        assert [e.id for e in admin.list_entries(store)] == [first]
        with pytest.raises(EntryNotFound):
            admin.delete_entry(store, second)
        with pytest.raises(EntryNotFound):
            admin.show_entry(store, "NOPE")
        with pytest.raises(EntryNotFound):
            admin.retry_entries(store, "NOPE")
        assert admin.format_list([]) == ""
