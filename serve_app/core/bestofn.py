"""Best-of-N answer selection: pick one of N sampled replies by KV-CoE confidence or by vote.

Pure functions (no model, no Ray): the router calls ``select`` on the graded answers and KV-CoE
confidences of N samples; ``kvswitch eval --best-of`` calls ``best_of_n_curve`` on recorded samples.

Rules (each gives one score per sample; the chosen sample is the *lowest index with the highest
score* — that is the tie-break everywhere, so the result never depends on anything but the inputs):

* ``coe``      — score = the sample's KV-CoE confidence; a missing confidence scores ``-inf``.
* ``vote``     — score = how many samples gave the same graded answer; a missing answer scores 0.
  Equal counts go to the answer that appeared first.
* ``coe-vote`` — score = the summed confidence of the samples that gave the same answer (missing
  confidence weighs 0); a missing answer scores 0. When no sample has a confidence it is ``vote``.
* ``random``   — score = a uniform draw from ``random.Random(seed)``: the baseline.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

RULES: tuple[str, ...] = ("coe", "vote", "coe-vote", "random")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _vote_scores(answers: Sequence[str | None], weights: Sequence[float]) -> list[float]:
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + weight
    return [0.0 if a is None else totals[a] for a in answers]


def select(
    answers: list[str | None],
    confidences: list[float | None],
    rule: Literal["coe", "vote", "coe-vote", "random"],
    seed: int = 0,
) -> tuple[int, list[float]]:
    """Index of the chosen sample and one score per sample (what ``rule`` ranked by).

    ``answers`` are graded final answers (a grader's ``extract`` of each reply, ``serve_app.core.grading``;
    None when a reply has none); ``confidences`` the KV-CoE confidence of each reply (None / NaN: none).
    Ties go to the lowest index.
    """
    if len(answers) != len(confidences):
        raise ValueError(f"{len(answers)} answers but {len(confidences)} confidences")
    if not answers:
        raise ValueError("select needs at least one sample")
    conf = [_finite(c) for c in confidences]
    if rule == "coe":
        scores = [-math.inf if c is None else float(c) for c in conf]
    elif rule == "vote":
        scores = _vote_scores(answers, [1.0] * len(answers))
    elif rule == "coe-vote":
        weights = [1.0] * len(answers) if all(c is None for c in conf) else [0.0 if c is None else float(c) for c in conf]
        scores = _vote_scores(answers, weights)
    elif rule == "random":
        rng = random.Random(seed)
        scores = [rng.random() for _ in answers]
    else:
        raise ValueError(f"unknown selection rule {rule!r}; choose from {list(RULES)}")
    best = max(scores)
    return scores.index(best), scores


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test p-value of ``wins`` vs ``losses`` discordant pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def best_of_n_curve(samples: list[list[dict]], ns: Sequence[int], rules: Sequence[str], seed: int = 0) -> dict:
    """Accuracy and tokens of best-of-N for each N and rule, from N_max recorded samples per question.

    ``samples[q][j]`` holds ``answer`` (str | None), ``confidence`` (float | None), ``correct``,
    ``tokens``. A rule ``"<rule>:<key>"`` ranks by ``samples[q][j][key]`` in place of the confidence
    (e.g. ``coe:maxprob``, a token-probability reference). Best-of-N uses the disjoint groups ``[k*N, (k+1)*N)`` of the N_max samples and
    averages over them (N_max / N groups), so N < N_max costs no extra sampling and has less noise.
    Per N: ``{rule: {accuracy, correct, mean_tokens, chosen}}`` plus ``pass`` (any sample right)
    and ``sample_mean`` (expected accuracy of a uniformly random pick). ``correct`` is the mean
    count over groups; ``chosen[q]`` (the picks of group 0) lists whether each question came out right.
    """
    n_max = min(len(s) for s in samples)
    out: dict[str, dict] = {}
    for n in ns:
        if n < 1 or n > n_max or n_max % n:
            raise ValueError(f"N={n} must divide the {n_max} samples per question")
        groups = n_max // n
        cell: dict[str, dict] = {rule: {"hits": 0.0, "chosen": []} for rule in rules}
        pass_hits = mean_hits = tokens = 0.0
        for q, per_q in enumerate(samples):
            for g in range(groups):
                group = per_q[g * n : (g + 1) * n]
                pass_hits += any(s["correct"] for s in group) / groups
                mean_hits += sum(s["correct"] for s in group) / n / groups
                tokens += sum(s["tokens"] for s in group) / groups
                answers = [s["answer"] for s in group]
                for rule in rules:
                    base, _, key = rule.partition(":")
                    confs = [s[key or "confidence"] for s in group]
                    idx, _ = select(answers, confs, base, seed=seed * 1_000_003 + q * n_max + g)  # type: ignore[arg-type]
                    ok = bool(group[idx]["correct"])
                    cell[rule]["hits"] += ok / groups
                    if g == 0:
                        cell[rule]["chosen"].append(ok)
        count = len(samples)
        entry: dict = {
            rule: {"accuracy": c["hits"] / count, "correct": round(c["hits"], 3), "mean_tokens": tokens / count, "chosen": c["chosen"]}
            for rule, c in cell.items()
        }
        entry["pass"] = {"accuracy": pass_hits / count, "correct": round(pass_hits, 3), "mean_tokens": tokens / count}
        entry["sample_mean"] = {"accuracy": mean_hits / count, "correct": round(mean_hits, 3), "mean_tokens": tokens / count}
        entry["groups"] = groups
        out[str(n)] = entry
    return out
