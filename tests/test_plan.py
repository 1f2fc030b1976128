"""Planning without Ray (``serve_app.serving.plan``): the prefill fallback keeps online switching,
a forced mode does not switch, and the request id reaches every job."""

from serve_app.config import AppConfig
from serve_app.core.policy import PoolLoad
from serve_app.serving.plan import admit, jobs, plan
from serve_app.serving.schemas import ChatCompletionRequest

CFG = AppConfig()
PREFIX = {"fast": 3, "slow": 2}
LOAD = {"fast": PoolLoad(), "slow": PoolLoad()}


def _plan(difficulty, **body):
    req = ChatCompletionRequest(model=CFG.model_name, messages=[{"role": "user", "content": "What is 2 + 3?"}], **body)
    return req, plan(req, [1, 2, 3], admit(req, 3, CFG, 1024, PREFIX), difficulty, LOAD, 50.0, CFG)


def test_the_prefill_fallback_still_switches_online():
    _, p = _plan(None)
    assert p.fallback == "prefill_unavailable" and p.decision.pool == CFG.fallback_mode and p.online is True


def test_a_request_can_still_turn_online_switching_off():
    _, p = _plan(None, kvswitch={"online": False})
    assert p.fallback == "prefill_unavailable" and p.online is False


def test_a_forced_mode_does_not_switch_and_a_routed_one_does():
    assert _plan(None, kvswitch={"mode": "slow"})[1].online is False
    assert _plan(80.0)[1].online is True


def test_jobs_carry_the_request_id_and_one_seed_per_choice():
    req, p = _plan(80.0, n=3, seed=7, temperature=0.5)
    p.request_id = "chatcmpl-abc"
    js = jobs(p, req)
    assert [j.request_id for j in js] == ["chatcmpl-abc"] * 3 and [j.seed for j in js] == [7, 8, 9]


def test_the_thinking_cap_is_the_smaller_of_the_request_and_the_service_limit():
    assert _plan(80.0)[1].max_thinking_tokens is None
    assert _plan(80.0, kvswitch={"max_thinking_tokens": 50})[1].max_thinking_tokens == 50
    assert _plan(80.0, thinking_token_budget=40)[1].max_thinking_tokens == 40  # vLLM's name
    limited = AppConfig(limits={"max_thinking_tokens": 30})
    req = ChatCompletionRequest(model=CFG.model_name, messages=[{"role": "user", "content": "hi"}], thinking_token_budget=40)
    assert plan(req, [1], admit(req, 1, limited, 1024, PREFIX), 80.0, LOAD, 50.0, limited).max_thinking_tokens == 30
    req, p = _plan(80.0, kvswitch={"max_thinking_tokens": 7})
    p.request_id = "x"
    assert jobs(p, req)[0].max_thinking_tokens == 7


def test_two_different_thinking_caps_are_refused():
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match="disagree"):
        _plan(80.0, kvswitch={"max_thinking_tokens": 7}, thinking_token_budget=8)
    with pytest.raises(pydantic.ValidationError):
        _plan(80.0, thinking_token_budget=-1)
