"""``kvswitch bench-overhead``: what KV pooling costs on top of the prefill it reads.

Three variants run on the same left-padded batch, interleaved round-robin within every repeat
(the starting variant rotates each repeat) so machine noise hits all of them alike:

* ``prefill`` — one forward pass with ``use_cache=True``; the cache is the only thing kept;
* ``prefill+kv_pool`` — the same forward, then :func:`pool_kv` (probe feature) and
  :func:`kv_embedding` on the cache that forward returned (no second pass);
* ``prefill+hidden_states`` — the forward with ``output_hidden_states=True``, then
  :func:`pool_hidden` over ``hidden_states[1:]`` (the hidden-state baseline).

Times are medians (and p10/p90) over repeats; ratios are ``median(variant) / median(prefill)``
plus the median of the per-repeat paired ratios. Memory is reported three ways, CPU only, each
as extra bytes over the plain prefill and as a fraction of the model's parameter bytes:

* materialised bytes — ``nbytes`` of what each variant produces beyond the plain prefill
  (pooled features; all hidden states), next to the cache and parameter bytes for scale;
* allocator — ``torch.profiler`` memory events of one call: exact peak and retained bytes
  through torch's CPU allocator (deterministic; catches pooling temporaries);
* peak RSS — each variant runs once per batch size in a fresh interpreter; after loading and a
  shared tiny warm-up of all variants, the Linux peak-RSS mark is reset
  (``/proc/self/clear_refs``), so ``peak_rss_delta_bytes`` (from ``VmHWM``) is the growth caused
  by that one call. ``ru_maxrss`` is recorded too but is not reset with it (it keeps the load-time
  peak), so its delta is usually 0. RSS deltas are coarse (glibc caching, first-call state; about
  ±3 MiB run to run here): they bound the cost rather than account it byte for byte.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from random import Random

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from serve_app.config import DEFAULT_MODEL
from serve_app.core.kv_features import PoolingConfig
from serve_app.offline.bench.memory import allocator_deltas, materialised_bytes, param_bytes, rss_deltas
from serve_app.offline.bench.variants import HIDDEN, KV_EMBED, KV_POOL, PREFILL, VARIANTS, build_batch, make_variants
from serve_app.reports import machine


class BenchOverheadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = str(DEFAULT_MODEL)
    batch_sizes: list[int] = [1, 16]
    repeats: int = Field(30, ge=1)
    warmup: int = Field(3, ge=0)
    seed: int = 12345
    prompt_set: int = Field(64, ge=1, description="questions generated; each batch samples from them")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads for the run (None: leave as is)")
    thinking: bool = True
    logits_to_keep: int = Field(
        1, ge=0, description="logits computed by the forward: 1 = last position (what a server needs), 0 = all"
    )
    profile_memory: bool = Field(True, description="exact CPU-allocator peak/retained bytes per variant via torch.profiler")
    rss: bool = Field(True, description="also measure peak-RSS deltas, one fresh subprocess per variant and batch size")
    pooling: PoolingConfig = PoolingConfig()

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError("batch_sizes must be a non-empty list of positive integers")
        return value


# --------------------------------------------------------------------------- batch and variants

def batch_prompts(tokenizer, cfg: BenchOverheadConfig, batch_size: int) -> list[str]:
    """``batch_size`` prompts drawn (seeded) from the prompt set; with replacement only if it is too small."""
    from serve_app.core.task import generate_problems
    from serve_app.offline.generate import build_prompt

    questions = [p.question for p in generate_problems(cfg.prompt_set, cfg.seed)]
    rng = Random(cfg.seed + batch_size)
    if batch_size <= len(questions):
        picked = rng.sample(questions, batch_size)
    else:
        picked = rng.choices(questions, k=batch_size)
    return [build_prompt(tokenizer, q, thinking=cfg.thinking) for q in picked]



# --------------------------------------------------------------------------- timing


def _summary(times: list[float]) -> dict:
    arr = np.asarray(times)
    return {
        "median_s": float(np.median(arr)),
        "p10_s": float(np.percentile(arr, 10)),
        "p90_s": float(np.percentile(arr, 90)),
        "n": len(times),
    }


def time_variants(variants, repeats: int, warmup: int, desc: str) -> dict[str, list[float]]:
    """Per-variant wall times; variants interleaved round-robin, starting variant rotating per repeat."""
    names = list(variants)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                variants[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in tqdm(range(repeats), desc=desc, unit="rep"):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                kept = variants[name]()
                times[name].append(time.perf_counter() - start)
                del kept  # freed outside the timed region, for every variant alike
    return times


def machine_info() -> dict:
    """``serve_app.reports.machine`` plus the torch / transformers versions and thread counts."""
    import transformers

    return {**machine(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "device": "cpu"}


def run_bench_overhead(cfg: BenchOverheadConfig) -> dict:
    from serve_app.engines.load import load_model

    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        model, tokenizer = load_model(cfg.model)
        param_total = param_bytes(model)
        report: dict = {
            "config": cfg.model_dump(),
            "machine": machine_info(),
            "model": {"path": cfg.model, "param_bytes": param_total,
                      "parameters": sum(p.numel() for p in model.parameters())},
            "variants": list(VARIANTS),
            "results": {},
        }
        for batch_size in cfg.batch_sizes:
            prompts = batch_prompts(tokenizer, cfg, batch_size)
            batch = build_batch(tokenizer, prompts)
            variants = make_variants(model, batch, cfg.pooling, cfg.logits_to_keep)
            times = time_variants(variants, cfg.repeats, cfg.warmup, desc=f"batch {batch_size}")
            stats = {name: _summary(ts) for name, ts in times.items()}
            base = np.asarray(times[PREFILL])
            mask = batch["attention_mask"]
            entry = {
                **stats,
                "ratio_kv_pool": stats[KV_POOL]["median_s"] / stats[PREFILL]["median_s"],
                "ratio_kv_pool_embedding": stats[KV_EMBED]["median_s"] / stats[PREFILL]["median_s"],
                "ratio_hidden": stats[HIDDEN]["median_s"] / stats[PREFILL]["median_s"],
                "paired_ratio_kv_pool": float(np.median(np.asarray(times[KV_POOL]) / base)),
                "paired_ratio_kv_pool_embedding": float(np.median(np.asarray(times[KV_EMBED]) / base)),
                "paired_ratio_hidden": float(np.median(np.asarray(times[HIDDEN]) / base)),
                "shape": {"batch": int(mask.shape[0]), "seq": int(mask.shape[1]),
                          "real_tokens": int(mask.sum()), "pad_fraction": float(1 - mask.float().mean())},
                "memory": materialised_bytes(model, variants, param_total),
            }
            if cfg.profile_memory:
                entry["memory"]["allocator"] = allocator_deltas(variants, param_total)
            if cfg.rss:
                entry["memory"]["rss"] = rss_deltas(cfg.model, prompts, cfg.threads or torch.get_num_threads(), cfg.logits_to_keep,
                                                    cfg.pooling, param_total)
            report["results"][str(batch_size)] = entry
        return report
    finally:
        torch.set_num_threads(previous_threads)


# --------------------------------------------------------------------------- output


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} GiB"


def print_bench(report: dict) -> None:
    m = report["machine"]
    print(f"machine: {m['platform']}  cpus {m['cpu_count']}  torch {m['torch']}  threads {m['threads']}")
    print(f"model: {report['model']['path']}  params {_fmt_bytes(report['model']['param_bytes'])}")
    for bs, entry in report["results"].items():
        shape = entry["shape"]
        print(f"\nbatch {bs}: seq {shape['seq']}  real tokens {shape['real_tokens']}  "
              f"padding {shape['pad_fraction']:.1%}")
        print(f"{'variant':<24} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'ratio':>7}")
        base = entry[PREFILL]["median_s"]
        for name in report["variants"]:
            s = entry[name]
            print(f"{name:<24} {s['median_s'] * 1e3:>10.3f} {s['p10_s'] * 1e3:>9.3f} "
                  f"{s['p90_s'] * 1e3:>9.3f} {s['median_s'] / base:>6.3f}x")
        print(f"paired per-repeat ratio medians: kv_pool {entry['paired_ratio_kv_pool']:.3f}x  "
              f"kv_pool+embedding {entry['paired_ratio_kv_pool_embedding']:.3f}x  hidden {entry['paired_ratio_hidden']:.3f}x")
        mem = entry["memory"]
        print(f"memory: cache {_fmt_bytes(mem['cache_bytes'])}  params {_fmt_bytes(mem['param_bytes'])}")
        alloc, rss = mem.get("allocator"), mem.get("rss")
        print("extra memory vs prefill (fraction of params):")
        for name in (KV_POOL, KV_EMBED, HIDDEN):
            line = (f"  {name:<22} materialised {_fmt_bytes(mem['extra_bytes_vs_prefill'][name])}"
                    f" ({mem['extra_fraction_of_params'][name]:.2%})")
            if alloc:
                line += (f"  allocator peak {_fmt_bytes(alloc['extra_peak_bytes_vs_prefill'][name])}"
                         f" ({alloc['extra_peak_fraction_of_params'][name]:.2%})"
                         f" retained {_fmt_bytes(alloc['extra_retained_bytes_vs_prefill'][name])}"
                         f" ({alloc['extra_retained_fraction_of_params'][name]:.2%})")
            if rss:
                line += (f"  peak RSS {_fmt_bytes(rss['extra_peak_rss_bytes_vs_prefill'][name])}"
                         f" ({rss['extra_peak_rss_fraction_of_params'][name]:.2%})")
            print(line)


def plot_bench(report: dict, png_path: str | Path) -> None:
    """Median time per variant (p10–p90 whiskers), one panel per batch size, ratio vs prefill on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = report["variants"]
    colors = ["#4c72b0", "#55a868", "#8172b2", "#c44e52"]
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (bs, entry) in zip(axes[0], results.items()):
        med = np.array([entry[n]["median_s"] * 1e3 for n in names])
        lo = med - np.array([entry[n]["p10_s"] * 1e3 for n in names])
        hi = np.array([entry[n]["p90_s"] * 1e3 for n in names]) - med
        x = np.arange(len(names))
        ax.bar(x, med, color=colors[: len(names)], yerr=[lo, hi], capsize=4)
        for xi, m, h, n in zip(x, med, hi, names):
            ax.annotate(f"{m / med[0]:.3f}x", (xi, m + h), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=9)
        ax.set_xticks(x, [n.replace("+", "+\n") for n in names], fontsize=8)
        ax.set(ylabel="median time (ms)", title=f"batch {bs} (seq {entry['shape']['seq']})")
        ax.set_ylim(0, float((med + hi).max()) * 1.18)
        ax.grid(axis="y", alpha=0.3)
    threads = report["machine"]["threads"]
    fig.suptitle(f"Pooling overhead on prefill (CPU, {threads} thread{'' if threads == 1 else 's'})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
