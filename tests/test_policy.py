"""The routing policy is a pure function: pinned here without Ray or a model."""

import pytest

from serve_app.core.policy import OnlineConfig, PolicyConfig, PoolLoad, choose_pool, expected_tokens, fit_token_map, switch_decision, unreachable_switches

CFG = PolicyConfig(borderline_margin=10, slow_saturation_requests=4, slow_saturation_tokens=1000, fast_saturation_requests=8)
IDLE = PoolLoad()
BUSY = PoolLoad(running=4, predicted_tokens=100)


def test_difficulty_decides_when_pools_are_idle():
    assert choose_pool(50.0, 50.0, IDLE, IDLE, CFG).pool == "fast"  # d ≤ τ
    assert choose_pool(50.1, 50.0, IDLE, IDLE, CFG).pool == "slow"
    assert choose_pool(99.0, 50.0, IDLE, IDLE, CFG).reason == "hard"


def test_saturated_slow_pool_shifts_only_borderline_requests_to_fast():
    shifted = choose_pool(55.0, 50.0, IDLE, BUSY, CFG)
    assert shifted.pool == "fast" and shifted.reason == "borderline-shifted"
    assert choose_pool(60.0, 50.0, IDLE, BUSY, CFG).pool == "fast"  # edge of the margin
    assert choose_pool(60.5, 50.0, IDLE, BUSY, CFG).pool == "slow"  # clearly hard: never shifted


def test_predicted_tokens_alone_can_saturate_the_slow_pool():
    heavy = PoolLoad(running=1, predicted_tokens=1000)
    assert choose_pool(55.0, 50.0, IDLE, heavy, CFG).pool == "fast"


def test_load_never_pushes_easy_requests_to_slow_nor_overfills_fast():
    assert choose_pool(10.0, 50.0, PoolLoad(running=1000, predicted_tokens=1e6), IDLE, CFG).pool == "fast"
    full_fast = PoolLoad(running=8)
    assert choose_pool(55.0, 50.0, full_fast, BUSY, CFG).pool == "slow"


def test_expected_tokens_grow_with_difficulty_in_the_slow_pool():
    cfg = PolicyConfig(fast_tokens=4, slow_tokens_min=100, slow_tokens_max=300)
    assert expected_tokens(80, "fast", cfg) == 4
    assert expected_tokens(0, "slow", cfg) == 100 and expected_tokens(50, "slow", cfg) == 200
    assert expected_tokens(150, "slow", cfg) == 300  # clamped


def test_a_fitted_token_map_is_the_least_squares_line_read_at_0_and_100():
    fitted = fit_token_map([0, 50, 100, 150], [100, 200, 300, 300], [2, 4])  # 150 counts as 100, as expected_tokens clamps it
    assert fitted == pytest.approx({"fast_tokens": 3.0, "slow_tokens_min": 100.0, "slow_tokens_max": 300.0})
    cfg = PolicyConfig(**fitted)
    assert expected_tokens(50, "slow", cfg) == pytest.approx(200.0) and expected_tokens(90, "fast", cfg) == 3.0
    steep = fit_token_map([90, 100], [0, 1000], [3])  # the line crosses 0 well above difficulty 0: floored there
    assert steep["slow_tokens_min"] == 0.0 and steep["slow_tokens_max"] == pytest.approx(1000.0)
    falling = fit_token_map([0, 100], [500, 100], [3])  # longer replies for easier questions: kept ordered, not inverted
    assert falling["slow_tokens_max"] == falling["slow_tokens_min"] == 500.0
    for bad in (([50], [100], [3]), ([50, 50], [100, 200], [3]), ([0, 100], [1, 2], [])):
        with pytest.raises(ValueError, match="token map"):
            fit_token_map(*bad)


def test_config_rejects_inverted_token_range():
    with pytest.raises(ValueError, match="slow_tokens_max"):
        PolicyConfig(slow_tokens_min=300, slow_tokens_max=100)


def test_unreachable_switches_names_thresholds_outside_the_difficulty_range():
    assert unreachable_switches(OnlineConfig(tau=50, delta=20)) == []
    never_closes = OnlineConfig(tau=30, delta=45)  # the threshold v1's probe carried to a dev-chosen tau
    notes = unreachable_switches(never_closes)
    assert len(notes) == 1 and "slow -> fast never fires" in notes[0]
    # and indeed no difficulty in [0, 100] switches a slow reply
    assert all(switch_decision("slow", d, 0, never_closes)[0] is None for d in (0.0, 1.0, 50.0, 100.0))
    both = unreachable_switches(OnlineConfig(tau=50, delta=50))
    assert [n.split(":")[1].strip() for n in both] == ["slow -> fast never fires", "fast -> slow never fires"]


def test_eval_says_when_kv_online_cannot_close_a_thought(capsys):
    from serve_app.offline.eval_report import warn_unreachable

    never_closes = OnlineConfig(tau=30, delta=45)
    assert warn_unreachable(never_closes, ["fast", "slow"]) == []  # no kv-online: nothing to say
    notes = warn_unreachable(never_closes, ["slow", "kv-online"])
    assert notes and "tau 30, delta 45" in capsys.readouterr().err
    assert warn_unreachable(None, ["kv-online"]) == []
