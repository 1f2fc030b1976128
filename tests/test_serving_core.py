"""The serving core without Ray: continuous batching on an asyncio loop and reply parsing."""

import asyncio

import pytest

from serve_app.config import AppConfig
from serve_app.engines.base import GenRequest
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
