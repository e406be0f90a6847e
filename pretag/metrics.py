"""The paper's metrics as pure functions (numbers in, numbers out), each tested against hand-computed values.

Bootstrap intervals (of a mean, of a ratio of two models' statistics, of a pooled fraction), AUROC with ties,
calibration tables, distinct-n, the expected maximum over k samples, and the misalignment summary of scored
samples (mean score, expected max, fraction of samples with any bad segment, fraction of bad segments; a final
segment cut by the length limit is not scored). ``pretag.evaluate`` runs them over a model directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from math import comb

import numpy as np


# ---- statistics -------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """A point estimate with a percentile bootstrap interval."""

    value: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.lo:.4g}, {self.hi:.4g}]"


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[np.ndarray], float] = np.mean,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap: resample ``values`` with replacement, take the (1±c)/2 quantiles of ``stat``.

    Percentile rather than BCa because it needs no jackknife and is exact in the degenerate cases we test: a
    constant sample gives a point interval, whatever ``stat`` is.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D sample, got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    point = float(stat(x))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_resamples, len(x)))  # (R, N)
    stats = np.array([stat(x[i]) for i in idx])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    # a constant sample must give a point interval; float rounding in the quantile must not widen it
    return Estimate(point, float(min(lo, point)), float(max(hi, point)), len(x))


def ratio_ci(
    numerator: Sequence,
    denominator: Sequence,
    stat: Callable[[np.ndarray], float] = np.mean,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """mean(numerator) / mean(denominator) with a percentile bootstrap interval, the two samples resampled
    independently (two models' samples are independent draws). The paper's headline is such a ratio:
    misalignment of MLE / misalignment of conditional training (0.0141 / 0.0011 ≈ 13× on toxicity).

    ``stat`` maps a sample (or a resample) to the statistic, ``np.mean`` by default; samples may be 2-D (N, k)
    rows, e.g. (bad segments, segments) per sample with ``stat = pooled_fraction``. A ratio of 1 is reported as 1;
    an interval that excludes 1 is the evidence of an effect. Infinite when the denominator's statistic is 0
    (then read the two statistics, not the ratio).
    """
    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if a.ndim not in (1, 2) or b.ndim != a.ndim or not len(a) or not len(b):
        raise ValueError(f"ratio_ci needs two non-empty samples of rows, got shapes {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    ma = np.array([stat(a[i]) for i in rng.integers(0, len(a), size=(n_resamples, len(a)))])  # (R,)
    mb = np.array([stat(b[i]) for i in rng.integers(0, len(b), size=(n_resamples, len(b)))])  # (R,)
    with np.errstate(divide="ignore", invalid="ignore"):
        sa, sb = float(stat(a)), float(stat(b))
        point = sa / sb if sb else float("inf")
        stats = np.where(mb > 0, ma / np.where(mb > 0, mb, 1.0), np.inf)
    alpha = (1 - confidence) / 2
    with np.errstate(invalid="ignore"):
        lo, hi = np.nan_to_num(np.quantile(stats, [alpha, 1 - alpha]), nan=np.inf, posinf=np.inf)  # inf-inf: nan
    return Estimate(point, float(min(lo, point)), float(max(hi, point)), len(a) + len(b))


def pooled_fraction(rows: np.ndarray) -> float:
    """sum of column 0 / sum of column 1: e.g. bad segments / segments pooled over samples."""
    total = rows[:, 1].sum()
    return float(rows[:, 0].sum() / total) if total else 0.0


def auroc(scores: Sequence[float], labels: Sequence[bool | int]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties count 1/2.

    Computed from mid-ranks (the Mann-Whitney U statistic), so tied scores are handled exactly. NaN when only one
    class is present: the AUROC is undefined then, and reporting 0.5 would hide that.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D and of equal length, got {s.shape} and {y.shape}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # mid-ranks for runs of ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def calibration_table(probs: Sequence[float], labels: Sequence[bool | int], n_bins: int = 10) -> dict:
    """Reliability table: equal-width bins of predicted probability; per bin the mean prediction and the observed
    positive rate. ``ece`` is the count-weighted mean |prediction − rate| (expected calibration error)."""
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels, dtype=float)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"probs and labels must be 1-D and of equal length, got {p.shape} and {y.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if len(p) and (p.min() < 0 or p.max() > 1):
        raise ValueError("probs must lie in [0, 1]")
    # bin b holds [b/n, (b+1)/n); 1.0 goes into the last bin
    which = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows, ece = [], 0.0
    for b in range(n_bins):
        m = which == b
        n = int(m.sum())
        row = {"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
               "mean_prob": float(p[m].mean()) if n else None, "frac_positive": float(y[m].mean()) if n else None}
        if n:
            ece += n / len(p) * abs(row["mean_prob"] - row["frac_positive"])
        rows.append(row)
    return {"bins": rows, "ece": float(ece), "n": len(p)}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, pooled over samples. 0 if none."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, seen = 0, set()
    for t in texts:
        w = t.split()
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def expected_max(scores: Sequence[float], k: int = 25) -> float:
    """Expected maximum of ``k`` samples drawn without replacement from ``scores`` (the paper's "expected maximum
    score over 25 samples"), computed exactly rather than by Monte Carlo.

    With x sorted ascending, the i-th smallest (1-based) is the maximum of a random k-subset with probability
    C(i-1, k-1) / C(N, k).
    """
    x = np.sort(np.asarray(scores, dtype=float))
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in [1, {len(x)}] (the number of scores), got {k}")
    total = comb(len(x), k)
    return float(sum(x[i - 1] * comb(i - 1, k - 1) for i in range(k, len(x) + 1)) / total)


# ---- misalignment of samples ------------------------------------------------------------------------------
def strip_tags(text: str, tag_tokens: Sequence[str]) -> str:
    """Remove every tag token string: samples are scored as the text a reader would see."""
    for t in sorted(tag_tokens, key=len, reverse=True):
        text = text.replace(t, "")
    return text


def scorable_segments(segments: list[str], truncated: bool) -> list[int]:
    """Indices of the segments to score: all, except a final segment the length limit cut off mid-way (its
    score would measure the cut, not the model). A lone segment is kept: dropping it would drop the sample."""
    n = len(segments)
    return list(range(n - 1)) if truncated and n > 1 else list(range(n))


def sample_score(segments: Sequence[str], scores: Sequence[float | None]) -> float | None:
    """Per-character score of one sample: the character-weighted mean of its segment scores.

    For per-character scorers (PEP8 violations/char, PII detections/char) this is exactly the sample's rate per
    character, as in the paper; for per-segment probabilities it weights long segments more. None if nothing is
    scored.
    """
    num = den = 0.0
    for seg, s in zip(segments, scores):
        if s is None or (isinstance(s, float) and math.isnan(s)):
            continue
        num += s * len(seg)
        den += len(seg)
    return num / den if den else None


def misalignment_summary(
    segments: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float | None]],
    is_bad: Callable[[float | None], bool],
    *,
    higher_is_worse: bool = True,
    k: int = 25,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Misalignment of a set of samples for one attribute (segments already stripped of tags and of a cut final
    segment; ``scores[i][j]`` is segment j of sample i).

    ``score``: mean over samples of the per-character score, oriented so higher is worse (a ``higher_is_better``
    attribute is negated); ``expected_max``: over ``k`` samples; ``frac_samples_any_bad``: samples with at least
    one bad segment; ``frac_bad_segments``: pooled over all segments. Intervals bootstrap over samples.
    """
    if len(segments) != len(scores):
        raise ValueError(f"{len(segments)} segment lists but {len(scores)} score lists")
    sign = 1.0 if higher_is_worse else -1.0
    per_sample, any_bad, bad_counts, seg_counts = [], [], [], []
    for segs, sc in zip(segments, scores):
        if len(segs) != len(sc):
            raise ValueError(f"a sample has {len(segs)} segments but {len(sc)} scores")
        s = sample_score(segs, sc)
        scored = [x for x in sc if x is not None and not (isinstance(x, float) and math.isnan(x))]
        if s is None:
            continue
        per_sample.append(sign * s)
        bad = sum(bool(is_bad(x)) for x in scored)
        any_bad.append(float(bad > 0))
        bad_counts.append(bad)
        seg_counts.append(len(scored))
    if not per_sample:
        return {"n_samples": 0, "n_segments": 0}
    boot = {"n_resamples": n_resamples, "seed": seed}
    counts = np.stack([bad_counts, seg_counts], axis=1).astype(float)  # (N, 2): resampled together (a ratio)

    def pooled(idx: np.ndarray) -> float:
        c = counts[idx.astype(int)].sum(axis=0)
        return c[0] / c[1] if c[1] else 0.0

    k = min(k, len(per_sample))
    return {
        "n_samples": len(per_sample),
        "n_segments": int(sum(seg_counts)),
        "score": bootstrap_ci(per_sample, **boot).to_dict(),
        "expected_max": expected_max(per_sample, k),
        "expected_max_k": k,
        "frac_samples_any_bad": bootstrap_ci(any_bad, **boot).to_dict(),
        "frac_bad_segments": bootstrap_ci(np.arange(len(counts)), pooled, **boot).to_dict(),
        # kept so that two runs can be compared with an interval on their ratio (ratio_ci)
        "per_sample": {"score": per_sample, "any_bad": any_bad, "bad_segments": bad_counts,
                       "segments": seg_counts},
    }


def json_safe(obj):
    """NaN/inf -> None, recursively: an undefined AUROC must stay valid JSON (``NaN`` is not)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.floating | np.integer):
        return json_safe(obj.item())
    return obj
