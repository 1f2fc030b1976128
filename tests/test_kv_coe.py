"""KV-CoE variants (serve_app.core.kv_coe): the layer-axis formula checked by hand on a tiny
trajectory, the token sets and parts, what each engine result can give, the served confidence equal
to the offline score, and the HF engine's running sums against its own stored trajectory."""

import math

import pytest
import torch

from serve_app.core.confidence import CoePath, ConfidenceCalibration
from serve_app.core.kv_coe import (
    SERVABLE,
    VARIANTS,
    all_variant_scores,
    kv_confidence,
    layer_trajectory,
    parse_variant,
    variant_score,
)

R2 = math.sqrt(2.0)


def _sums(thought, answer):
    """[2 (thought, answer), 2 (K, V), L, 1] from per-set lists of (K, V) per layer."""
    return torch.tensor([[[[k] for k, _ in s], [[v] for _, v in s]] for s in (thought, answer)], dtype=torch.float64)


# layer means (1,0), (1,1), (0,1) in the [K; V] plane, as the sum of 2 thought tokens
LAYERS = [(1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
SUMS = _sums([(2 * k, 2 * v) for k, v in LAYERS], [(0.0, 0.0)] * 3)


def test_layer_axis_kv_by_hand():
    """e_l = (1,0), (1,1), (0,1): steps of norm 1, span sqrt 2 -> M = (1/sqrt2, 1/sqrt2); step angles
    pi/4, endpoint angle pi/2 -> A = (1/2, 1/2). CoE-R = 1/sqrt2 - 1/2; CoE-C = |mean M e^{iA}| = 1/sqrt2."""
    traj = layer_trajectory(SUMS, (2, 0), "kv", "all")
    torch.testing.assert_close(traj, torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    assert variant_score("kv_layer_kv_all_r", None, SUMS, (2, 0)) == pytest.approx(1 / R2 - 0.5, abs=1e-12)
    assert variant_score("kv_layer_kv_all_c", None, SUMS, (2, 0)) == pytest.approx(1 / R2, abs=1e-12)
    assert variant_score("kv_layer_kv_thought_r", None, SUMS, (2, 0)) == pytest.approx(1 / R2 - 0.5, abs=1e-12)


def test_layer_axis_k_only_by_hand():
    """K per layer 1, 1, 0: M = (0, 1) (span 1); angles 0 and pi/2 (a zero vector has cosine 0),
    endpoint pi/2 -> A = (0, 1). CoE-R = 1/2 - 1/2 = 0; CoE-C = |(0 + e^{i})/2| = 1/2."""
    assert variant_score("kv_layer_k_all_r", None, SUMS, (2, 0)) == pytest.approx(0.0, abs=1e-12)
    assert variant_score("kv_layer_k_all_c", None, SUMS, (2, 0)) == pytest.approx(0.5, abs=1e-12)


def test_token_sets_split_the_sums():
    """The answer set's layer means are its own; an empty set gives NaN, not a score."""
    sums = _sums(LAYERS, [(0.0, 1.0), (1.0, 1.0), (1.0, 0.0)])  # answer: the path reversed
    assert variant_score("kv_layer_kv_thought_r", None, sums, (1, 1)) == pytest.approx(1 / R2 - 0.5, abs=1e-12)
    assert variant_score("kv_layer_kv_answer_r", None, sums, (1, 1)) == pytest.approx(1 / R2 - 0.5, abs=1e-12)
    # all = per layer the mean of both: (0.5,0.5), (1,1), (0.5,0.5): out and back on one line
    all_traj = layer_trajectory(sums, (1, 1), "kv", "all")
    torch.testing.assert_close(all_traj, torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.5, 0.5]], dtype=torch.float64))
    assert math.isnan(variant_score("kv_layer_kv_answer_r", None, SUMS, (2, 0)))
    assert math.isnan(variant_score("kv_layer_kv_all_r", None, None, None))


def test_token_axis_variants_from_stored_points():
    """Points e_0, p1, p2, p3 with p1, p2 in the thought: the answer set is e_0 -> p3 alone
    (one step: M = A = 1, CoE-R 0, CoE-C |e^{i}| = 1); K only takes the first half of the columns."""
    pts = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [3.0, 4.0]], dtype=torch.float64)
    thought = [True, True, False]
    assert variant_score("kv_token_kv_thought_r", pts, thought=thought) == pytest.approx(1 / R2 - 0.5, abs=1e-12)
    assert variant_score("kv_token_kv_answer_r", pts, thought=thought) == pytest.approx(0.0, abs=1e-12)
    assert variant_score("kv_token_kv_answer_c", pts, thought=thought) == pytest.approx(1.0, abs=1e-12)
    # K column: 1, 1, 0, 3 (all tokens)
    k_only = variant_score("kv_token_k_all_r", pts, thought=thought)
    assert k_only == pytest.approx(variant_score("kv_token_kv_all_r", pts[:, :1]), abs=1e-12)
    # a running CoePath gives the kv/all variant only
    path = CoePath.from_trajectory(pts)
    assert variant_score("kv_token_kv_all_r", path) == pytest.approx(variant_score("kv_token_kv_all_r", pts), abs=1e-12)
    assert math.isnan(variant_score("kv_token_k_all_r", path)) and math.isnan(variant_score("kv_token_kv_thought_r", path))
    scores = all_variant_scores(pts, SUMS, (2, 0), thought)
    assert set(scores) == set(VARIANTS) and not math.isnan(scores["kv_layer_kv_all_c"])


def test_names_legacy_and_servable():
    assert parse_variant("kv_coe_r") == ("token", "kv", "all", "r")
    assert parse_variant("kv_layer_v_answer_c") == ("layer", "v", "answer", "c")
    with pytest.raises(ValueError, match="unknown KV-CoE variant"):
        parse_variant("kv_depth_kv_all_r")
    assert "kv_token_k_all_r" not in SERVABLE and all(v in SERVABLE for v in VARIANTS if v.startswith("kv_layer_"))


class _Reply:
    def __init__(self, traj, sums, counts, thought=None):
        self.kv_trajectory, self.kv_layer_sums, self.kv_counts, self.kv_thought = traj, sums, counts, thought


def test_served_confidence_is_the_offline_score_with_the_learned_direction():
    cal = ConfidenceCalibration(score="kv_layer_kv_all_r", sign=-1, a=2.0, b=0.1)
    reply = _Reply(None, SUMS, (2, 0))
    raw = variant_score("kv_layer_kv_all_r", None, SUMS, (2, 0))
    expected = 1 / (1 + math.exp(-(2.0 * -1 * raw + 0.1)))
    assert kv_confidence({"slow": cal}, "slow", reply) == pytest.approx(expected, abs=1e-12)
    assert kv_confidence({"slow": cal}, "fast", reply) is None  # no mapping for that mode
    assert kv_confidence({"slow": cal}, "slow", _Reply(None, None, None)) is None  # the reply cannot give it
    legacy = ConfidenceCalibration(score="kv_coe_r", sign=1, a=1.0, b=0.0)
    pts = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert kv_confidence({"fast": legacy}, "fast", _Reply(pts, None, None)) == pytest.approx(
        1 / (1 + math.exp(-(1 / R2 - 0.5))), abs=1e-6)


def test_hf_engine_sums_cover_exactly_the_trajectory(model_dir):
    """Layer-means of the running sums equal the sum of the token-axis points (linearity), and the
    thought/answer counts follow the per-point flags: a slow reply's thought, then its answer."""
    from serve_app.core.task import TaskConfig, generate_problems
    from serve_app.engines.base import GenRequest
    from serve_app.engines.hf import HFEngine
    from serve_app.engines.load import load_model

    m, tok = load_model(model_dir)
    hf = HFEngine(m, tok)
    prompts = [hf.encode_prompt(p.question) for p in generate_problems(3, seed=2323, config=TaskConfig(max_operators=2))]
    for mode in ("fast", "slow"):
        for r in hf.generate([GenRequest(p, mode=mode, max_new_tokens=768) for p in prompts]):
            n_thought = sum(r.kv_thought)
            assert r.kv_counts == (n_thought, len(r.kv_thought) - n_thought)
            assert len(r.kv_thought) == r.kv_trajectory.shape[0] - 1
            d = r.kv_layer_sums.shape[-1]
            by_layers = torch.cat([r.kv_layer_sums.sum(0)[0].mean(0), r.kv_layer_sums.sum(0)[1].mean(0)])
            torch.testing.assert_close(by_layers.float(), r.kv_trajectory[1:].sum(0), rtol=1e-4, atol=1e-3)
            assert by_layers.shape[0] == 2 * d
            if mode == "slow":
                assert r.finished and n_thought > 0 and r.kv_thought[0] and not r.kv_thought[-1]  # thought first, then the answer
            else:
                assert n_thought == 0
