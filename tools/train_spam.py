"""Train the shipped spam model from /work/shared/corpora/{spam,phishing}.

Reads only the spam and phishing corpora (see corpora/README.md), splits every message by a
hash of its path into a training part (80%) and an evaluation part (20%) that never changes,
fits a linear SVM over tf-idf plus a naive Bayes term on the runtime's own features
(postvern.filters.features), calibrates it (Platt scaling) and picks the junk threshold on
cross-validated scores of the training part only, and writes
src/postvern/filters/spam_model.json.gz. scikit-learn and numpy are needed here, never at
runtime: the runtime scores the exported weights in pure Python. The output is
reproducible: same corpora, same bytes.

    .venv/bin/python tools/train_spam.py [--corpora DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from postvern.filters.content import read_content  # noqa: E402
from postvern.filters.features import spam_features  # noqa: E402
from postvern.filters.spam import MODEL_FORMAT, weigh_evidence  # noqa: E402

DEFAULT_CORPORA = Path(os.environ.get("POSTVERN_CORPORA", "/work/shared/corpora"))
DEFAULT_OUT = ROOT / "src" / "postvern" / "filters" / "spam_model.json.gz"

# One message in five is held out for evaluation; the choice is a hash of the message's
# path, so it is the same on every machine and in every run.
EVAL_ONE_IN = 5
# The junk threshold is the logit above which at most this share of *training* ham lies
# (cross-validated): the 0.2% false-positive goal, chosen without the held-out part.
TARGET_TRAIN_FP = 0.002
# Features seen in fewer training messages than this are noise or names.
MIN_DOCUMENT_FREQUENCY = 3
CV_FOLDS = 5
# Chosen by cross-validation on the training part: SVM regularisation, the weight of the
# naive Bayes term (it orders the far tail of ham better than the SVM alone) and its
# smoothing.
SVM_C = 2.0
NB_SCALE = 0.02
NB_ALPHA = 0.1


@dataclass(frozen=True, slots=True)
class Sample:
    key: str  # path relative to the corpora root (mbox: "path#index")
    source: str  # enron | csdmc | nazario | phishing_pot
    kind: str  # ham | spam | phish
    raw: bytes

    @property
    def is_spam(self) -> bool:
        return self.kind != "ham"

    @property
    def part(self) -> str:
        return split_of(self.key)


def split_of(key: str) -> str:
    digest = hashlib.sha256(key.encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "big") % EVAL_ONE_IN == 0 else "train"


# Enron-Spam lost its URLs to tokenisation ("http : / / www . example . com"); joining them
# back lets the same URL features work on it as on real messages.
_BROKEN_URL = re.compile(
    rb"\b(https?) : / / ((?:[a-z0-9-]+ \. )+[a-z]{2,6})((?: / [a-z0-9_%~-]+)*)", re.I
)


def enron_message(data: bytes) -> bytes:
    """An Enron-Spam file (a Subject line, then the body) as an RFC 5322 message."""
    first, _, body = data.replace(b"\r\n", b"\n").partition(b"\n")
    subject = first[len(b"Subject:") :].strip() if first.startswith(b"Subject:") else b""
    if not first.startswith(b"Subject:"):
        body = data
    body = _BROKEN_URL.sub(
        lambda m: (
            m.group(1) + b"://" + m.group(2).replace(b" ", b"") + m.group(3).replace(b" ", b"")
        ),
        body,
    )
    head = b"Subject: " + subject + b"\nContent-Type: text/plain; charset=latin-1\n\n"
    return head + body


def mbox_messages(data: bytes) -> Iterator[bytes]:
    """Messages of an mbox file (mboxrd ">From " unquoting)."""
    chunks = re.split(rb"(?m)^From [^\n]*\n", data)
    for chunk in chunks:
        if chunk.strip():
            yield re.sub(rb"(?m)^>(>*From )", rb"\1", chunk)


def load_corpora(root: Path) -> list[Sample]:
    samples: list[Sample] = []
    for folder in sorted((root / "spam" / "enron").glob("enron*/*am")):
        kind = "ham" if folder.name == "ham" else "spam"
        for path in sorted(folder.iterdir()):
            key = str(path.relative_to(root))
            samples.append(Sample(key, "enron", kind, enron_message(path.read_bytes())))
    for kind in ("ham", "spam"):
        for path in sorted((root / "spam" / "csdmc2010" / kind).iterdir()):
            samples.append(Sample(str(path.relative_to(root)), "csdmc", kind, path.read_bytes()))
    for path in sorted((root / "phishing" / "nazario").glob("*.mbox")):
        for i, raw in enumerate(mbox_messages(path.read_bytes())):
            key = f"{path.relative_to(root)}#{i}"
            samples.append(Sample(key, "nazario", "phish", raw))
    for path in sorted((root / "phishing" / "phishing_pot").glob("*.eml")):
        samples.append(
            Sample(str(path.relative_to(root)), "phishing_pot", "phish", path.read_bytes())
        )
    return samples


def featurize(raw: bytes) -> list[str]:
    return sorted(spam_features(read_content(raw)))


def featurize_all(samples: list[Sample], workers: int = 2) -> list[list[str]]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(featurize, [s.raw for s in samples], chunksize=64))


@dataclass
class Fitted:
    """A model as the runtime sees it (postvern.filters.spam.ShippedModel)."""

    features: list[str]
    svm: list[float]  # SVM weight x idf, per feature
    idf: list[float]
    nb: list[float]  # naive Bayes log-ratio of presence, per feature
    bias: float

    def raw_score(self, doc: list[str]) -> tuple[float, int]:
        """Exactly ShippedModel.raw_score: (z, number of known features)."""
        index = self.index
        num = norm = naive = 0.0
        known = 0
        for feature in doc:
            i = index.get(feature)
            if i is not None:
                known += 1
                num += self.svm[i]
                norm += self.idf[i] ** 2
                naive += self.nb[i]
        z = self.bias + (num / math.sqrt(norm) if norm else 0.0) + NB_SCALE * naive
        return z, known

    @property
    def index(self) -> dict[str, int]:
        if not hasattr(self, "_index"):
            self._index = {f: i for i, f in enumerate(self.features)}
        return self._index


def fit(docs: list[list[str]], labels: list[int]) -> Fitted:
    """Fit the SVM (tf-idf, L2 rows) and the naive Bayes term on binary features."""
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer
    from sklearn.svm import LinearSVC

    vectorizer = CountVectorizer(
        analyzer=lambda d: d, binary=True, min_df=MIN_DOCUMENT_FREQUENCY, dtype=np.float64
    )
    matrix = vectorizer.fit_transform(docs)
    y = np.asarray(labels)
    tfidf = TfidfTransformer(sublinear_tf=True).fit(matrix)
    svm = LinearSVC(C=SVM_C, random_state=0, max_iter=5000).fit(tfidf.transform(matrix), y)

    n_spam, n_ham = int((y == 1).sum()), int((y == 0).sum())
    in_spam = np.asarray(matrix[y == 1].sum(axis=0)).ravel()
    in_ham = np.asarray(matrix[y == 0].sum(axis=0)).ravel()
    # Naive Bayes over present features only: log of how much likelier a feature is in
    # spam than in ham. (The Bernoulli form's absent-feature terms would make the score of
    # a short message mostly prior; they ordered the ham tail worse in cross-validation.)
    nb = np.log(((in_spam + NB_ALPHA) / (n_spam + 2 * NB_ALPHA))
                / ((in_ham + NB_ALPHA) / (n_ham + 2 * NB_ALPHA)))  # fmt: skip
    nb_bias = 0.0

    idf = tfidf.idf_
    return Fitted(
        features=[str(f) for f in vectorizer.get_feature_names_out()],
        svm=[round(float(v), 5) for v in svm.coef_[0] * idf],
        idf=[round(float(v), 4) for v in idf],
        nb=[round(float(v), 4) for v in nb],
        bias=float(svm.intercept_[0]) + NB_SCALE * nb_bias,
    )


def cross_validated_scores(docs: list[list[str]], labels: list[int]) -> list[tuple[float, int]]:
    """(z, known features) of every training message, from a model that did not see it."""
    scores = [(0.0, 0)] * len(docs)
    for fold in range(CV_FOLDS):
        train = [i for i in range(len(docs)) if i % CV_FOLDS != fold]
        model = fit([docs[i] for i in train], [labels[i] for i in train])
        for i in range(fold, len(docs), CV_FOLDS):
            scores[i] = model.raw_score(docs[i])
        print(f"  fold {fold + 1}/{CV_FOLDS} done", file=sys.stderr)
    return scores


def threshold_for(scores: list[float], labels: list[int], fp_rate: float) -> float:
    """The lowest score above which at most *fp_rate* of ham scores lie."""
    ham = sorted((s for s, y in zip(scores, labels, strict=True) if y == 0), reverse=True)
    allowed = int(len(ham) * fp_rate)
    return ham[allowed] + 1e-6


def platt(scores: list[float], labels: list[int]) -> tuple[float, float]:
    """Platt scaling: logistic regression of the label on the cross-validated score."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e6).fit(np.asarray(scores).reshape(-1, 1), labels)
    return float(model.coef_[0][0]), float(model.intercept_[0])


def export(
    path: Path,
    model: Fitted,
    threshold_logit: float,
    calibration: tuple[float, float],
    meta: dict[str, object],
) -> None:
    document = {
        "format": MODEL_FORMAT,
        "bias": round(model.bias, 6),
        "nb_scale": NB_SCALE,
        "threshold_logit": round(threshold_logit, 6),
        "platt": [round(calibration[0], 6), round(calibration[1], 6)],
        "meta": meta,
        "features": model.features,
        "svm": model.svm,
        "idf": model.idf,
        "nb": model.nb,
    }
    data = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    # mtime=0: the gzip bytes depend on the model only (reproducible builds).
    path.write_bytes(gzip.compress(data.encode(), compresslevel=9, mtime=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    started = time.monotonic()
    samples = [s for s in load_corpora(args.corpora) if s.part == "train"]
    print(f"training messages: {len(samples)}", file=sys.stderr)
    docs = featurize_all(samples)
    labels = [int(s.is_spam) for s in samples]
    print(f"features extracted in {time.monotonic() - started:.0f}s", file=sys.stderr)

    cv_scores = cross_validated_scores(docs, labels)
    calibration = platt([z for z, _ in cv_scores], labels)
    a, b = calibration
    logits = [weigh_evidence(a * z + b, known) for z, known in cv_scores]
    threshold = threshold_for(logits, labels, TARGET_TRAIN_FP)
    for rate in (0.0005, 0.001, 0.002, 0.003, 0.005):
        t = threshold_for(logits, labels, rate)
        caught = sum(1 for s, y in zip(logits, labels, strict=True) if y and s >= t)
        print(
            f"  cv: ham fp {rate:.2%} -> threshold logit {t:.3f}, spam+phish recall "
            f"{caught / sum(labels):.2%}",
            file=sys.stderr,
        )
    model = fit(docs, labels)
    meta = {
        "trained_on": "corpora/spam + corpora/phishing, training part (sha256(path) % 5 != 0)",
        "messages": len(samples),
        "svm_c": SVM_C,
        "min_df": MIN_DOCUMENT_FREQUENCY,
        "cv_train_fp_target": TARGET_TRAIN_FP,
    }
    export(args.out, model, threshold, calibration, meta)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB), threshold logit {threshold:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
