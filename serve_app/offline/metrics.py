"""Ranking metrics with "correct" as the positive class (AUROC, AUPR, FPR@95), their plain-text
table, and the offline fit of the served confidence calibration. Uses scikit-learn, so serving
never imports it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from serve_app.core.confidence import EPS, ArrayLike, ConfidenceCalibration


def _clean(scores: ArrayLike, correct: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores and int labels with non-finite scores dropped (lengths must match)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(correct).astype(bool).astype(int).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    keep = np.isfinite(s)
    return s[keep], y[keep]


def _two_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < y.size


def auroc(scores: ArrayLike, correct: Sequence[bool]) -> float:
    """ROC AUC with "correct" positive; NaN if only one class (or none) is present.

    Non-finite scores are dropped, here and in every metric below.
    """
    s, y = _clean(scores, correct)
    return float(roc_auc_score(y, s)) if _two_classes(y) else float("nan")


def aupr(scores: ArrayLike, correct: Sequence[bool]) -> float:
    """Average precision with "correct" positive; NaN if only one class is present."""
    s, y = _clean(scores, correct)
    return float(average_precision_score(y, s)) if _two_classes(y) else float("nan")


def fpr_at_95_tpr(scores: ArrayLike, correct: Sequence[bool]) -> float:
    """FPR at the first (highest) threshold whose TPR ≥ 0.95 — the lowest such FPR.

    NaN if only one class is present.
    """
    s, y = _clean(scores, correct)
    if not _two_classes(y):
        return float("nan")
    fpr, tpr, _ = roc_curve(y, s)
    return float(fpr[int(np.argmax(tpr >= 0.95))])


def score_metrics(scores: ArrayLike, correct: Sequence[bool]) -> dict[str, float | int]:
    """``{auroc, aupr, fpr95, n, positives}``; ``n``/``positives`` count the finite-score rows."""
    s, y = _clean(scores, correct)
    return {
        "auroc": auroc(s, y),
        "aupr": aupr(s, y),
        "fpr95": fpr_at_95_tpr(s, y),
        "n": int(y.size),
        "positives": int(y.sum()),
    }


def coe_table(rows: dict[str, ArrayLike], correct: Sequence[bool]) -> dict[str, dict[str, float | int]]:
    """``score_metrics`` for each named score column against the same labels."""
    return {name: score_metrics(values, correct) for name, values in rows.items()}


def format_coe_table(table: dict[str, dict[str, float | int]]) -> str:
    """Plain-text table with columns score, AUROC, AUPR, FPR95, n, and the AUROC with a learned
    direction (``auroc_directed``, ``sign``) where a row has one."""
    width = max([len("score"), *(len(k) for k in table)])
    directed = any("auroc_directed" in m for m in table.values())
    head = f"{'score':<{width}}  {'AUROC':>6}  {'AUPR':>6}  {'FPR95':>6}  {'n':>6}"
    lines = [head + ("  dir AUROC  sign" if directed else "")]
    for name, m in table.items():
        line = f"{name:<{width}}  {m['auroc']:>6.3f}  {m['aupr']:>6.3f}  {m['fpr95']:>6.3f}  {int(m['n']):>6d}"
        if "auroc_directed" in m:
            line += f"  {m['auroc_directed']:>9.3f}  {m['sign']:>+4d}"
        lines.append(line)
    return "\n".join(lines)


def fit_confidence(scores: ArrayLike, correct: Sequence[bool], score_name: str) -> ConfidenceCalibration:
    """Fit on ``(scores, correct)``; non-finite scores are dropped.

    ``sign = +1`` if the fit-data AUROC ≥ 0.5 else ``-1``; then a 1-D logistic regression
    (C=1.0) on the standardised signed score. With a single class (or no data) the result is
    constant: ``a = 0`` and confidence = observed correct rate clipped to [0.01, 0.99]
    (0.5 with no data).
    """
    s, y = _clean(scores, correct)
    train_auroc = auroc(s, y)
    if not _two_classes(y):
        rate = float(np.clip(y.mean(), 0.01, 0.99)) if y.size else 0.5
        b = math.log(rate / (1.0 - rate))
        return ConfidenceCalibration(score=score_name, sign=1, a=0.0, b=b, fitted_on=int(y.size), train_auroc=train_auroc)
    sign: Literal[1, -1] = 1 if train_auroc >= 0.5 else -1
    x = sign * s
    mu, sd = float(x.mean()), float(x.std())
    sd = sd if sd > EPS else 1.0
    lr = LogisticRegression(C=1.0).fit(((x - mu) / sd).reshape(-1, 1), y)
    w, c = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return ConfidenceCalibration(score=score_name, sign=sign, a=w / sd, b=c - w * mu / sd, fitted_on=int(y.size), train_auroc=train_auroc)
