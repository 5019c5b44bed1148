"""Evaluate the content filter on the held-out part of the spam and phishing corpora.

Prints, for the fixed evaluation split of tools/train_spam.py (sha256(path) % 5 == 0):
spam recall and ham false-positive rate of the shipped model alone and of the whole
verdict (model + phishing rules + attachments; no authentication results, the corpora
have none that verify), phishing recall per corpus and per language (English, the only
language the training ham is in, or another) with false positives measured on the
same-era ham, messages per second on one core (CPU time, the best of three passes), and
the same figures for a baseline (a plain multinomial naive Bayes over raw lower-case
tokens, trained on the same training part, threshold chosen the same way) measured in
this run.

With ``--loso`` it then scores each source of the training part (an Enron mailbox, CSDMC,
each phishing corpus) with a model trained without it: the closest the corpora come to
mail from elsewhere.

    .venv/bin/python bench/filter_eval.py [--corpora DIR] [--limit N] [--loso]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tools"))

import train_spam  # noqa: E402
from postvern.filters import FilterSettings, ScanContext, analyse  # noqa: E402
from postvern.filters.content import read_content  # noqa: E402
from postvern.filters.features import language_of, spam_features  # noqa: E402
from postvern.filters.spam import JUNK_POINTS, logit_points  # noqa: E402
from postvern.filters.trial import judge  # noqa: E402
from timing import best_of  # noqa: E402

# Speed is the best of this many passes over the held-out part, for filter and baseline.
TIMED_PASSES = 3
GOALS = "goals: spam recall >= 97% at ham FP <= 0.2%; phishing recall >= 95%; >= 1000 msg/s"
_RAW_TOKEN = re.compile(rb"[a-z0-9$!]{2,20}")


def _rate(flags: list[bool]) -> str:
    if not flags:
        return "   n/a"
    return f"{100.0 * sum(flags) / len(flags):6.2f}% ({sum(flags)}/{len(flags)})"


class Baseline:
    """Multinomial naive Bayes over lower-case byte tokens of the whole raw message."""

    ALPHA = 1.0

    def __init__(self, messages: list[bytes], labels: list[int]) -> None:
        counts: list[Counter[bytes]] = [Counter(), Counter()]
        docs = [0, 0]
        for raw, label in zip(messages, labels, strict=True):
            counts[label].update(self.tokens(raw))
            docs[label] += 1
        vocabulary = set(counts[0]) | set(counts[1])
        totals = [sum(c.values()) + self.ALPHA * len(vocabulary) for c in counts]
        self.weights = {
            t: math.log((counts[1][t] + self.ALPHA) / totals[1])
            - math.log((counts[0][t] + self.ALPHA) / totals[0])
            for t in vocabulary
        }
        self.prior = math.log(docs[1] / docs[0])

    @staticmethod
    def tokens(raw: bytes) -> list[bytes]:
        return _RAW_TOKEN.findall(raw[: 256 * 1024].lower())

    def score(self, raw: bytes) -> float:
        weights = self.weights
        return self.prior + sum(weights.get(t, 0.0) for t in self.tokens(raw))


def baseline_threshold(messages: list[bytes], labels: list[int]) -> float:
    """The training-part threshold for the baseline, by 5-fold cross-validation."""
    scores = [0.0] * len(messages)
    for fold in range(train_spam.CV_FOLDS):
        part = [i for i in range(len(messages)) if i % train_spam.CV_FOLDS != fold]
        model = Baseline([messages[i] for i in part], [labels[i] for i in part])
        for i in range(fold, len(messages), train_spam.CV_FOLDS):
            scores[i] = model.score(messages[i])
    return train_spam.threshold_for(scores, labels, train_spam.TARGET_TRAIN_FP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=Path, default=train_spam.DEFAULT_CORPORA)
    parser.add_argument("--limit", type=int, default=0, help="evaluate at most N messages")
    parser.add_argument(
        "--loso", action="store_true", help="also leave-one-source-out on the training part"
    )
    args = parser.parse_args(argv)

    samples = train_spam.load_corpora(args.corpora)
    train = [s for s in samples if s.part == "train"]
    held_out = [s for s in samples if s.part == "eval"]
    if args.limit:
        held_out = held_out[:: max(1, len(held_out) // args.limit)]
    print(f"corpora: {args.corpora}  training part {len(train)}  evaluation part {len(held_out)}")

    # The filter: every check, no virus scanner, no macro child process (speed is the
    # content filter's own; clamd and olevba run elsewhere).
    ctx = ScanContext(settings=FilterSettings(), macro_checker=None)
    analyse(held_out[0].raw, ctx)  # load the model before timing

    def judge_all() -> list[tuple[train_spam.Sample, bool, bool]]:
        results = []
        for sample in held_out:
            verdict, model_junks = judge(sample.raw, ctx)
            results.append((sample, model_junks, verdict.is_spam))
        return results

    filter_seconds, results = best_of(TIMED_PASSES, judge_all, time.process_time)
    english = {s.key: language_of(spam_features(read_content(s.raw))) == "en" for s in held_out}

    print("training the baseline (multinomial NB, raw tokens) on the training part ...")
    base_threshold = baseline_threshold([s.raw for s in train], [int(s.is_spam) for s in train])
    baseline = Baseline([s.raw for s in train], [int(s.is_spam) for s in train])
    base_seconds, base_flags = best_of(
        TIMED_PASSES,
        lambda: [baseline.score(s.raw) >= base_threshold for s in held_out],
        time.process_time,
    )

    def pick(kind: str, sources: tuple[str, ...], language: bool | None, column: int):
        rows = [
            (r, b)
            for r, b in zip(results, base_flags, strict=True)
            if r[0].kind == kind
            and (not sources or r[0].source in sources)
            and (language is None or english[r[0].key] == language)
        ]
        return [r[column] if column < 3 else b for r, b in rows]

    print()
    print(GOALS)
    print(f"{'':34}{'model alone':>22}{'full verdict':>22}{'baseline NB':>22}")
    lines: list[tuple[str, str, tuple[str, ...], bool | None]] = [
        ("ham false positives (2000-10)", "ham", (), None),
        ("  enron ham", "ham", ("enron",), None),
        ("  csdmc ham", "ham", ("csdmc",), None),
        ("spam recall (all)", "spam", (), None),
        ("  enron spam", "spam", ("enron",), None),
        ("  csdmc spam", "spam", ("csdmc",), None),
        ("  in English", "spam", (), True),
        ("  in other languages", "spam", (), False),
        ("phishing recall (all)", "phish", (), None),
        ("  nazario 2004-05", "phish", ("nazario",), None),
        ("  phishing_pot 2022-26", "phish", ("phishing_pot",), None),
        ("  in English", "phish", (), True),
        ("  in other languages", "phish", (), False),
    ]
    for label, kind, sources, language in lines:
        cells = [_rate(pick(kind, sources, language, column)) for column in (1, 2, 3)]
        print(f"{label:34}" + "".join(f"{c:>22}" for c in cells))
    n = len(held_out)
    speed, base_speed = n / filter_seconds, n / max(base_seconds, 1e-9)
    print()
    print(
        f"speed, one core (best of {TIMED_PASSES} passes): filter {speed:,.0f} msg/s, "
        f"baseline {base_speed:,.0f} msg/s (filter/baseline = {speed / base_speed:.2f})"
    )
    if args.loso:
        print()
        source_report(train, ctx)
    return 0


def source_report(train: list[train_spam.Sample], ctx: ScanContext) -> None:
    """Leave-one-source-out on the training part: each source (an Enron mailbox, CSDMC, a
    phishing corpus) scored by a model trained without it, at the threshold and
    calibration the training tool would choose; the full verdict adds the rules' points
    (phishing, attachments) of each message to the model's."""
    print("leave-one-source-out on the training part (fits 12 models) ...")
    corpus = train_spam.corpus_of(train)
    labels = corpus.labels
    cv = train_spam.cross_validated_scores(corpus)
    calibration = train_spam.platt([c.z for c in cv], labels)
    threshold, _ = train_spam.calibrated_threshold(
        cv, calibration, labels, train_spam.TARGET_TRAIN_FP
    )
    logits = train_spam._logits(train_spam.source_held_out_scores(corpus), calibration, threshold)
    rules = [
        sum(h.points for h in analyse(s.raw, ctx).hits if h.code != "SPAM_MODEL") for s in train
    ]
    marks = [
        (logit >= threshold, logit_points(logit, threshold) + points >= JUNK_POINTS)
        for logit, points in zip(logits, rules, strict=True)
    ]
    english = [language == "en" for language in corpus.languages]
    print(f"{'unseen source':40}{'model alone':>22}{'full verdict':>22}")
    for source in sorted(set(corpus.groups)):
        for kind in ("ham", "spam", "phish"):
            for language, name in ((None, ""), (True, ", in English"), (False, ", other")):
                if language is not None and kind != "phish":
                    continue
                rows = [
                    m for m, s, en in zip(marks, train, english, strict=True)
                    if s.group == source and s.kind == kind
                    and (language is None or en == language)
                ]  # fmt: skip
                if rows:
                    what = "fp" if kind == "ham" else "recall"
                    cells = [_rate([r[c] for r in rows]) for c in (0, 1)]
                    label = f"  {source} {kind} {what}{name}"
                    print(f"{label:40}" + "".join(f"{c:>22}" for c in cells))
    ham = [m for m, y in zip(marks, labels, strict=True) if y == 0]
    cells = [_rate([r[c] for r in ham]) for c in (0, 1)]
    print(f"{'  all ham fp (pooled)':40}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    raise SystemExit(main())
