"""Resuming a streamed reply on another replica (``Job.resume``): the generator replays the token
chunks already sent and continues after them. The text the client gets in the end, its token count
and, for greedy and seeded sampling, every token are what the unbroken reply gives. Runs the real
generator code on the real engine and batcher, without Ray."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import accumulate

import pytest

pytest.importorskip("ray")
from deployments.generator import Generator  # noqa: E402
from deployments.metrics import GeneratorMetrics  # noqa: E402
from deployments.reporting import LoadReporter  # noqa: E402
from serve_app.config import AppConfig  # noqa: E402
from serve_app.engines.load import make_engine  # noqa: E402
from serve_app.serving.messages import Delta, Final, Job  # noqa: E402

HARD = "What is 41 - 17 + 8 - 60 + 5 + 12?"


def generator(pool: str):
    """The pool's Generator on this process (its replica context is Serve's; everything else real)."""
    g = Generator.func_or_class.__new__(Generator.func_or_class)
    g.pool, g.engine, g.online_enabled, g.replica = pool, make_engine(AppConfig(), pool), True, f"test-{pool}"
    g.metrics, g.skip_ids = GeneratorMetrics(pool), {g.engine.eos_id, g.engine.pad_id}
    g.cpu = ThreadPoolExecutor(max_workers=2)
    g.reporter = LoadReporter(None, pool, g.replica, dict, 1.0)
    return g


@pytest.fixture(scope="module")
def pools():
    return {p: generator(p) for p in ("slow", "fast")}


def collect(gen, job: Job) -> tuple[list[Delta], Final]:
    async def run():
        items = [item async for item in gen.generate_stream(job)]
        return items[:-1], items[-1]
    return asyncio.run(run())


def text(deltas) -> tuple[str, str]:
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas)


@pytest.mark.parametrize("pool,sampling", [("slow", {}), ("slow", {"temperature": 0.9, "seed": 11}), ("fast", {"temperature": 0.7, "seed": 3})],
                         ids=["slow-greedy", "slow-seeded", "fast-seeded"])
@pytest.mark.parametrize("cut", [0.2, 0.6])
def test_a_resumed_reply_continues_exactly_where_the_first_stopped(pools, pool, sampling, cut):
    gen = pools[pool]
    job = Job(prompt_ids=gen.engine.engine.encode_prompt(HARD), max_tokens=700, online=True, request_id="r", **sampling)
    deltas, final = collect(gen, job)
    ids = [i for d in deltas for i in d.token_ids]
    assert sum(len(d.token_ids) for d in deltas) == final.completion_tokens > 2
    k = max(1, int(len(deltas) * cut))  # the replica died after streaming k deltas
    sent = deltas[:k]
    rest, resumed = collect(gen, replace(job, resume=tuple(d.token_ids for d in sent)))
    assert [i for d in sent + rest for i in d.token_ids] == ids
    assert text(sent + rest) == text(deltas)
    assert resumed.resumed is True and final.resumed is False
    assert (resumed.completion_tokens, resumed.reasoning_tokens, resumed.finish_reason) == \
        (final.completion_tokens, final.reasoning_tokens, final.finish_reason)
    assert resumed.prompt_tokens == final.prompt_tokens


def test_a_slow_reply_resumed_before_its_switch_still_switches_at_the_same_token(pools):
    gen = pools["slow"]
    job = Job(prompt_ids=gen.engine.engine.encode_prompt(HARD), max_tokens=700, online=True)
    deltas, final = collect(gen, job)
    assert final.switched_at is not None and final.end_mode == "fast"  # the shipped probe switches this one (slow -> fast)
    ends = list(accumulate(len(d.token_ids) for d in deltas))
    for point in (final.switched_at // 2, final.switched_at - 10):  # before the streak of confirming checks, and inside it
        before = deltas[: sum(e <= point for e in ends)]
        _, resumed = collect(gen, replace(job, resume=tuple(d.token_ids for d in before)))
        assert (resumed.switched_at, resumed.end_mode) == (final.switched_at, "fast"), point


@pytest.mark.parametrize("max_tokens", [1, 8])
def test_a_reply_resumed_after_its_last_token_only_ends(pools, max_tokens):
    """Its replica died after the last token (cut by max_tokens, or at EOS) but before the final item."""
    gen = pools["fast"]
    job = Job(prompt_ids=gen.engine.engine.encode_prompt("What is 2 + 3?"), max_tokens=max_tokens, online=False)
    deltas, final = collect(gen, job)
    rest, resumed = collect(gen, replace(job, resume=tuple(d.token_ids for d in deltas)))
    assert rest == [] and (resumed.completion_tokens, resumed.finish_reason) == (final.completion_tokens, final.finish_reason)
    assert final.finish_reason == ("length" if max_tokens == 1 else "stop")
