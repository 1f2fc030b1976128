import json

import pytest

from serve_app.offline.bench.memory import run_rss_worker
from serve_app.offline.bench.overhead import (
    HIDDEN,
    KV_POOL,
    PREFILL,
    VARIANTS,
    BenchOverheadConfig,
    batch_prompts,
    plot_bench,
    print_bench,
    run_bench_overhead,
)


@pytest.fixture(scope="module")
def report(model_dir):
    # Peak RSS needs a fresh interpreter per variant (~5 s each): checked once, separately, below.
    # One thread: immune to oversubscription when other jobs share the cores (tiny model anyway).
    cfg = BenchOverheadConfig(
        model=str(model_dir), repeats=3, warmup=1, batch_sizes=[2], prompt_set=8, threads=1, rss=False
    )
    return run_bench_overhead(cfg)


def test_report_shape_and_times(report):
    assert {"config", "machine", "results"} <= report.keys()
    assert {"platform", "cpu_count", "torch", "threads"} <= report["machine"].keys()
    assert report["config"]["batch_sizes"] == [2]
    json.dumps(report)  # JSON-serialisable as is
    entry = report["results"]["2"]
    for name in VARIANTS:
        stats = entry[name]
        assert stats["n"] == 3
        assert 0 < stats["p10_s"] <= stats["median_s"] <= stats["p90_s"]
    for key in ("ratio_kv_pool", "ratio_hidden", "paired_ratio_kv_pool", "paired_ratio_hidden"):
        assert entry[key] > 0
    assert entry["shape"]["batch"] == 2


def test_memory_accounting(report):
    mem = report["results"]["2"]["memory"]
    params = mem["param_bytes"]
    assert params == report["model"]["param_bytes"] > 0
    extra = mem["extra_bytes_vs_prefill"]
    assert extra[PREFILL] == 0
    # The pooled KV feature is a few vectors per row: negligible next to the weights.
    assert 0 < extra[KV_POOL] < params / 1000
    assert mem["extra_fraction_of_params"][KV_POOL] < 1e-3
    # Keeping every layer's hidden states materialises far more than pooling the cache.
    assert mem["materialised_bytes"][HIDDEN] > mem["materialised_bytes"][KV_POOL]
    assert extra[HIDDEN] > extra[KV_POOL]
    assert mem["hidden_states_bytes"] > 0 and mem["cache_bytes"] > 0
    # Allocator account: the KV variant keeps exactly its pooled vectors beyond the prefill, and
    # its transient peak stays negligible; keeping hidden states retains more than that.
    alloc = mem["allocator"]
    assert alloc is not None
    assert alloc["extra_retained_bytes_vs_prefill"][KV_POOL] == extra[KV_POOL]
    assert alloc["extra_peak_bytes_vs_prefill"][KV_POOL] < params / 100
    assert alloc["extra_retained_bytes_vs_prefill"][HIDDEN] > alloc["extra_retained_bytes_vs_prefill"][KV_POOL]
    assert alloc["per_variant"][PREFILL]["retained_bytes"] >= mem["cache_bytes"]
    assert "rss" not in mem


def test_rss_worker_runs_in_a_fresh_interpreter(shipped, model_dir):
    _, tokenizer = shipped
    cfg = BenchOverheadConfig(model=str(model_dir), prompt_set=8)
    job = {
        "model": cfg.model,
        "prompts": batch_prompts(tokenizer, cfg, 2),
        "threads": 1,
        "logits_to_keep": cfg.logits_to_keep,
        "pooling": cfg.pooling.model_dump(),
        "variant": KV_POOL,
    }
    result = run_rss_worker(job)
    assert result["variant"] == KV_POOL
    assert result["rss_before_bytes"] > 0
    assert result["peak_rss_delta_bytes"] >= 0
    assert "ru_maxrss_delta_bytes" in result


def test_print_and_plot(report, tmp_path, capsys):
    print_bench(report)
    assert "prefill+kv_pool" in capsys.readouterr().out
    png = tmp_path / "bench.png"
    plot_bench(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_rejects_bad_batch_sizes():
    with pytest.raises(ValueError):
        BenchOverheadConfig(batch_sizes=[])
    with pytest.raises(ValueError):
        BenchOverheadConfig(batch_sizes=[0])
