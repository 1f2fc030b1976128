"""Memory cost of each ``bench-overhead`` variant, three ways (CPU only): materialised bytes, torch's
allocator events, and peak RSS of one call in a fresh interpreter per variant."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from serve_app.core.kv_features import PoolingConfig, cache_kv
from serve_app.offline.bench.variants import HIDDEN, KV_EMBED, KV_POOL, PREFILL, VARIANTS, build_batch, make_variants

REPO_ROOT = Path(__file__).resolve().parents[3]


def _unique_nbytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def param_bytes(model) -> int:
    return _unique_nbytes(list(model.parameters()) + list(model.buffers()))


def materialised_bytes(model, variants, param_total: int) -> dict:
    """``nbytes`` of what each variant produces, and the extra over the plain prefill."""
    with torch.inference_mode():
        base = variants[PREFILL]()
        kv = variants[KV_EMBED]()
        hs = variants[HIDDEN]()
    keys, values = cache_kv(base["out"].past_key_values)
    cache = _unique_nbytes(keys + values)
    logits = base["out"].logits.nbytes
    kv_feature = kv["feature"].nbytes
    kv_emb = kv["embedding"].nbytes
    hidden = _unique_nbytes(hs["out"].hidden_states)
    hidden_feature = hs["feature"].nbytes
    extra = {PREFILL: 0, KV_POOL: kv_feature, KV_EMBED: kv_feature + kv_emb, HIDDEN: hidden + hidden_feature}
    return {
        "param_bytes": param_total,
        "cache_bytes": cache,
        "logits_bytes": logits,
        "kv_feature_bytes": kv_feature,
        "kv_embedding_bytes": kv_emb,
        "kv_feature_dim": int(kv["feature"].shape[-1]),
        "kv_embedding_dim": int(kv["embedding"].shape[-1]),
        "hidden_states_bytes": hidden,
        "hidden_states_count": len(hs["out"].hidden_states),
        "hidden_feature_bytes": hidden_feature,
        "hidden_feature_dim": int(hs["feature"].shape[-1]),
        "materialised_bytes": {
            PREFILL: cache + logits,
            KV_POOL: cache + logits + extra[KV_POOL],
            KV_EMBED: cache + logits + extra[KV_EMBED],
            HIDDEN: cache + logits + extra[HIDDEN],
        },
        "extra_bytes_vs_prefill": extra,
        "extra_fraction_of_params": {k: v / param_total for k, v in extra.items()},
    }


def allocator_profile(fn) -> dict | None:
    """Exact CPU-allocator account of one call (``torch.profiler``, ``profile_memory=True``).

    ``peak_bytes``: the highest net bytes allocated during the call over what was allocated before
    it; ``retained_bytes``: what is still allocated at the end while the call's outputs are held.
    None where this torch build exposes no memory events.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            kept = fn()
        try:
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        except AttributeError:
            return None
        del kept
    if not events:
        return None
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return {"peak_bytes": int(peak), "retained_bytes": int(current), "events": len(events)}


def allocator_deltas(variants, param_total: int) -> dict | None:
    per_variant = {}
    for name, fn in variants.items():
        with torch.inference_mode():
            fn()  # same shapes just ran in the timing loop; one more call keeps the state alike
        result = allocator_profile(fn)
        if result is None:
            return None
        per_variant[name] = result
    base = per_variant[PREFILL]
    extra_peak = {v: r["peak_bytes"] - base["peak_bytes"] for v, r in per_variant.items()}
    extra_kept = {v: r["retained_bytes"] - base["retained_bytes"] for v, r in per_variant.items()}
    return {
        "per_variant": per_variant,
        "extra_peak_bytes_vs_prefill": extra_peak,
        "extra_retained_bytes_vs_prefill": extra_kept,
        "extra_peak_fraction_of_params": {v: b / param_total for v, b in extra_peak.items()},
        "extra_retained_fraction_of_params": {v: b / param_total for v, b in extra_kept.items()},
    }


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024  # Linux reports KiB, macOS bytes


def rss_worker_main() -> None:
    """Entry point of the fresh interpreter: JSON job on stdin, one JSON line on stdout."""
    job = json.loads(sys.stdin.read())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    from serve_app.engines.load import load_model

    model, tokenizer = load_model(job["model"])
    pooling = PoolingConfig(**job["pooling"])
    batch = build_batch(tokenizer, job["prompts"])
    # Shared warm-up, identical in every worker: all three variants on a one-row batch fault in
    # the code pages and lazy state of every path, so only the measured call differs.
    tiny = build_batch(tokenizer, job["prompts"][:1])
    with torch.inference_mode():
        for warm in make_variants(model, tiny, pooling, job["logits_to_keep"]).values():
            warm()
    fn = make_variants(model, batch, pooling, job["logits_to_keep"])[job["variant"]]

    reset = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    hwm_before = _proc_status_kib("VmHWM")
    maxrss_before = _maxrss_bytes()
    with torch.inference_mode():
        kept = fn()
    hwm_after = _proc_status_kib("VmHWM")
    rss_after = _proc_status_kib("VmRSS")
    maxrss_after = _maxrss_bytes()
    del kept
    result = {
        "variant": job["variant"],
        "peak_reset": reset,
        "ru_maxrss_before_bytes": maxrss_before,
        "ru_maxrss_after_bytes": maxrss_after,
        "ru_maxrss_delta_bytes": maxrss_after - maxrss_before,
    }
    if rss_before is not None and hwm_after is not None and rss_after is not None:
        base = rss_before if reset else hwm_before
        result.update(
            rss_before_bytes=rss_before * 1024,
            peak_rss_delta_bytes=(hwm_after - base) * 1024,
            retained_rss_delta_bytes=(rss_after - rss_before) * 1024,
        )
    else:  # no /proc: the getrusage high-water mark is all there is
        result.update(peak_rss_delta_bytes=maxrss_after - maxrss_before, retained_rss_delta_bytes=None)
    print(json.dumps(result), flush=True)


def run_rss_worker(job: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", "from serve_app.offline.bench.memory import rss_worker_main; rss_worker_main()"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"RSS worker for {job['variant']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_deltas(model: str, prompts: list[str], threads: int, logits_to_keep: int, pooling: PoolingConfig, param_total: int) -> dict:
    """Peak-RSS growth of one call of each variant, each in its own fresh interpreter."""
    base_job = {"model": model, "prompts": prompts, "threads": threads, "logits_to_keep": logits_to_keep, "pooling": pooling.model_dump()}
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    # Workers only load and run once; more of them than cores just makes them fight.
    with ThreadPoolExecutor(max_workers=max(1, min(len(VARIANTS), cpus))) as pool:
        results = list(pool.map(lambda v: run_rss_worker({**base_job, "variant": v}), VARIANTS))
    per_variant = {r.pop("variant"): r for r in results}
    base = per_variant[PREFILL]["peak_rss_delta_bytes"]
    extra = {v: per_variant[v]["peak_rss_delta_bytes"] - base for v in VARIANTS}
    return {
        "per_variant": per_variant,
        "extra_peak_rss_bytes_vs_prefill": extra,
        "extra_peak_rss_fraction_of_params": {v: b / param_total for v, b in extra.items()},
    }
