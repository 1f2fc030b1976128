"""KV-cache features (DESIGN §2): the difficulty-probe feature and the KV sentence embedding.

Pure torch, no Ray. Inputs are the per-layer key/value tensors of a transformers 5.x cache
(``cache.layers[l].keys`` / ``.values``, shape ``[batch, kv_heads, seq, head_dim]``) and the
attention mask over the same sequence axis (``[batch, seq]``, 1 = real token). Only real tokens
are pooled, so a left-padded, right-padded or unpadded batch gives the same feature per row.

The same pooling runs over hidden states (``output_hidden_states``) for the hidden-state baseline:
a hidden state ``[batch, seq, hidden]`` is treated as one "head" of width ``hidden``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field


class PoolingConfig(BaseModel):
    """How a cache becomes one vector. Stored inside every probe checkpoint (never in a file name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    last_tokens: int = Field(32, ge=1, description="S: pool the last S real positions")
    last_layers: int = Field(4, ge=1, description="n: pool the last n layers")
    token: Literal["sum", "mean", "last"] = "sum"
    heads: Literal["flatten", "mean"] = "flatten"
    layers: Literal["mean", "sum"] = "mean"
    part: Literal["k", "v", "kv"] = "kv"
    l2: bool = False

    def dim(self, kv_heads: int, head_dim: int) -> int:
        per_part = (kv_heads * head_dim) if self.heads == "flatten" else head_dim
        return per_part * (2 if self.part == "kv" else 1)


EMBEDDING_LAYERS = 4
"""The KV sentence embedding averages the last 4 layers (DESIGN §2)."""


def last_real_weights(attention_mask: torch.Tensor, last_tokens: int | None, token: str = "sum") -> torch.Tensor:
    """Per-position pooling weights ``[batch, seq]`` over the last ``last_tokens`` real positions.

    ``sum`` → 1 on each selected position, ``mean`` → 1/count, ``last`` → 1 on the last real
    position only. ``last_tokens=None`` selects every real position. Works for any padding side,
    holes included, because it ranks real positions from the end of each row.
    """
    mask = attention_mask.to(torch.float32)
    rank_from_end = mask.flip(-1).cumsum(-1).flip(-1) * mask  # 1 = last real token, 0 = padding
    if token == "last":
        return (rank_from_end == 1).to(torch.float32)
    selected = mask if last_tokens is None else mask * (rank_from_end <= last_tokens)
    if token == "mean":
        selected = selected / selected.sum(-1, keepdim=True).clamp(min=1.0)
    return selected


def _pool_layers(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, heads: str, layers: str
) -> torch.Tensor:
    """``tensors``: per-layer ``[batch, heads, seq, dim]``; returns ``[batch, heads*dim | dim]``."""
    pooled = []
    for t in tensors:
        # [b,1,1,s] @ [b,h,s,d] -> [b,h,1,d]; a batched matmul is ~6x faster than the einsum on CPU
        v = (weights[:, None, None, :] @ t.to(torch.float32)).squeeze(2)
        v = v.flatten(1) if heads == "flatten" else v.mean(1)
        pooled.append(v)
    stacked = torch.stack(pooled, 0)
    return stacked.mean(0) if layers == "mean" else stacked.sum(0)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def pool_kv(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    cfg: PoolingConfig,
) -> torch.Tensor:
    """The probe feature from per-layer K/V (all layers of the model, in order)."""
    if len(keys) != len(values) or not keys:
        raise ValueError("keys and values must be non-empty per-layer lists of equal length")
    if cfg.last_layers > len(keys):
        raise ValueError(f"pooling asks for the last {cfg.last_layers} layers; the cache has {len(keys)}")
    if tuple(attention_mask.shape) != (keys[0].shape[0], keys[0].shape[2]):
        raise ValueError(f"attention mask {tuple(attention_mask.shape)} does not match cache {tuple(keys[0].shape)}")
    weights = last_real_weights(attention_mask, cfg.last_tokens, cfg.token)
    ks, vs = keys[-cfg.last_layers :], values[-cfg.last_layers :]
    parts = []
    if cfg.part in ("k", "kv"):
        parts.append(_pool_layers(ks, weights, cfg.heads, cfg.layers))
    if cfg.part in ("v", "kv"):
        parts.append(_pool_layers(vs, weights, cfg.heads, cfg.layers))
    out = torch.cat(parts, -1)
    return _l2(out) if cfg.l2 else out


def pool_hidden(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor, cfg: PoolingConfig) -> torch.Tensor:
    """The same pooling over hidden states ``[batch, seq, hidden]`` (the embedding output excluded).

    ``part`` and ``heads`` do not apply: the hidden state is one vector per position.
    """
    layers = [h.unsqueeze(1) for h in hidden_states]
    if cfg.last_layers > len(layers):
        raise ValueError(f"pooling asks for the last {cfg.last_layers} layers; the model has {len(layers)}")
    weights = last_real_weights(attention_mask, cfg.last_tokens, cfg.token)
    out = _pool_layers(layers[-cfg.last_layers :], weights, "flatten", cfg.layers)
    return _l2(out) if cfg.l2 else out


def kv_embedding(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], attention_mask: torch.Tensor
) -> torch.Tensor:
    """KV sentence embedding: masked mean over all real tokens, mean over heads, [K; V],
    mean over the last 4 layers, L2-normalised → ``[batch, 2 * head_dim]``."""
    weights = last_real_weights(attention_mask, None, "mean")
    n = min(EMBEDDING_LAYERS, len(keys))
    k = _pool_layers(keys[-n:], weights, "mean", "mean")
    v = _pool_layers(values[-n:], weights, "mean", "mean")
    return _l2(torch.cat([k, v], -1))


def cache_kv(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values of a transformers 5.x cache (``cache.layers[l].keys/values``)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no .layers: a transformers 5.x Cache is required")
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def token_kv_vectors(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """KV-CoE point per row: the layer-average of the flattened ``[K_t; V_t]`` at one cache position.

    ``positions`` is ``[batch]`` (long); returns ``[batch, 2 * kv_heads * head_dim]``.
    """
    idx = positions.view(-1, 1, 1, 1)
    out = []
    for part in (keys, values):
        per_layer = []
        for t in part:
            gathered = t.gather(2, idx.expand(t.shape[0], t.shape[1], 1, t.shape[3])).squeeze(2)
            per_layer.append(gathered.flatten(1).to(torch.float32))
        out.append(torch.stack(per_layer, 0).mean(0))
    return torch.cat(out, -1)
