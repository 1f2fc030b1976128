"""The serving core without Ray: continuous batching on an asyncio loop and reply parsing."""

import asyncio

import pytest

from serve_app.config import AppConfig
from serve_app.engines.base import GenerationError, GenRequest
from serve_app.engines.batcher import ContinuousBatcher
from serve_app.engines.load import make_engine
from serve_app.engines.reply import ReplyStream

EASY, HARD = "What is 2 + 3?", "What is 41 - 17 + 8 - 60 + 5 + 12?"


@pytest.fixture(scope="module")
def runtime():
    return make_engine(AppConfig(), "slow")  # a ContinuousBatcher: its HFEngine, probe and online settings


def _collect(batcher, req):
    async def go():
        ids, result = [], None
        async for new, result in batcher.stream(req):
            ids += new
        return ids, result
    return go()


def test_concurrent_streams_equal_the_engine_alone(runtime):
    eng = runtime.engine
    qs = [EASY, HARD, "What is 56 + 13 - 20?", "What is 7 - 9 + 99 - 14 + 3?"]
    reqs = [GenRequest(eng.encode_prompt(q), mode=m, online=True, max_new_tokens=700) for q, m in zip(qs, ["fast", "slow", "slow", "fast"])]
    batcher = ContinuousBatcher(runtime.engine, runtime.probe, runtime.online, max_batch_size=3)  # the 4th waits for a free row

    async def run():
        return await asyncio.gather(*(_collect(batcher, r) for r in reqs))

    outs = asyncio.run(run())
    alone = [eng.generate([r], probe=runtime.probe, online=runtime.online)[0] for r in reqs]
    for (ids, result), ref in zip(outs, alone):
        assert ids == ref.token_ids and result.text == ref.text
    assert batcher.stats().model_dump() == {"queued": 0, "running": 0, "predicted_tokens": 0.0}


def test_closing_a_stream_frees_its_row(runtime):
    eng = runtime.engine
    batcher = ContinuousBatcher(runtime.engine, runtime.probe, runtime.online, max_batch_size=4)

    async def run():
        stream = batcher.stream(GenRequest(eng.encode_prompt(HARD), mode="slow", max_new_tokens=700), predicted_tokens=300)
        got = 0
        async for ids, _ in stream:
            got += len(ids)
            if got >= 5:
                break
        assert batcher.stats().running == 1 and batcher.stats().predicted_tokens > 0
        await stream.aclose()
        for _ in range(50):
            await asyncio.sleep(0.02)
            if not batcher.batch.rows:
                break
        return got

    assert asyncio.run(run()) >= 5
    assert batcher.stats().running == 0 and not batcher.batch.rows


def test_a_failing_request_ends_alone_and_the_others_finish_unchanged(runtime, monkeypatch):
    """A prefill that fails (an empty prompt) and a sampling step that fails (injected for one seed)
    end their own streams with a ``GenerationError`` that names only the request id; the rows
    batched with them decode exactly as they would alone."""
    eng = runtime.engine
    good = [GenRequest(eng.encode_prompt(HARD), mode="slow", max_new_tokens=300, request_id="good-greedy"),
            GenRequest(eng.encode_prompt(EASY), mode="slow", temperature=0.8, seed=3, max_new_tokens=300, request_id="good-seeded")]
    bad_prefill = GenRequest([], mode="slow", max_new_tokens=50, request_id="bad-prefill")
    bad_sample = GenRequest(eng.encode_prompt("What is 7 + 8?"), mode="slow", temperature=0.9, seed=666, max_new_tokens=300,
                            request_id="bad-sample")
    alone = [eng.generate([r])[0].token_ids for r in good]
    sample = eng._sample

    def failing_sample(row, logits):
        if row.req.seed == 666 and row.generated >= 3:
            raise RuntimeError("injected secret detail")
        return sample(row, logits)

    monkeypatch.setattr(eng, "_sample", failing_sample)
    batcher = ContinuousBatcher(eng, runtime.probe, runtime.online, max_batch_size=8)

    async def run():
        async def one(req):
            try:
                return await _collect(batcher, req)
            except GenerationError as exc:
                return exc
        return await asyncio.gather(*(one(r) for r in [good[0], bad_prefill, bad_sample, good[1]]))

    g0, e_prefill, e_sample, g1 = asyncio.run(run())
    assert [g0[0], g1[0]] == alone
    for exc, rid in ((e_prefill, "bad-prefill"), (e_sample, "bad-sample")):
        assert isinstance(exc, GenerationError) and rid in str(exc) and "secret" not in str(exc) and "token" not in str(exc)
    assert batcher.stats().model_dump() == {"queued": 0, "running": 0, "predicted_tokens": 0.0} and not batcher.batch.rows


class CharTokenizer:
    """One character per token: makes split tags and stops easy to place."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _feed(text, thinking, stops=()):
    rs = ReplyStream(CharTokenizer(), thinking=thinking, stops=list(stops))
    reasoning, content = "", ""
    ids = [ord(ch) for ch in text]
    for i, tok in enumerate(ids):
        r, c = rs.push([tok], final=i == len(ids) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content, rs


def test_reply_stream_splits_thinking_from_the_answer_across_tokens():
    reasoning, content, rs = _feed("2 + 3 = 5\ncheck</think>\n\n5", thinking=True)
    assert reasoning == "2 + 3 = 5\ncheck" and content == "5" and not rs.stopped
    assert rs.reasoning_tokens == len("2 + 3 = 5\ncheck</think>")
    reasoning, content, _ = _feed("12<think>\nno, 13</think>\n\n13", thinking=False)  # a fast → slow switch
    assert content == "1213" and reasoning == "\nno, 13"


def test_reply_stream_stop_string_split_over_tokens():
    reasoning, content, rs = _feed("a - b - c</think>\n\nfinal", thinking=True, stops=[" - c"])
    assert reasoning == "a - b" and content == "" and rs.stopped
    _, content, rs = _feed("answer 42 END more", thinking=False, stops=["END"])
    assert content == "answer 42 " and rs.stopped
