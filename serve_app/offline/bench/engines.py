"""HF vs vLLM engine throughput on the same prompts: generated tokens per second at batch 1 and
batch B (B requests in flight), greedy, per mode, and what vLLM's in-engine online switching costs:
slow-online against slow without switching, and the cost of one online check at a short and a long
reply (it must not grow with the reply).

Both engines run in this process's machine, one after the other, on identical requests; the
replies are compared so a fast but wrong engine cannot win."""

from __future__ import annotations

import asyncio
import statistics
import time

import torch


def _hf_run(engine, probe, online, prompts, mode, on, batch):
    from serve_app.engines.base import GenRequest
    from serve_app.offline.generate import MAX_NEW_TOKENS

    out = []
    for i in range(0, len(prompts), batch):
        reqs = [GenRequest(p, mode=mode, online=on, max_new_tokens=MAX_NEW_TOKENS) for p in prompts[i : i + batch]]
        out += engine.generate(reqs, probe=probe, online=online)
    return out


async def _vllm_run(engine, prompts, mode, on, batch):
    from serve_app.engines.base import GenRequest
    from serve_app.offline.generate import MAX_NEW_TOKENS

    sem = asyncio.Semaphore(batch)

    async def one(p):
        async with sem:
            res = None
            async for _, res in engine.stream(GenRequest(p, mode=mode, online=on, max_new_tokens=MAX_NEW_TOKENS)):
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
    check_cost = asyncio.run(_check_cost(model, probe, prompts[:16], vllm_args or {}))
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
    by = {(r["mode"], r["online"], r["batch"]): r for r in rows}
    top = max(batches)
    online_vs_plain = by[("slow", True, top)]["vllm_tps"] / by[("slow", False, top)]["vllm_tps"]
    return {"model": model, "prompts": prompts_n, "threads": threads, "rows": rows,
            "slow_online_vs_slow_vllm_tps": online_vs_plain, "online_batch": top, "check_cost": check_cost}


async def _check_cost(model: str, probe, prompts: list[list[int]], vllm_args: dict, lengths=(192, 960), repeats: int = 3) -> dict:
    """Seconds one online check adds, at replies of ``lengths`` tokens: ``len(prompts)`` replies in
    flight, each forced to its length (``ignore_eos``), checked after every token (``every=1``) with
    thresholds that never switch, against the same replies without checks. Alternating runs, medians."""
    from vllm import SamplingParams

    from serve_app.core.policy import OnlineConfig
    from serve_app.engines.vllm_engine import VLLMEngine

    never = OnlineConfig(every=1, tau=50.0, delta=1e9, max_switches=1)
    eng = VLLMEngine.create(model, probe, never, coe=False, **vllm_args)

    async def batch(n: int, checked: bool) -> float:
        async def one(i, p):
            opts = {"kvswitch": {"key": f"cost-{n}-{checked}-{i}-{time.perf_counter_ns()}", "mode": "slow", "online": True}} if checked else {}
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False, extra_args={"kv_transfer_params": opts})
            async for _ in eng._run(p + eng.prefix_ids["slow"], params):
                pass

        t = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return time.perf_counter() - t

    try:
        await batch(16, True)  # warm-up
        out = {}
        for n in lengths:
            plain, checked = [], []
            for _ in range(repeats):
                plain.append(await batch(n, False))
                checked.append(await batch(n, True))
            per_check = (statistics.median(checked) - statistics.median(plain)) / (len(prompts) * n)
            out[str(n)] = {"plain_s": plain, "checked_s": checked, "per_check_ms": 1000 * per_check,
                           "checked_vs_plain": statistics.median(checked) / statistics.median(plain)}
        lo, hi = (out[str(n)]["per_check_ms"] for n in (lengths[0], lengths[-1]))
        out["long_vs_short"] = hi / lo if lo > 0 else None
        out["replies_in_flight"] = len(prompts)
        return out
    finally:
        eng.llm.shutdown()


def print_bench_engines(report: dict) -> None:
    print("| mode | online | batch | tokens | HF tok/s | vLLM tok/s | vLLM / HF | replies agree |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["rows"]:
        print(f"| {r['mode']} | {r['online']} | {r['batch']} | {r['tokens']} | {r['hf_tps']:.0f} | {r['vllm_tps']:.0f} "
              f"| {r['vllm_tps'] / r['hf_tps']:.2f}x | {100 * r['agree']:.0f}% |")
    print(f"\nvLLM slow-online / slow tok/s at batch {report['online_batch']}: {report['slow_online_vs_slow_vllm_tps']:.2f}x")
    cost = report["check_cost"]
    for n, c in cost.items():
        if isinstance(c, dict):
            print(f"one online check at a {n}-token reply ({cost['replies_in_flight']} in flight, a check every token): "
                  f"{c['per_check_ms']:.3f} ms; checked / unchecked wall time {c['checked_vs_plain']:.2f}x")
    if cost.get("long_vs_short") is not None:
        print(f"per-check cost, long / short reply: {cost['long_vs_short']:.2f}x")
