"""``postvern filter check|test``: the content filter tried on stored mail, and the reading of
message files, mbox files and Maildirs behind it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from postvern.filters import Analysis, ScanContext, trial
from test_cli import run
from test_filter_robustness import OWN_MESSAGE, PERSONAL_NOTES, PHISH_HTML, SPAM, html_mail, note

PHISH = html_mail(
    "PayPal Security <security@account-verify.example.net>",
    "Your account has been limited",
    "Dear Customer, verify your account: http://paypal.com.account-verify.example.net/signin",
    PHISH_HTML,
)
HAM = [OWN_MESSAGE, *(note(*parts) for parts in PERSONAL_NOTES.values())]


def mbox(*messages: bytes) -> bytes:
    """An mboxrd file: a "From " line before each message, body "From " lines quoted."""
    out = b""
    for raw in messages:
        body = raw.replace(b"\r\n", b"\n")
        quoted = b"\n".join(b">" + line if line.lstrip(b">").startswith(b"From ") else line
                            for line in body.split(b"\n"))  # fmt: skip
        out += b"From sender@example.org Tue Jun  3 10:00:00 2025\n" + quoted + b"\n"
    return out


def test_messages_are_read_from_files_mboxes_and_maildirs(tmp_path: Path) -> None:
    (tmp_path / "one.eml").write_bytes(OWN_MESSAGE)
    (tmp_path / ".hidden").write_bytes(SPAM)  # editors' and mail tools' state: skipped
    (tmp_path / "box.mbox").write_bytes(mbox(HAM[1], HAM[2]))
    for sub in ("cur", "new", "tmp"):
        (tmp_path / "Maildir" / sub).mkdir(parents=True)
    (tmp_path / "Maildir" / "cur" / "1700000000.M1P1.host:2,S").write_bytes(HAM[3])
    (tmp_path / "Maildir" / "new" / "1700000001.M2P2.host").write_bytes(HAM[4])
    # Not mail: a delivery in progress, the IMAP server's files, a Maildir++ folder.
    (tmp_path / "Maildir" / "tmp" / "1700000002.M3P3.host").write_bytes(HAM[5])
    (tmp_path / "Maildir" / "dovecot-uidlist").write_bytes(b"3 V1700000000 N3\n")
    (tmp_path / "Maildir" / ".Junk" / "cur").mkdir(parents=True)
    (tmp_path / "Maildir" / ".Junk" / "cur" / "1700000003.M4P4.host:2,S").write_bytes(SPAM)
    names = [m.name for m in trial.read_messages(tmp_path)]
    # A directory's files in name order, then its subdirectories'.
    assert [Path(n.split("#")[0]).name for n in names] == [
        "box.mbox", "box.mbox", "one.eml", "1700000000.M1P1.host:2,S", "1700000001.M2P2.host",
    ]  # fmt: skip
    assert names[0].endswith("box.mbox#0") and names[1].endswith("box.mbox#1")
    junk = [m.name for m in trial.read_messages(tmp_path / "Maildir" / ".Junk")]
    assert [Path(n).name for n in junk] == ["1700000003.M4P4.host:2,S"]


def test_mboxrd_quoting_is_undone_and_from_lines_split_messages() -> None:
    body = "Hi,\n\nFrom the minutes:\n>From the archive\nbye\n"
    raw = note("Ann <ann@example.org>", "minutes", body)
    messages = list(trial.mbox_messages(io.BytesIO(mbox(raw, OWN_MESSAGE)), "m"))
    assert [m.name for m in messages] == ["m#0", "m#1"]
    assert b"\nFrom the minutes:\n>From the archive\n" in messages[0].raw
    assert messages[1].raw.startswith(OWN_MESSAGE.replace(b"\r\n", b"\n").split(b"\n")[0])
    # Text before the first "From " line is no message; an empty file holds none.
    assert [m.name for m in trial.mbox_messages(io.BytesIO(b"junk\n" + mbox(raw)))] == ["mbox#0"]
    assert list(trial.mbox_messages(io.BytesIO(b""))) == []


def test_oversized_messages_are_counted_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trial, "MAX_MESSAGE_BYTES", 2000)
    (tmp_path / "big.eml").write_bytes(OWN_MESSAGE + b"x" * 3000)
    (tmp_path / "big.mbox").write_bytes(mbox(OWN_MESSAGE + b"y" * 3000, OWN_MESSAGE))
    tally = trial.run_trial({"ham": [tmp_path]}, ScanContext(macro_checker=None))["ham"]
    assert (tally.messages, tally.skipped) == (1, 2)


def test_a_message_the_filter_fails_on_is_counted_and_the_trial_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def analyse(raw: bytes, ctx: ScanContext) -> Analysis:
        if b"budget" in raw:
            raise RecursionError("too deep")
        return real_analyse(raw, ctx)

    real_analyse = trial.analyse
    monkeypatch.setattr(trial, "analyse", analyse)
    (tmp_path / "a.eml").write_bytes(OWN_MESSAGE)  # "budget meeting"
    (tmp_path / "b.eml").write_bytes(HAM[1])
    tallies = trial.run_trial({"ham": [tmp_path]}, ScanContext(macro_checker=None))
    assert (tallies["ham"].messages, tallies["ham"].failed) == (1, 1)
    assert tallies["ham"].misjudged == [(str(tmp_path / "a.eml"), "not judged: RecursionError")]
    assert "  (1 ham messages the filter failed on, listed below)" in trial.report(tallies)


def test_the_trial_counts_what_the_filter_junks(tmp_path: Path) -> None:
    ctx = ScanContext(macro_checker=None)
    for kind, messages in (("ham", HAM), ("spam", [SPAM]), ("phish", [PHISH])):
        (tmp_path / kind).mkdir()
        for i, raw in enumerate(messages):
            (tmp_path / kind / f"{i}.eml").write_bytes(raw)
    paths = {kind: [tmp_path / kind] for kind in trial.KINDS}
    tallies = trial.run_trial(paths, ctx, shown=5)
    # Each count is what the filter itself says of the message, judged alone.
    for kind, tally in tallies.items():
        verdicts = [trial.judge(m.raw, ctx) for m in trial.read_messages(tmp_path / kind)]
        assert tally.messages == len(verdicts) > 0
        assert tally.junked == sum(v.is_spam for v, _ in verdicts)
        assert tally.junked_by_model == sum(model for _, model in verdicts)
    assert (tallies["ham"].junked, tallies["spam"].junked, tallies["phish"].junked) == (0, 1, 1)
    assert tallies["ham"].misjudged == []
    lines = trial.report(tallies)
    assert lines[1].split()[-2:] == ["0.00%", f"(0/{len(HAM)})"]
    assert lines[2].split()[-2:] == ["100.00%", "(1/1)"]
    assert any(line.startswith("speed: ") for line in lines)


def test_filter_test_and_check_on_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "ham").mkdir()
    for i, raw in enumerate(HAM):
        (tmp_path / "ham" / f"{i}.eml").write_bytes(raw)
    spam = tmp_path / "spam.mbox"
    spam.write_bytes(mbox(SPAM, OWN_MESSAGE))  # one message misfiled as spam
    data = tmp_path / "no-data-dir"  # the defaults when there is no configuration
    r = run(data, "filter", "test", "--ham", str(tmp_path / "ham"), "--spam", str(spam))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[-1] == f"(0/{len(HAM)})" and lines[2].split()[-1] == "(1/2)"
    # The misfiled message is listed with the verdict a user would see in its header.
    listed = lines.index("spam not junked (first 1):")
    assert lines[listed + 1].strip() == f"{spam}#1"
    assert lines[listed + 2].strip().startswith("no; score=")

    r = run(data, "filter", "check", str(spam), str(tmp_path / "ham" / "0.eml"))
    assert r.returncode == 0, r.stderr
    verdicts = [line.split(": ", 1)[1].split(";")[0] for line in r.stdout.splitlines()]
    assert verdicts == ["yes", "no", "no"]


def test_filter_commands_refuse_what_they_cannot_read(tmp_path: Path) -> None:
    r = run(tmp_path, "filter", "check", str(tmp_path / "missing.eml"))
    assert r.returncode == 1
    assert r.stderr == f"postvern: {tmp_path / 'missing.eml'}: no such file or directory\n"
    r = run(tmp_path, "filter", "test")
    assert (r.returncode, r.stderr) == (
        1,
        "postvern: give at least one of --ham, --spam, --phish\n",
    )
    (tmp_path / "empty").mkdir()
    r = run(tmp_path, "filter", "test", "--ham", str(tmp_path / "empty"))
    assert (r.returncode, r.stderr) == (1, "postvern: no messages found\n")
