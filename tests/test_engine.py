"""The one decode loop: mixed-mode batches, switch accounting, and no re-prefill for kv-online."""

import pytest
import torch

from serve_app.core.kv_features import PoolingConfig
from serve_app.core.policy import OnlineConfig
from serve_app.core.probe import Probe
from serve_app.core.task import is_correct
from serve_app.engines.base import GenRequest
from serve_app.engines.hf import DecodeBatch, HFEngine
from serve_app.offline.generate import build_prompt, generate_greedy

EASY, HARD = "What is 2 + 3?", "What is 41 - 17 + 8 - 60 + 5 + 12?"


@pytest.fixture(scope="module")
def engine(shipped):
    return HFEngine(*shipped)


@pytest.fixture(scope="module")
def probe(model_dir, shipped):
    return Probe.load(model_dir / "probe.pt", shipped[0].config)


class ScriptedScorer:
    """Test double *in addition to* the real probe: fixed prompt and decode difficulties, so a
    switch happens at a known token."""

    pooling = PoolingConfig()

    def __init__(self, prompt: float, decode: float):
        self.prompt, self.decode, self.decode_calls = prompt, decode, 0

    def prompt_difficulty(self, features, kind="kv"):
        return torch.full((features.shape[0],), self.prompt)

    def decode_difficulty(self, features):
        self.decode_calls += 1
        return torch.full((features.shape[0],), self.decode)


class ForwardCounter:
    """Records the input_ids shape of every model forward."""

    def __init__(self, model):
        self.shapes = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))

    def close(self):
        self.handle.remove()


def test_fast_and_slow_match_transformers_generate(engine):
    """The engine's forced mode prefix + greedy loop reproduces HF generate on the templated prompt."""
    tok = engine.tokenizer
    for thinking, mode in ((False, "fast"), (True, "slow")):
        ref = generate_greedy(engine.model, tok, [build_prompt(tok, q, thinking) for q in (EASY, HARD)], 700)
        got = engine.generate([GenRequest(engine.encode_prompt(q), mode=mode, max_new_tokens=700) for q in (EASY, HARD)])
        assert [g.text for g in got] == [r.text for r in ref]
        assert [g.tokens for g in got] == [r.tokens for r in ref]  # the mode prefix is not counted
        assert all(g.start_mode == g.end_mode == mode for g in got)


def test_mixed_mode_batch_equals_one_at_a_time(engine):
    qs = [EASY, HARD, "What is 7 - 9?", "What is 50 + 25 - 5?"]
    reqs = [GenRequest(engine.encode_prompt(q), mode=m, max_new_tokens=700) for q, m in zip(qs, ["slow", "fast", "fast", "slow"])]
    batched = engine.generate(reqs)
    single = [engine.generate([r])[0] for r in reqs]
    assert [b.text for b in batched] == [s.text for s in single]
    assert [b.tokens for b in batched] == [s.tokens for s in single]


def test_online_switch_appends_counted_tokens_into_the_live_cache(engine):
    """Slow start, decode difficulty 0 < tau - delta: at the first check (k tokens) the row closes
    its thought; the appended ``</think>\\n\\n`` tokens are counted and the answer still comes."""
    k = 8
    scorer = ScriptedScorer(prompt=90.0, decode=0.0)
    req = GenRequest(engine.encode_prompt("What is 12 + 30?"), mode=None, online=True, max_new_tokens=300)
    counter = ForwardCounter(engine.model)
    try:
        res = engine.generate([req], probe=scorer, online=OnlineConfig(every=k, tau=50, delta=20))[0]
    finally:
        counter.close()
    close_ids = engine.switch_ids["fast"]
    assert res.start_mode == "slow" and res.end_mode == "fast"
    assert res.switched_at == k
    assert res.token_ids[k : k + len(close_ids)] == close_ids
    assert res.tokens == len(res.token_ids) == len(res.token_max_probs) + len(close_ids)
    assert "</think>\n\n" in res.text and res.finished
    # one prefill, then exactly one single-token forward per fed token
    prefill, steps = counter.shapes[0], counter.shapes[1:]
    assert prefill[1] == len(req.prompt_ids) and all(s == (1, 1) for s in steps)
    prefix = len(engine.prefix_ids["slow"])
    assert len(steps) == prefix + res.tokens - 1  # the last token (<|im_end|>) is never fed back
    assert scorer.decode_calls == 1  # max one switch: no checks after it


def test_confirm_waits_for_consecutive_checks(engine):
    scorer = ScriptedScorer(prompt=90.0, decode=0.0)
    res = engine.generate([GenRequest(engine.encode_prompt("What is 12 + 30 - 5?"), online=True, max_new_tokens=300)],
                          probe=scorer, online=OnlineConfig(every=8, tau=50, delta=20, confirm=2))[0]
    assert res.switched_at == 16 and scorer.decode_calls == 2
    assert [t for t, _ in res.checks] == [8, 16]


def test_no_switch_inside_the_hysteresis_band(engine):
    scorer = ScriptedScorer(prompt=90.0, decode=35.0)  # between tau - delta and tau + delta
    res = engine.generate([GenRequest(engine.encode_prompt("What is 12 + 30?"), online=True, max_new_tokens=300)],
                          probe=scorer, online=OnlineConfig(every=8, tau=50, delta=20))[0]
    assert res.switched_at is None and res.start_mode == res.end_mode == "slow"
    assert len(res.checks) == scorer.decode_calls and all(t % 8 == 0 for t, _ in res.checks)


def test_fast_to_slow_switch_opens_a_thought(engine):
    scorer = ScriptedScorer(prompt=0.0, decode=100.0)
    res = engine.generate([GenRequest(engine.encode_prompt(HARD), online=True, max_new_tokens=700)],
                          probe=scorer, online=OnlineConfig(every=1, tau=50, delta=20))[0]
    assert res.start_mode == "fast" and res.end_mode == "slow" and res.switched_at == 1
    assert res.token_ids[1 : 1 + len(engine.switch_ids["slow"])] == engine.switch_ids["slow"]


def test_kv_online_with_the_shipped_probe_never_reprefills(engine, probe):
    qs = [EASY, HARD, "What is 56 + 13 - 20?", "What is 80 - 15?"]
    reqs = [GenRequest(engine.encode_prompt(q), online=True, max_new_tokens=700) for q in qs]
    counter = ForwardCounter(engine.model)
    try:
        results = engine.generate(reqs, probe=probe, online=OnlineConfig(**probe.thresholds))
    finally:
        counter.close()
    assert counter.shapes[0][0] == len(qs) and counter.shapes[0][1] == max(len(r.prompt_ids) for r in reqs)
    assert all(s[1] == 1 for s in counter.shapes[1:]), "kv-online re-prefilled"
    # rows leave the batch when they finish: the decode batch never grows
    sizes = [s[0] for s in counter.shapes[1:]]
    assert sizes == sorted(sizes, reverse=True)
    assert all(r.difficulty is not None for r in results)
    assert results[0].start_mode == "fast" and results[1].start_mode == "slow"
    assert all(is_correct(r.reply, a) for r, a in zip(results, ["5", "-11", "49", "65"]))


def test_routing_needs_a_probe(engine):
    with pytest.raises(ValueError, match="probe"):
        engine.generate([GenRequest(engine.encode_prompt(EASY))])


def test_sampling_is_seeded(engine):
    req = lambda: GenRequest(engine.encode_prompt(HARD), mode="slow", temperature=1.0, seed=7, max_new_tokens=40)  # noqa: E731
    a, b = engine.generate([req()])[0], engine.generate([req()])[0]
    assert a.text == b.text


def test_rows_joining_mid_flight_decode_as_if_alone(engine, probe):
    """Continuous batching: rows added between steps (left-padded cache merge) and rows leaving
    give token-for-token the same replies as each request on its own, online switching included."""
    online = OnlineConfig(**probe.thresholds)
    first = [GenRequest(engine.encode_prompt(HARD), mode="slow", max_new_tokens=700),
             GenRequest(engine.encode_prompt(EASY), online=True, max_new_tokens=700)]
    later = [GenRequest(engine.encode_prompt("What is 56 + 13 - 20?"), online=True, max_new_tokens=700),
             GenRequest(engine.encode_prompt("What is 7 - 9 + 99 - 14 + 3?"), mode="fast", max_new_tokens=700)]
    batch = DecodeBatch(engine, probe, online)
    rows = batch.add(first)
    for _ in range(12):
        batch.step()
    rows += batch.add(later[:1])
    for _ in range(30):
        batch.step()
    rows += batch.add(later[1:])
    while batch.rows:
        batch.step()
    alone = [engine.generate([r], probe=probe, online=online)[0] for r in first + later]
    assert [r.result.text for r in rows] == [a.text for a in alone]
    assert [r.result.switched_at for r in rows] == [a.switched_at for a in alone]
    assert batch.cache is None  # every row left; nothing is held


def test_cancelled_row_leaves_without_disturbing_the_others(engine):
    reqs = [GenRequest(engine.encode_prompt(q), mode="slow", max_new_tokens=700) for q in (HARD, EASY)]
    batch = DecodeBatch(engine)
    rows = batch.add(reqs)
    for _ in range(5):
        batch.step()
    batch.cancel(rows[0])
    batch.step()
    assert batch.rows == [rows[1]] and rows[0].result is None
    while batch.rows:
        batch.step()
    assert rows[1].result.text == engine.generate([reqs[1]])[0].text


@pytest.mark.parametrize("cap", [0, 20, 100])
def test_a_thinking_cap_closes_the_thought_and_the_reply_answers(engine, cap):
    """``max_thinking_tokens``: the open thought holds exactly ``cap`` tokens, then the close-think
    tokens are forced (counted) and the model answers after them."""
    q = engine.encode_prompt(HARD)
    capped = engine.generate([GenRequest(q, mode="slow", max_new_tokens=700, max_thinking_tokens=cap)])[0]
    close = engine.switch_ids["fast"]
    assert capped.thinking_capped and capped.end_mode == "fast" and capped.start_mode == "slow"
    assert capped.token_ids[cap : cap + len(close)] == close
    answer = capped.text.split("</think>")[-1]
    assert answer.strip().removesuffix("<|im_end|>").strip().lstrip("-").isdigit(), capped.text[-80:]
    assert capped.tokens == len(capped.token_ids) < 700


def test_a_thought_that_ends_below_the_cap_is_not_capped(engine):
    q = engine.encode_prompt(HARD)
    free = engine.generate([GenRequest(q, mode="slow", max_new_tokens=700)])[0]
    under = engine.generate([GenRequest(q, mode="slow", max_new_tokens=700, max_thinking_tokens=free.tokens + 10)])[0]
    fast = engine.generate([GenRequest(q, mode="fast", max_new_tokens=50, max_thinking_tokens=0)])[0]
    assert not under.thinking_capped and under.token_ids == free.token_ids
    assert not fast.thinking_capped and fast.end_mode == "fast"  # no thought to cap
