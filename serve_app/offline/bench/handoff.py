"""``kvswitch bench-handoff``: should the prefill pool hand its KV cache to the generator through
Ray's object store, or should the generator recompute the prefill?

Measured side by side, interleaved, on the same prompts and the same machine:

* ``recompute`` — the generator's own prefill of the prompt (what the service does), alone and
  per prompt in a batch (new rows join the decode batch together);
* ``handoff`` — the prompt's K/V tensors put into the object store by one process and read by a
  generator-like actor in another (``ray.put`` + actor call + ``ray.get``), minus the cost of an
  empty call to the same actor, i.e. the transfer alone, before any decode can start.

It also reports KV bytes per prompt and the same bytes for a real serving shape (Qwen3-8B:
36 layers × 8 KV heads × 128 head dim, bf16), where a 2,000-token prompt holds ~290 MB of KV.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from serve_app.core.task import generate_problems
from serve_app.reports import machine

QWEN3_8B_KV_BYTES_PER_TOKEN = 2 * 36 * 8 * 128 * 2  # K and V × layers × kv heads × head dim × bf16


def _kv_of(engine, prompt_ids: list[int]) -> list[torch.Tensor]:
    from serve_app.core.kv_features import cache_kv

    with torch.inference_mode():
        cache, _, _, _ = engine.prefill([prompt_ids])
    keys, values = cache_kv(cache)
    return [t.contiguous() for t in keys + values]


def run_bench_handoff(model: str, prompts: int = 16, repeats: int = 30, threads: int = 1) -> dict:
    import ray

    from serve_app.engines.hf import HFEngine
    from serve_app.engines.load import load_model

    torch.set_num_threads(threads)
    engine = HFEngine(*load_model(model))
    questions = [p.question for p in generate_problems(prompts, seed=8080)]
    ids = [engine.encode_prompt(q) for q in questions]
    kvs = [_kv_of(engine, p) for p in ids]

    @ray.remote(num_cpus=0)
    class Receiver:
        def take(self, tensors=None) -> int:
            return 0 if tensors is None else sum(t.numel() for t in tensors)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rx = Receiver.remote()
        ray.get(rx.take.remote())
        recompute, handoff, empty, batched = [], [], [], []
        for _ in tqdm(range(repeats), desc="handoff vs recompute", unit="round"):
            t0 = time.perf_counter()
            with torch.inference_mode():
                engine.prefill(ids)  # how the generator really prefills: new rows join together
            batched.append((time.perf_counter() - t0) / len(ids))
            for p, kv in zip(ids, kvs):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    engine.prefill([p])
                t1 = time.perf_counter()
                ray.get(rx.take.remote(ray.put(kv)))
                t2 = time.perf_counter()
                ray.get(rx.take.remote())
                t3 = time.perf_counter()
                recompute.append(t1 - t0)
                handoff.append(t2 - t1)
                empty.append(t3 - t2)
    finally:
        if started:
            ray.shutdown()
    tokens = statistics.median(len(p) for p in ids)
    kv_bytes = statistics.median(sum(t.nbytes for t in kv) for kv in kvs)
    med = statistics.median
    transfer = max(med(handoff) - med(empty), 0.0)
    return {
        "machine": {**machine(), "torch_threads": threads},
        "model": model,
        "prompts": prompts,
        "repeats": repeats,
        "median_prompt_tokens": tokens,
        "kv_bytes_per_prompt": kv_bytes,
        "recompute_prefill_ms": 1e3 * med(recompute),
        "recompute_batched_per_prompt_ms": 1e3 * med(batched),
        "handoff_call_ms": 1e3 * med(handoff),
        "empty_call_ms": 1e3 * med(empty),
        "handoff_transfer_ms": 1e3 * transfer,
        "handoff_over_recompute": med(handoff) / med(recompute),
        "handoff_over_batched_recompute": med(handoff) / med(batched),
        "qwen3_8b_kv_mb_per_2000_tokens": QWEN3_8B_KV_BYTES_PER_TOKEN * 2000 / 1e6,
        "decision": "recompute" if med(handoff) >= med(batched) else "handoff",
    }


def print_handoff(r: dict) -> None:
    print(f"prompt: {r['median_prompt_tokens']} tokens, KV {r['kv_bytes_per_prompt'] / 1024:.0f} KiB")
    print(f"recompute prefill (median)   {r['recompute_prefill_ms']:.2f} ms  "
          f"({r['recompute_batched_per_prompt_ms']:.2f} ms per prompt in a batch of {r['prompts']})")
    print(f"handoff via object store     {r['handoff_call_ms']:.2f} ms  (empty actor call {r['empty_call_ms']:.2f} ms, "
          f"transfer alone {r['handoff_transfer_ms']:.2f} ms)")
    print(f"handoff / recompute          {r['handoff_over_recompute']:.2f}x alone, {r['handoff_over_batched_recompute']:.2f}x batched"
          f"  -> {r['decision']}")
    print(f"for scale: Qwen3-8B holds {r['qwen3_8b_kv_mb_per_2000_tokens']:.0f} MB of bf16 KV for a 2,000-token prompt")


def plot_handoff(r: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    labels = ["recompute\nprefill", "handoff\n(object store)", "empty\nactor call"]
    ax.bar(labels, [r["recompute_prefill_ms"], r["handoff_call_ms"], r["empty_call_ms"]], color=["tab:green", "tab:red", "tab:gray"])
    ax.set_ylabel("median ms per prompt")
    ax.set_title(f"KV handoff vs recompute ({r['median_prompt_tokens']} tokens, {r['kv_bytes_per_prompt'] / 1024:.0f} KiB KV)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
