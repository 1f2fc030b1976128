"""KV-cache features (docs/method.md §1–2): the difficulty-probe feature and the KV sentence embedding.

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
"""The KV sentence embedding averages the last 4 layers (docs/method.md §2)."""


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
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, heads: str, layers: str, parts: int = 1
) -> torch.Tensor:
    """``tensors``: ``parts`` groups of per-layer ``[batch, heads, seq, dim]`` (e.g. the K layers
    then the V layers); ``weights``: ``[batch, s']`` over the *last* s' positions. Each group is
    reduced over its layers; the groups are concatenated → ``[batch, parts * (heads*dim | dim)]``.

    Everything is pooled with one batched matmul over the last s' positions only: few kernel
    launches, a copy of s' positions per layer at most, never of the whole cache.
    """
    span = weights.shape[1]
    stacked = torch.stack([t[:, :, -span:] for t in tensors], 0).to(torch.float32)  # [P*L, b, h, s', d]
    v = (weights[None, :, None, None, :] @ stacked).squeeze(-2)  # [P*L, b, h, d]
    v = v.flatten(2) if heads == "flatten" else v.mean(2)
    v = v.unflatten(0, (parts, -1))  # [P, L, b, F]
    v = v.mean(1) if layers == "mean" else v.sum(1)
    return v.transpose(0, 1).flatten(1)


def _tail_weights(attention_mask: torch.Tensor, cfg: PoolingConfig) -> torch.Tensor:
    """Weights over the shortest tail of the sequence that holds every selected position.

    Fast path for left-padded or unpadded batches (what the engines build): the last S real
    positions are the last S columns. Other layouts (right padding, holes) rank real positions
    from the end of each row.
    """
    seq = attention_mask.shape[1]
    if bool(attention_mask[:, -1].all()):
        span = min(cfg.last_tokens, seq) if cfg.token != "last" else 1
        mask = attention_mask[:, -span:].to(torch.float32)
        if cfg.token == "mean":
            mask = mask / mask.sum(-1, keepdim=True).clamp(min=1.0)
        return mask
    weights = last_real_weights(attention_mask, cfg.last_tokens, cfg.token)
    used = weights.any(0).nonzero()
    start = int(used[0]) if used.numel() else seq - 1
    return weights[:, start:]


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
    weights = _tail_weights(attention_mask, cfg)
    n = cfg.last_layers
    tensors = []
    if cfg.part in ("k", "kv"):
        tensors += keys[-n:]
    if cfg.part in ("v", "kv"):
        tensors += values[-n:]
    out = _pool_layers(tensors, weights, cfg.heads, cfg.layers, parts=2 if cfg.part == "kv" else 1)
    return _l2(out) if cfg.l2 else out


def pool_hidden(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor, cfg: PoolingConfig) -> torch.Tensor:
    """The same pooling over hidden states ``[batch, seq, hidden]`` (the embedding output excluded).

    ``part`` and ``heads`` do not apply: the hidden state is one vector per position.
    """
    layers = [h.unsqueeze(1) for h in hidden_states]
    if cfg.last_layers > len(layers):
        raise ValueError(f"pooling asks for the last {cfg.last_layers} layers; the model has {len(layers)}")
    weights = _tail_weights(attention_mask, cfg)
    out = _pool_layers(layers[-cfg.last_layers :], weights, "flatten", cfg.layers)
    return _l2(out) if cfg.l2 else out


def kv_embedding(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], attention_mask: torch.Tensor
) -> torch.Tensor:
    """KV sentence embedding: masked mean over all real tokens, mean over heads, [K; V],
    mean over the last 4 layers, L2-normalised → ``[batch, 2 * head_dim]``."""
    weights = last_real_weights(attention_mask, None, "mean")[:, None, None, :]
    n = min(EMBEDDING_LAYERS, len(keys))
    # Every real token is pooled: one matmul per layer, never a stacked copy of the cache.
    k = torch.stack([(weights @ t.to(torch.float32)).squeeze(2).mean(1) for t in keys[-n:]]).mean(0)
    v = torch.stack([(weights @ t.to(torch.float32)).squeeze(2).mean(1) for t in values[-n:]]).mean(0)
    return _l2(torch.cat([k, v], -1))


def cache_kv(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer keys and values of a transformers 5.x cache (``cache.layers[l].keys/values``)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no .layers: a transformers 5.x Cache is required")
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def token_kv_layers(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer K and V of a ``[batch, kv_heads, seq, head_dim]`` cache at one position per row,
    heads flattened: float32 ``[batch, layers, kv_heads * head_dim]`` each. Their layer-means,
    concatenated, are the token-axis KV-CoE point (``token_kv_vectors``); their sums over generated
    tokens feed the layer-axis variants (``serve_app.core.kv_coe``)."""
    idx = positions.view(-1, 1, 1, 1)
    at = lambda part: torch.stack([t.gather(2, idx.expand(t.shape[0], t.shape[1], 1, t.shape[3])).squeeze(2).flatten(1).to(torch.float32)
                                   for t in part], 1)  # noqa: E731
    return at(keys), at(values)


def token_kv_vectors(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """KV-CoE point per row of a ``[batch, kv_heads, seq, head_dim]`` cache at one position per row.

    ``positions`` is ``[batch]`` (long); returns ``[batch, 2 * kv_heads * head_dim]``.
    """
    k, v = token_kv_layers(keys, values, positions)
    return torch.cat([k.mean(1), v.mean(1)], -1)
