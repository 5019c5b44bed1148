"""A bounded run of every fuzz target in bench/fuzz (issue #19): seconds, not minutes.

Each target runs under atheris (coverage-guided) for FUZZ_SECONDS in its own process,
starting from a few seeds of the real grammar, and must end without a crash. The long runs
(10 million inputs per target) are ``bench/fuzz/run.py TARGET -runs=10000000``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent.parent / "bench" / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402

# Nine targets run side by side, 3 s each after their start-up: under 30 s on two cores.
FUZZ_SECONDS = 3
SEEDS = {
    "smtp": [b"\x02EHLO a\r\nMAIL FROM:<a@b> BODY=8BITMIME\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n"],
    "imap": [b"\x01a LOGIN u p\r\nb SELECT INBOX\r\nc UID FETCH 1:* (BODY.PEEK[HEADER])\r\n"],
    "pop3": [
        b"\x00CAPA\r\nUSER a@b\r\nQUIT\r\n",
        b"\x02USER a@b\r\nPASS p\r\nSTAT\r\nLIST\r\nUIDL 2\r\nRETR 2\r\nTOP 3 1\r\n"
        b"DELE 1\r\nQUIT\r\n",
        b"\x41STLS\r\nAUTH PLAIN AGFAYgBw\r\nRSET\r\nNOOP\r\nQUIT\r\n",
    ],
    "mime": [b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n"],
    "headers": [b"From: a@b\r\nSubject: =?utf-8?q?x?=\r\n\r\nbody"],
    "dkim": [
        b"v=1; a=rsa-sha256; d=example.org; s=sel; h=from; bh=AA==; b=AA==; i=jlong@example.org",
        b"v=DKIM1; k=rsa; h=sha256; s=email; t=s; g=jl*g; p=AA==",
    ],
    "domainkeys": [b"k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC"],
    "spf": [b"v=spf1 ip4:192.0.2.0/24 include:_spf.example.org mx:%{d} -all"],
    "dmarc": [b"v=DMARC1; p=reject; rua=mailto:d@example.org; pct=50; adkim=s"],
}


def test_every_target_survives_a_bounded_run(tmp_path: Path) -> None:
    """All targets at once, one process each (two cores: the whole run stays under 30 s)."""
    runs = {}
    for name in sorted(targets.TARGETS):
        corpus = tmp_path / name
        corpus.mkdir()
        for i, seed in enumerate(SEEDS[name]):
            (corpus / f"seed{i}").write_bytes(seed)
            targets.TARGETS[name](seed)  # the seeds themselves pass, without instrumentation
        runs[name] = subprocess.Popen(
            [sys.executable, str(FUZZ / "run.py"), name, f"-max_total_time={FUZZ_SECONDS}",
             "-print_final_stats=1", str(corpus)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=corpus,
        )  # fmt: skip
    for name, process in runs.items():
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{name}: {err[-4000:]}"
        assert "stat::number_of_executed_units" in err, name
