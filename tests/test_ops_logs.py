"""Logs (issue #19): JSON lines, network and account pseudonyms under a random key per day,
keys and files destroyed after retention, and ``postvern logs search`` within the window.

The server runs for real with ``[log] directory`` and ``format = "json"``; a failed login
from loopback puts a client and an account in its log, which must name neither — and which
the search must find again from the address and the day.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import smtplib
from pathlib import Path

import pytest

from harness import DataDir, ServerProcess, client_tls_context, make_data_dir, set_config
from postvern import cli
from postvern.abuse import subject
from postvern.ops import logs, retention

RETENTION = 30


def run_cli(argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved_stdin = os.sys.stdin  # type: ignore[attr-defined]
    umask = os.umask(0o077)
    try:
        if stdin is not None:
            os.sys.stdin = io.StringIO(stdin)  # type: ignore[attr-defined]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        os.sys.stdin = saved_stdin  # type: ignore[attr-defined]
        os.umask(umask)
    return code, out.getvalue(), err.getvalue()


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("postvern.test", logging.INFO, __file__, 1, "login failed", (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


# -- the pieces ------------------------------------------------------------------------------


def test_daily_keys_are_random_per_day_and_shared_by_processes(tmp_path: Path) -> None:
    one = retention.DailyKeys(tmp_path, RETENTION)
    two = retention.DailyKeys(tmp_path, RETENTION)  # another worker process's view
    today = datetime.date(2026, 12, 7)
    assert one.key(today) == two.key(today)
    assert one.key(today) != one.key(today - datetime.timedelta(days=1))
    assert len(one.key(today)) == 32
    assert oct((tmp_path / "2026-12-07.key").stat().st_mode & 0o777) == "0o600"


def test_keys_and_files_past_retention_are_destroyed(tmp_path: Path) -> None:
    now = datetime.datetime(2026, 12, 7, 12, tzinfo=datetime.UTC).timestamp()
    keys = retention.DailyKeys(tmp_path / "keys", RETENTION, clock=lambda: now)
    kept, gone = datetime.date(2026, 11, 7), datetime.date(2026, 11, 6)
    (tmp_path / "keys").mkdir()
    for day in (kept, gone):
        (tmp_path / "keys" / f"{day}.key").write_bytes(b"k" * 32)
        (tmp_path / f"postvern-{day}.log").write_text("x\n")
    handler = retention.DailyFileHandler(tmp_path, keys)
    removed = {p.name for p in handler.prune()}
    assert removed == {f"postvern-{gone}.log", f"{gone}.key"}
    with pytest.raises(retention.RetentionError):
        keys.existing(gone)
    assert keys.existing(kept)


def test_a_pseudonym_depends_on_the_day_key() -> None:
    days = {datetime.date(2026, 12, 6): b"a" * 32, datetime.date(2026, 12, 7): b"b" * 32}
    formatter = logs.AnonymisingFormatter(days.__getitem__, json_lines=True)
    rec = record(**subject(ip="198.51.100.9", account="Alice@Example.org"))
    rec.created = datetime.datetime(2026, 12, 7, 8, tzinfo=datetime.UTC).timestamp()
    line = json.loads(formatter.format(rec))
    assert line["ip"] == logs.pseudonym(b"b" * 32, "ip", "198.51.100.9")
    assert line["ip"] == logs.pseudonym(b"b" * 32, "ip", "198.51.100.200")  # same /24
    assert line["account"] == logs.pseudonym(b"b" * 32, "account", "alice@example.org")
    assert "198.51.100" not in json.dumps(line) and "alice" not in json.dumps(line).lower()
    rec.created -= 86400
    assert json.loads(formatter.format(rec))["ip"] != line["ip"]  # yesterday: another name


# -- the running server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, dns_module: str) -> DataDir:
    data = make_data_dir(
        tmp_path_factory.mktemp("logs") / "data",
        passwords={"alice@example.test": "alice-correct-horse"},
        listeners=("submissions",),
    )
    set_config(data.path, "abuse", {"allowlist": []})
    set_config(data.path, "dns", {"nameservers": [dns_module]})
    set_config(data.path, "log", {"directory": "logs", "format": "json"})
    # A day long past retention left a key and a file behind: the server removes both.
    old = datetime.date.today() - datetime.timedelta(days=RETENTION + 5)
    (data.path / "logs" / "keys").mkdir(parents=True)
    (data.path / "logs" / "keys" / f"{old}.key").write_bytes(b"k" * 32)
    (data.path / "logs" / f"postvern-{old}.log").write_text("{}\n")
    data.old_day = old  # type: ignore[attr-defined]
    with ServerProcess(data) as server:
        host, port = data.addr("submissions")
        with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=10) as s:
            with contextlib.suppress(smtplib.SMTPAuthenticationError):
                s.login("alice@example.test", "wrong-password")
    data.stderr = server.output  # type: ignore[attr-defined]
    return data


@pytest.fixture(scope="module")
def dns_module() -> object:
    from dnsserver import DNSTestServer

    with DNSTestServer() as server:
        yield server.nameserver


def lines_of(data: DataDir) -> list[dict[str, object]]:
    found = []
    for path in sorted((data.path / "logs").glob("postvern-*.log")):
        found += [json.loads(line) for line in path.read_text().splitlines()]
    return found


def test_log_files_are_json_lines_naming_no_one(logged: DataDir) -> None:
    lines = lines_of(logged)
    failed = [line for line in lines if line["message"] == "login failed"]
    assert failed and str(failed[0]["ip"]).startswith("n-") and failed[0]["account"]
    text = (logged.path / "logs").joinpath(f"postvern-{str(failed[0]['time'])[:10]}.log")
    # Our own listening address may be named; no client's is.
    raw = "".join(line for line in text.read_text().splitlines() if "listening for" not in line)
    assert "127.0.0" not in raw and "alice" not in raw.lower()
    assert oct(text.stat().st_mode & 0o777) == "0o600"
    # The same JSON lines went to stderr (journald).
    assert any('"message": "login failed"' in line for line in logged.stderr)  # type: ignore[attr-defined]


def test_the_server_destroyed_what_is_past_retention(logged: DataDir) -> None:
    old = logged.old_day  # type: ignore[attr-defined]
    assert not (logged.path / "logs" / "keys" / f"{old}.key").exists()
    assert not (logged.path / "logs" / f"postvern-{old}.log").exists()
    code, _, err = run_cli(
        ["--data", str(logged.path), "logs", "search", "--ip", "127.0.0.1", "--day", str(old)]
    )
    assert code == 1 and "retention" in err


def test_search_finds_a_client_by_address_and_day(logged: DataDir) -> None:
    failed = next(line for line in lines_of(logged) if line["message"] == "login failed")
    day = str(failed["time"])[:10]
    argv = ["--data", str(logged.path), "logs", "search", "--day", day]
    code, out, _ = run_cli([*argv, "--ip", "127.0.0.1"])
    assert code == 0 and '"message": "login failed"' in out
    code, out, _ = run_cli([*argv, "--account", "Alice@example.test"])
    assert code == 0 and '"message": "login failed"' in out
    code, out, err = run_cli([*argv, "--ip", "192.0.2.1"])
    assert code == 0 and out == "" and "no lines" in err


def test_search_reads_journal_lines_from_stdin(logged: DataDir) -> None:
    failed = next(line for line in lines_of(logged) if line["message"] == "login failed")
    day = str(failed["time"])[:10]
    journal = "\n".join(logged.stderr) + "\n"  # type: ignore[attr-defined]
    argv = ["--data", str(logged.path), "logs", "search", "--day", day, "--stdin"]
    code, out, _ = run_cli([*argv, "--ip", "127.0.0.1"], stdin=journal)
    assert code == 0 and "login failed" in out
