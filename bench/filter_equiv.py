"""Score equivalence of the content filter across a change that must not change answers.

A speed-up of the filter must leave every verdict as it was. This script judges a fixed,
seeded sample of the corpora (ham, spam and phishing from every source) and either saves,
per message, the exact score, the action, the model's probability and every hit (code,
points, detail), or compares the same against a saved dump: every score equal within
SCORE_TOLERANCE and every hit list identical, in order.

    .venv/bin/python bench/filter_equiv.py --save /tmp/filter-before.jsonl   # at the old code
    .venv/bin/python bench/filter_equiv.py --check /tmp/filter-before.jsonl  # after the change

The dump is not committed: it belongs to the model and weights of the moment. A change of
the model or of a rule's weight is expected to show here; a change of speed is not.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tools"))

import train_spam  # noqa: E402
from postvern.filters import FilterSettings, ScanContext, analyse, decide  # noqa: E402

# Large enough that every source and most rules appear many times; small enough to run in
# about a minute on a shared machine.
SAMPLE = 4000
SEED = 13
# Float sums may differ in the last bits if an optimisation reorders additions; nothing
# a verdict could notice.
SCORE_TOLERANCE = 1e-9


def sample_of(corpora: Path, size: int) -> list[train_spam.Sample]:
    samples = train_spam.load_corpora(corpora)
    return sorted(random.Random(SEED).sample(samples, min(size, len(samples))), key=lambda s: s.key)


def judge(sample: train_spam.Sample, ctx: ScanContext) -> dict[str, object]:
    analysis = analyse(sample.raw, ctx)
    verdict = decide(analysis, ctx.settings)
    return {
        "key": sample.key,
        "kind": sample.kind,
        "total": sum(h.points for h in verdict.hits),
        "score": verdict.score,
        "action": verdict.action,
        "probability": analysis.spam_probability,
        "hits": [[h.code, h.points, h.detail] for h in verdict.hits],
        "findings": [str(f) for f in analysis.findings],
    }


def differences(old: dict[str, object], new: dict[str, object]) -> list[str]:
    """What differs between two judgements of the same message (empty: equivalent)."""
    out = []
    for name in ("total", "probability"):
        a, b = old[name], new[name]
        if (a is None) != (b is None) or (
            a is not None and abs(float(a) - float(b)) > SCORE_TOLERANCE  # type: ignore[arg-type]
        ):
            out.append(f"{name} {a!r} -> {b!r}")
    for name in ("score", "action", "findings"):
        if old[name] != new[name]:
            out.append(f"{name} {old[name]!r} -> {new[name]!r}")
    old_hits, new_hits = old["hits"], new["hits"]
    assert isinstance(old_hits, list) and isinstance(new_hits, list)
    same = len(old_hits) == len(new_hits) and all(
        a[0] == b[0] and a[2] == b[2] and abs(a[1] - b[1]) <= SCORE_TOLERANCE
        for a, b in zip(old_hits, new_hits, strict=True)
    )
    if not same:
        out.append(f"hits {old_hits!r} -> {new_hits!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=Path, default=train_spam.DEFAULT_CORPORA)
    parser.add_argument("--size", type=int, default=SAMPLE)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--save", type=Path, help="write the judgements here")
    what.add_argument("--check", type=Path, help="compare with the judgements saved here")
    args = parser.parse_args(argv)

    ctx = ScanContext(settings=FilterSettings(), macro_checker=None)
    samples = sample_of(args.corpora, args.size)
    judged = [judge(s, ctx) for s in samples]
    if args.save:
        with args.save.open("w") as f:
            f.writelines(json.dumps(j) + "\n" for j in judged)
        print(f"saved {len(judged)} judgements to {args.save}")
        return 0
    saved = {j["key"]: j for j in map(json.loads, args.check.read_text().splitlines())}
    bad = 0
    for new in judged:
        old = saved.get(str(new["key"]))
        diff = ["not in the saved dump"] if old is None else differences(old, new)
        if diff:
            bad += 1
            if bad <= 20:
                print(f"{new['key']}: " + "; ".join(diff))
    kinds = {k: sum(1 for j in judged if j["kind"] == k) for k in ("ham", "spam", "phish")}
    print(
        f"{len(judged)} messages ({kinds['ham']} ham, {kinds['spam']} spam, "
        f"{kinds['phish']} phishing): {len(judged) - bad} equivalent, {bad} different"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
