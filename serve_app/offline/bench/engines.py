"""HF vs vLLM engine throughput on the same prompts: generated tokens per second at batch 1 and
batch B (B requests in flight), greedy, per mode, plus the cost of vLLM's chunked online switching.

Both engines run in this process's machine, one after the other, on identical requests; the
replies are compared so a fast but wrong engine cannot win."""

from __future__ import annotations

import asyncio
import time

import torch


def _hf_run(engine, probe, online, prompts, mode, on, batch):
    from serve_app.engines.base import GenRequest

    out = []
    for i in range(0, len(prompts), batch):
        reqs = [GenRequest(p, mode=mode, online=on, max_new_tokens=768) for p in prompts[i : i + batch]]
        out += engine.generate(reqs, probe=probe, online=online)
    return out


async def _vllm_run(engine, prompts, mode, on, batch):
    from serve_app.engines.base import GenRequest

    sem = asyncio.Semaphore(batch)

    async def one(p):
        async with sem:
            res = None
            async for _, res in engine.stream(GenRequest(p, mode=mode, online=on, max_new_tokens=768)):
                pass
            return res

    return await asyncio.gather(*(one(p) for p in prompts))


def run_bench_engines(model: str, prompts_n: int = 32, batches=(1, 16), seed: int = 4040, threads: int = 1, vllm_args: dict | None = None) -> dict:
    from serve_app.core.probe import Probe
    from serve_app.core.task import generate_problems
    from serve_app.engines.hf import HFEngine
    from serve_app.engines.load import load_model
    from serve_app.engines.vllm_engine import VLLMEngine

    torch.set_num_threads(threads)
    hf_model, tok = load_model(model)
    hf = HFEngine(hf_model, tok)
    probe = Probe.load(f"{model}/probe.pt", hf_model.config)
    online = probe.online_config()
    prompts = [hf.encode_prompt(p.question) for p in generate_problems(prompts_n, seed=seed)]
    cases = [("fast", False), ("slow", False), ("slow", True)]
    rows = []

    async def all_vllm():
        eng = VLLMEngine.create(model, probe, online, **(vllm_args or {}))
        try:
            got = {}
            for mode, on in cases:
                for b in batches:
                    t = time.perf_counter()
                    res = await _vllm_run(eng, prompts, mode, on, b)
                    got[(mode, on, b)] = (res, time.perf_counter() - t)
            return got
        finally:
            eng.llm.shutdown()

    vllm_results = asyncio.run(all_vllm())
    for mode, on in cases:
        for b in batches:
            t = time.perf_counter()
            ref = _hf_run(hf, probe, online, prompts, mode, on, b)
            hf_s = time.perf_counter() - t
            got, v_s = vllm_results[(mode, on, b)]
            tokens = sum(r.tokens for r in ref)
            rows.append({"mode": mode, "online": on, "batch": b, "tokens": tokens, "hf_s": hf_s, "vllm_s": v_s,
                         "hf_tps": tokens / hf_s, "vllm_tps": sum(r.tokens for r in got) / v_s,
                         "agree": sum(g.text == r.text for g, r in zip(got, ref)) / len(ref)})
    return {"model": model, "prompts": prompts_n, "threads": threads, "rows": rows}


def print_bench_engines(report: dict) -> None:
    print("| mode | online | batch | tokens | HF tok/s | vLLM tok/s | vLLM / HF | replies agree |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["rows"]:
        print(f"| {r['mode']} | {r['online']} | {r['batch']} | {r['tokens']} | {r['hf_tps']:.0f} | {r['vllm_tps']:.0f} "
              f"| {r['vllm_tps'] / r['hf_tps']:.2f}x | {100 * r['agree']:.0f}% |")
