"""Benchmark: describe() against the stdlib email parser, over the MIME test corpus.

Prints messages per second and MB/s for ``postvern.mime.describe`` and for
``email.message_from_bytes(policy=compat32)`` (the baseline, which builds the tree but
computes no BODYSTRUCTURE and no offsets), their ratio, and the time for one ~10 KB
message. Run: ``.venv/bin/python bench/mime_parse.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import email
import os
import time
from email import policy
from pathlib import Path

from postvern.mime import describe

CORPUS = next(
    (
        Path(c)
        for c in (
            os.environ.get("POSTVERN_MIME_CORPUS", ""),
            str(Path(__file__).resolve().parents[2] / "shared" / "corpora" / "mime"),
        )
        if c and Path(c).is_dir()
    ),
    Path("/work/shared/corpora/mime"),
)
EXPECTED_OUTPUTS = (".xml", ".out", "LICENSE", "NOTICE", "README", ".gitattributes")


def corpus() -> list[bytes]:
    files = [
        p
        for p in sorted(CORPUS.rglob("*"))
        if p.is_file()
        and not p.name.endswith(EXPECTED_OUTPUTS)
        and "_decoded_" not in p.name
        and "/output/" not in str(p)
    ]
    return [p.read_bytes() for p in files]


def rate(fn, messages: list[bytes], rounds: int) -> float:
    """Best-of-rounds messages per second."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for raw in messages:
            fn(raw)
        best = min(best, time.perf_counter() - start)
    return len(messages) / best


def stdlib(raw: bytes) -> object:
    return email.message_from_bytes(raw, policy=policy.compat32)


def ten_kb_message() -> bytes:
    text = ("The quick brown fox jumps over the lazy dog. " * 20 + "\r\n") * 5
    return (
        "From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\n"
        "Subject: =?utf-8?q?b=C3=A9nchmark?=\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        "Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n"
        "--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>" + text + "</p>\r\n--b1--\r\n"
    ).encode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    messages = corpus()
    megabytes = sum(map(len, messages)) / 1e6
    ours = rate(describe, messages, args.rounds)
    base = rate(stdlib, messages, args.rounds)
    print(f"corpus: {len(messages)} messages, {megabytes:.1f} MB")
    print(
        f"describe():              {ours:9.0f} msg/s  {ours * megabytes / len(messages):7.1f} MB/s"
    )
    print(
        f"email.message_from_bytes:{base:9.0f} msg/s  {base * megabytes / len(messages):7.1f} MB/s"
    )
    print(f"ratio describe/stdlib:   {ours / base:9.2f}x")
    one = ten_kb_message()
    per_sec = rate(describe, [one] * 200, args.rounds)
    base_one = rate(stdlib, [one] * 200, args.rounds)
    print(
        f"~{len(one) // 1024} KB message: describe() {1e6 / per_sec:.0f} us, "
        f"stdlib {1e6 / base_one:.0f} us ({per_sec / base_one:.1f}x)"
    )


if __name__ == "__main__":
    main()
