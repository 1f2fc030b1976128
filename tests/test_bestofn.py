"""Best-of-N selection rules on hand-made cases, the N-curve bookkeeping, and ``eval --best-of``."""

import json
import math

import pytest

from serve_app.cli import main
from serve_app.core.bestofn import best_of_n_curve, select, sign_test_p
from serve_app.core.task import TaskConfig, generate_problems, write_jsonl


def test_coe_picks_the_most_confident_sample_ties_to_the_lowest_index():
    assert select(["3", "4", "5"], [0.2, 0.9, 0.4], "coe") == (1, [0.2, 0.9, 0.4])
    assert select(["3", "4", "5"], [0.7, 0.2, 0.7], "coe")[0] == 0
    idx, scores = select(["3", None, "5"], [None, 0.1, float("nan")], "coe")
    assert idx == 1 and scores == [-math.inf, 0.1, -math.inf]  # missing / NaN confidence ranks last


def test_coe_with_no_confidence_at_all_falls_to_the_first_sample():
    assert select(["3", "4"], [None, None], "coe") == (0, [-math.inf, -math.inf])


def test_vote_counts_answers_and_breaks_ties_by_first_appearance():
    assert select(["7", "5", "5", "7", "5"], [0.9, 0.1, 0.1, 0.9, 0.1], "vote") == (1, [2.0, 3.0, 3.0, 2.0, 3.0])
    assert select(["7", "5", "5", "7"], [None] * 4, "vote")[0] == 0  # 2-2: "7" appeared first
    assert select([None, "5", None], [0.9, 0.1, 0.9], "vote") == (1, [0.0, 1.0, 0.0])  # no answer, no vote
    assert select([None, None], [0.3, 0.9], "vote") == (0, [0.0, 0.0])


def test_coe_vote_weighs_each_vote_by_its_confidence():
    answers, conf = ["5", "5", "7"], [0.2, 0.2, 0.9]
    assert select(answers, conf, "vote")[0] == 0
    idx, scores = select(answers, conf, "coe-vote")
    assert idx == 2 and scores == pytest.approx([0.4, 0.4, 0.9])
    # a sample without a confidence still names its answer but weighs nothing
    assert select(["5", "7", "7"], [0.6, None, 0.5], "coe-vote") == (0, [0.6, 0.5, 0.5])


def test_coe_vote_without_confidences_is_a_plain_vote():
    answers = ["1", "2", "2", None]
    assert select(answers, [None] * 4, "coe-vote") == select(answers, [None] * 4, "vote") == (1, [1.0, 2.0, 2.0, 0.0])


def test_random_is_seeded_and_uses_every_position():
    answers, conf = ["1", "2", "3", "4"], [0.9, 0.1, 0.1, 0.1]
    assert select(answers, conf, "random", seed=3) == select(answers, conf, "random", seed=3)
    picks = {select(answers, conf, "random", seed=s)[0] for s in range(40)}
    assert picks == {0, 1, 2, 3}
    assert all(0.0 <= s < 1.0 for s in select(answers, conf, "random", seed=0)[1])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2 answers but 1"):
        select(["1", "2"], [0.5], "coe")
    with pytest.raises(ValueError, match="at least one"):
        select([], [], "vote")
    with pytest.raises(ValueError, match="unknown selection rule"):
        select(["1"], [0.5], "best")


def test_sign_test():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert sign_test_p(3, 9) == sign_test_p(9, 3) == pytest.approx(2 * (1 + 12 + 66 + 220) / 4096)


def _s(answer, correct, confidence, tokens=4):
    return {"answer": answer, "correct": correct, "confidence": confidence, "tokens": tokens, "maxprob": 0.5}


def test_curve_uses_disjoint_groups_of_the_same_samples():
    samples = [
        [_s("1", False, 0.9), _s("2", True, 0.1), _s("2", True, 0.2), _s("3", False, 0.3)],
        [_s("9", True, 0.8, 6), _s("8", False, 0.1, 6), _s("7", False, 0.2, 6), _s("6", False, 0.9, 6)],
    ]
    curve = best_of_n_curve(samples, [1, 2, 4], ["coe", "vote", "random", "coe:maxprob"])
    one, two, four = curve["1"], curve["2"], curve["4"]
    assert one["groups"] == 4 and two["groups"] == 2 and four["groups"] == 1
    assert one["coe"]["accuracy"] == one["vote"]["accuracy"] == one["sample_mean"]["accuracy"] == pytest.approx(3 / 8)
    # N=2, q0: groups (1,2) → coe picks "1" (wrong), (2,3) → "3" (wrong); q1: (9,8) → 9 right, (7,6) → 6 wrong
    assert two["coe"]["accuracy"] == pytest.approx((0 + 0.5) / 2)
    assert two["coe"]["mean_tokens"] == pytest.approx((8 + 12) / 2)
    # N=4: coe picks "1" in q0 (wrong) and "6" in q1 (wrong); vote picks "2" in q0 (right), "9" in q1 (first, right)
    assert four["coe"]["accuracy"] == 0.0 and four["vote"]["accuracy"] == 1.0
    assert four["vote"]["chosen"] == [True, True] and four["pass"]["accuracy"] == 1.0
    assert four["coe:maxprob"]["chosen"] == [False, True]  # all maxprob tie: the first sample
    with pytest.raises(ValueError, match="N=3"):
        best_of_n_curve(samples, [3], ["coe"])


def test_eval_best_of_reports_the_curve_seeds_and_margins(model_dir, tmp_path):
    data = tmp_path / "easy.jsonl"
    write_jsonl(generate_problems(4, seed=737373, config=TaskConfig(min_operators=1, max_operators=2)), data)
    out = tmp_path / "bon.json"
    rc = main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "fast,slow", "--best-of", "4",
               "--select", "coe,vote,coe-vote", "--temperature", "1.5", "--seed", "5", "--max-new-tokens", "24", "--out", str(out)])
    assert rc == 0 and out.with_suffix(".png").stat().st_size > 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("kvswitch eval ") and "--best-of 4" in report["command"]
    fast = report["sampled"]["fast"]
    assert list(fast["curve"]) == ["1", "2", "4"]
    assert {"coe", "vote", "coe-vote", "random", "coe:maxprob", "pass", "sample_mean"} <= set(fast["curve"]["4"])
    records = fast["records"]
    seeds = [s["seed"] for r in records for s in r["samples"]]
    assert seeds == [5_000_000 + i for i in range(16)]
    assert all(0 <= s["confidence"] <= 1 for r in records for s in r["samples"])
    # a best-of-4 pick is right exactly when its chosen sample is; counts agree with accuracies
    # each mode's picks are set against the greedy reply of that mode, not another mode's
    for mode, entry in report["sampled"].items():
        cell = entry["vs_greedy"]["coe"]
        assert cell["correct"] == round(entry["curve"]["4"]["coe"]["accuracy"] * 4)
        assert cell["other_correct"] == report["greedy"][mode]["correct"]
        assert cell["other_correct"] == sum(r[f"greedy_{mode}"]["correct"] for r in entry["records"])
        assert cell["margin"] == cell["wins"] - cell["losses"]
    assert set(report["sampled"]) == {"fast", "slow"}
    assert fast["curve"]["4"]["coe"]["mean_tokens"] == pytest.approx(sum(s["tokens"] for r in records for s in r["samples"]) / 4)
