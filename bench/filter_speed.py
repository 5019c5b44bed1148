"""CPU per message of the content filter, against a reference version measured in the same run.

Judges a fixed, seeded sample of the corpora (bench/filter_equiv.py's) with ``analyse`` and
``decide`` (what the SMTP pipeline runs, without clamd and authentication results), one
process per measurement, on one core: CPU time (time.process_time), the best of
PASSES passes after a warm-up pass. With ``--against REV`` the source tree of that git
revision is measured too, alternating with the working tree round by round, so that both
see the same machine load; the ratio is what the run shows, the absolute figures move with
the load of a shared machine.

    .venv/bin/python bench/filter_speed.py [--against HEAD~1] [--rounds 3] [--size 3000]

Checking that a speed-up changed no verdict is bench/filter_equiv.py's job.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSES = 3
ROUNDS = 3
SAMPLE = 3000


def child(src: Path, sample_file: Path) -> None:
    """Time the filter of the source tree *src* on the pickled sample; print ms/message."""
    sys.path.insert(0, str(src))
    import postvern.filters
    from postvern.filters import FilterSettings, ScanContext, analyse, decide

    if not Path(postvern.filters.__file__).is_relative_to(src):
        raise SystemExit(f"postvern was imported from {postvern.filters.__file__}, not {src}")
    raws: list[bytes] = pickle.loads(sample_file.read_bytes())
    ctx = ScanContext(settings=FilterSettings(), macro_checker=None)

    def run() -> float:
        start = time.process_time()
        for raw in raws:
            decide(analyse(raw, ctx), ctx.settings)
        return time.process_time() - start

    run()  # warm-up: the model's load and the caches
    best = min(run() for _ in range(PASSES))
    print(f"{best / len(raws) * 1e3:.4f}")


def measure(src: Path, sample_file: Path) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(src), str(sample_file)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="git revision to measure beside")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--size", type=int, default=SAMPLE)
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    sys.path.insert(0, str(ROOT / "bench"))
    import filter_equiv

    samples = filter_equiv.sample_of(filter_equiv.train_spam.DEFAULT_CORPORA, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        sample_file = Path(tmp) / "sample.pickle"
        fd = os.open(sample_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            pickle.dump([s.raw for s in samples], f)
        trees = {"working tree": ROOT / "src"}
        if args.against:
            ref = Path(tmp) / "reference"
            ref.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.against, "src"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
            trees = {args.against: ref / "src", **trees}
        figures: dict[str, list[float]] = {name: [] for name in trees}
        loads = []
        print(f"{len(samples)} messages, best of {PASSES} passes per measurement, one core")
        for n in range(args.rounds):
            for name, src in trees.items():
                figures[name].append(measure(src, sample_file))
            loads.append(os.getloadavg()[0])
            row = ", ".join(f"{name} {figures[name][-1]:.3f}" for name in trees)
            print(f"  round {n + 1}: {row} ms/msg (load average {loads[-1]:.1f})")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"{name}: {median:.3f} ms of CPU per message (median), {1e3 / median:,.0f} msg/s")
    if args.against:
        ratio = statistics.median(
            a / b for a, b in zip(figures["working tree"], figures[args.against], strict=True)
        )
        print(f"working tree / {args.against}: {ratio:.3f} of the CPU per message (median)")
    print(f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
