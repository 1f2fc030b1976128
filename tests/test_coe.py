"""Pins the CoE formulas, token baselines, metrics and calibration on hand-computed examples."""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch

from serve_app.core.confidence import ConfidenceCalibration, coe_features, coe_scores, entropy_score, maxprob, perplexity_score, token_stats
from serve_app.offline.metrics import aupr, auroc, coe_table, fit_confidence, format_coe_table, fpr_at_95_tpr, score_metrics

SQ2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------- CoE


def test_coe_quarter_turn_by_hand() -> None:
    # e = (1,0) -> (1,1) -> (0,1)
    # steps (0,1), (-1,0): norms 1, 1; e_T - e_0 = (-1,1): norm sqrt2  => M = [1/sqrt2, 1/sqrt2]
    # cos(e1,e0) = 1/(sqrt2*1), cos(e2,e1) = 1/(1*sqrt2) => angles pi/4, pi/4; cos(e2,e0) = 0 => pi/2
    # => A = [1/2, 1/2]
    traj = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    mags, angles = coe_features(traj)
    assert mags.dtype == torch.float64
    assert mags.tolist() == pytest.approx([1 / SQ2, 1 / SQ2])
    assert angles.tolist() == pytest.approx([0.5, 0.5])
    out = coe_scores(traj)
    assert out["coe_r"] == pytest.approx(1 / SQ2 - 0.5)
    # both steps share M and A, so |mean M e^{iA}| = 1/sqrt2
    assert out["coe_c"] == pytest.approx(1 / SQ2)


def test_coe_uneven_steps_by_hand() -> None:
    # e = (1,0) -> (2,0) -> (1,1)
    # steps (1,0), (-1,1): norms 1, sqrt2; e_T - e_0 = (0,1): norm 1      => M = [1, sqrt2]
    # cos(e1,e0) = 2/(2*1) = 1 -> 0; cos(e2,e1) = 2/(sqrt2*2) -> pi/4; cos(e2,e0) = 1/sqrt2 -> pi/4
    # => A = [0, 1]
    traj = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    mags, angles = coe_features(traj)
    assert mags.tolist() == pytest.approx([1.0, SQ2])
    assert angles.tolist() == pytest.approx([0.0, 1.0], abs=1e-7)
    out = coe_scores(traj)
    # CoE-R = (1 + sqrt2)/2 - (0 + 1)/2 = sqrt2/2
    assert out["coe_r"] == pytest.approx(SQ2 / 2, abs=1e-7)
    # CoE-C = 1/2 * sqrt((1 + sqrt2 cos 1)^2 + (sqrt2 sin 1)^2)
    expected_c = 0.5 * math.sqrt((1 + SQ2 * math.cos(1.0)) ** 2 + (SQ2 * math.sin(1.0)) ** 2)
    assert out["coe_c"] == pytest.approx(expected_c, abs=1e-7)
    assert out["coe_c"] != pytest.approx((1 + SQ2) / 2)  # the angle term matters


def test_coe_c_matches_complex_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    traj = torch.randn(9, 16, generator=gen, dtype=torch.float64)
    e = traj.tolist()

    def norm(v: list[float]) -> float:
        return math.sqrt(sum(x * x for x in v))

    def angle(u: list[float], v: list[float]) -> float:
        return math.acos(max(-1.0, min(1.0, sum(a * b for a, b in zip(u, v)) / (norm(u) * norm(v)))))

    def sub(u: list[float], v: list[float]) -> list[float]:
        return [a - b for a, b in zip(u, v)]

    m = [norm(sub(e[t + 1], e[t])) / norm(sub(e[-1], e[0])) for t in range(len(e) - 1)]
    a = [angle(e[t + 1], e[t]) / angle(e[-1], e[0]) for t in range(len(e) - 1)]
    z = sum(mt * cmath.exp(1j * at) for mt, at in zip(m, a)) / len(m)
    out = coe_scores(traj)
    assert out["coe_c"] == pytest.approx(abs(z), rel=1e-9)
    assert out["coe_r"] == pytest.approx(sum(m) / len(m) - sum(a) / len(a), rel=1e-9)


def test_coe_float32_input_is_computed_in_float64() -> None:
    traj64 = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    traj32 = traj64.to(torch.float32)
    mags, _ = coe_features(traj32)
    assert mags.dtype == torch.float64
    assert coe_scores(traj32)["coe_r"] == pytest.approx(coe_scores(traj32.double())["coe_r"], rel=1e-12)


@pytest.mark.parametrize(
    "traj",
    [
        torch.zeros(1, 4),  # T = 0
        torch.zeros(0, 4),  # empty
    ],
)
def test_coe_degenerate_single_point(traj: torch.Tensor) -> None:
    assert coe_scores(traj) == {"coe_r": 0.0, "coe_c": 0.0}


@pytest.mark.parametrize(
    "traj",
    [
        torch.ones(4, 3),  # constant: zero endpoint distance and angle
        torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]),  # starts at the zero vector
        torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]),  # collinear: endpoint angle 0
        torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]),  # antipodal endpoints
    ],
)
def test_coe_degenerate_is_finite(traj: torch.Tensor) -> None:
    out = coe_scores(traj)
    assert all(math.isfinite(v) for v in out.values())


def test_coe_straight_line_magnitudes() -> None:
    # (1,0) -> (2,0) -> (3,0): each step is half of the endpoint distance
    mags, _ = coe_features(torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    assert mags.tolist() == pytest.approx([0.5, 0.5])


def test_coe_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError):
        coe_scores(torch.zeros(3))


# ------------------------------------------------------------------------- token-level baselines


def test_token_stats_uniform_row() -> None:
    v = 8
    logits = torch.zeros(2, v)
    logits[1] = torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    max_p, chosen_lp, ent = token_stats(logits, torch.tensor([5, 1]))
    assert max_p.dtype == chosen_lp.dtype == ent.dtype == torch.float32
    assert max_p[0].item() == pytest.approx(1 / v)
    assert ent[0].item() == pytest.approx(math.log(v), rel=1e-6)
    assert chosen_lp[0].item() == pytest.approx(-math.log(v), rel=1e-6)
    # row 1 by hand: Z = e^3 + e^1 + 6
    z = math.exp(3) + math.exp(1) + 6
    p = [math.exp(3) / z, math.exp(1) / z] + [1 / z] * 6
    assert max_p[1].item() == pytest.approx(p[0], rel=1e-6)
    assert chosen_lp[1].item() == pytest.approx(math.log(p[1]), rel=1e-6)
    assert ent[1].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-6)


def test_token_stats_masked_logits_have_finite_entropy() -> None:
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    max_p, chosen_lp, ent = token_stats(logits, torch.tensor([0]))
    assert max_p.item() == pytest.approx(0.5)
    assert chosen_lp.item() == pytest.approx(math.log(0.5))
    assert ent.item() == pytest.approx(math.log(2), rel=1e-6)


def test_token_baselines() -> None:
    assert maxprob([0.5, 0.9, 1.0]) == pytest.approx(0.8)
    # mean log p = (log 0.5 + log 0.25)/2 = -1.5 log 2  =>  ppl = 2^1.5
    assert perplexity_score([math.log(0.5), math.log(0.25)]) == pytest.approx(-(2**1.5))
    assert entropy_score([0.2, 0.4]) == pytest.approx(-0.3)
    # higher = more confident
    assert perplexity_score([-0.1, -0.1]) > perplexity_score([-2.0, -2.0])
    assert entropy_score([0.1]) > entropy_score([2.0])
    assert math.isnan(maxprob([])) and math.isnan(perplexity_score([])) and math.isnan(entropy_score([]))


# ------------------------------------------------------------------------------------- metrics


def test_metrics_perfect_separation() -> None:
    scores, correct = [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]
    assert auroc(scores, correct) == 1.0
    assert aupr(scores, correct) == 1.0
    assert fpr_at_95_tpr(scores, correct) == 0.0


def test_metrics_reversed() -> None:
    scores, correct = [0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]
    assert auroc(scores, correct) == 0.0
    assert fpr_at_95_tpr(scores, correct) == 1.0
    # ranked 0.9(0) 0.8(0) 0.2(1) 0.1(1): precision 1/3 at recall 1/2, 2/4 at recall 1
    assert aupr(scores, correct) == pytest.approx(0.5 * (1 / 3) + 0.5 * (2 / 4))


def test_metrics_mixed_case() -> None:
    scores, correct = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # positive > negative pairs: (0.35,0.1), (0.8,0.1), (0.8,0.4) = 3 of 4
    assert auroc(scores, correct) == pytest.approx(0.75)
    # ranked 0.8(1) 0.4(0) 0.35(1) 0.1(0): precision 1 at recall 1/2, 2/3 at recall 1
    assert aupr(scores, correct) == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))
    # TPR 1 needs threshold 0.35, which admits the negative at 0.4 => FPR 1/2
    assert fpr_at_95_tpr(scores, correct) == pytest.approx(0.5)
    m = score_metrics(scores, [False, False, True, True])
    assert m == {"auroc": pytest.approx(0.75), "aupr": pytest.approx(5 / 6), "fpr95": 0.5, "n": 4, "positives": 2}


def test_metrics_single_class_is_nan() -> None:
    for labels in ([1, 1, 1], [0, 0, 0]):
        m = score_metrics([0.1, 0.5, 0.9], labels)
        assert math.isnan(m["auroc"]) and math.isnan(m["aupr"]) and math.isnan(m["fpr95"])
        assert m["n"] == 3 and m["positives"] == sum(labels)


def test_metrics_drop_nonfinite_scores_and_check_lengths() -> None:
    m = score_metrics([0.1, float("nan"), 0.9, float("inf")], [0, 1, 1, 0])
    assert m["n"] == 2 and m["positives"] == 1 and m["auroc"] == 1.0
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [0, 1, 1])


def test_coe_table_and_format() -> None:
    correct = [False, False, True, True]
    table = coe_table({"coe_r": [0.1, 0.4, 0.35, 0.8], "maxprob": [0.9, 0.8, 0.2, 0.1]}, correct)
    assert list(table) == ["coe_r", "maxprob"]
    assert table["coe_r"]["auroc"] == pytest.approx(0.75)
    assert table["maxprob"]["auroc"] == 0.0
    text = format_coe_table(table)
    lines = text.splitlines()
    assert lines[0].split() == ["score", "AUROC", "AUPR", "FPR95", "n"]
    assert lines[1].split() == ["coe_r", "0.750", "0.833", "0.500", "4"]
    assert lines[2].split()[0:2] == ["maxprob", "0.000"]


# --------------------------------------------------------------------------------- calibration


def _noisy_data(seed: int = 0, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.6
    scores = rng.normal(loc=np.where(correct, 1.0, -1.0), scale=1.0) * 3.0 + 10.0
    return scores, correct


def test_calibration_monotone_and_bounded() -> None:
    scores, correct = _noisy_data()
    cal = fit_confidence(scores, correct, "coe_r")
    assert cal.sign == 1 and cal.a > 0 and cal.fitted_on == 400
    assert cal.train_auroc == pytest.approx(auroc(scores, correct))
    grid = np.linspace(-50, 70, 200)
    conf = cal.confidence(grid)
    assert isinstance(conf, np.ndarray)
    assert np.all((conf >= 0) & (conf <= 1))
    assert np.all(np.diff(conf) >= 0) and conf[-1] > conf[0]
    assert conf[0] < 0.05 and conf[-1] > 0.95
    c = cal.confidence(10.0)
    assert isinstance(c, float)
    # calibrated: mean predicted confidence on the fit data ≈ observed accuracy
    assert float(np.mean(cal.confidence(scores))) == pytest.approx(float(np.mean(correct)), abs=0.02)


def test_calibration_folds_standardisation_into_a_b() -> None:
    scores, correct = _noisy_data(seed=3)
    cal = fit_confidence(scores, correct, "s")
    # reproduce the documented recipe independently and compare pointwise
    from sklearn.linear_model import LogisticRegression

    x = scores
    z = (x - x.mean()) / x.std()
    lr = LogisticRegression(C=1.0).fit(z.reshape(-1, 1), correct.astype(int))
    expected = lr.predict_proba(z.reshape(-1, 1))[:, 1]
    np.testing.assert_allclose(cal.confidence(x), expected, rtol=1e-9, atol=1e-12)


def test_calibration_sign_flips_for_reversed_score() -> None:
    scores, correct = _noisy_data()
    cal = fit_confidence(-scores, correct, "neg_entropy")
    assert cal.sign == -1
    assert cal.train_auroc < 0.5
    # lower raw score => more likely correct
    assert cal.confidence(-50.0) > 0.95 and cal.confidence(50.0) < 0.05
    fwd = fit_confidence(scores, correct, "x")
    np.testing.assert_allclose(cal.confidence(-scores), fwd.confidence(scores), rtol=1e-9)


def test_calibration_single_class_is_constant_rate() -> None:
    cal = fit_confidence([0.1, 0.5, 0.9], [True, True, True], "coe_c")
    assert cal.a == 0.0 and cal.fitted_on == 3 and math.isnan(cal.train_auroc)
    assert cal.confidence(-100.0) == pytest.approx(0.99) and cal.confidence(100.0) == pytest.approx(0.99)
    low = fit_confidence([0.1, 0.5], [False, False], "coe_c")
    assert low.confidence(0.3) == pytest.approx(0.01)


def test_calibration_round_trip() -> None:
    scores, correct = _noisy_data()
    cal = fit_confidence(scores, correct, "coe_r")
    data = cal.to_dict()
    assert set(data) == {"score", "sign", "a", "b", "fitted_on", "train_auroc"}
    assert data["score"] == "coe_r"
    back = ConfidenceCalibration.from_dict(data)
    assert back == cal
    np.testing.assert_array_equal(back.confidence(scores), cal.confidence(scores))
    with pytest.raises(ValueError):
        ConfidenceCalibration.from_dict({**data, "sign": 2})
