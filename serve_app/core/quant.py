"""Simulated KV-cache quantization: symmetric integer fake-quant of keys and values.

``quantize`` maps a cache tensor ``[batch, kv_heads, seq, head_dim]`` onto a symmetric b-bit grid
(``scale = absmax / (2^(b-1) - 1)``, round to nearest, clamp) and back to float, so every
downstream consumer — attention, the probe feature, the KV-CoE trajectory — sees exactly what a
b-bit cache would hold. Scales are absmax over one group:

* ``per-tensor``  — one scale per request (batch row) and layer tensor, over heads, tokens, channels;
* ``per-channel`` — one scale per (row, head, channel), over tokens;
* ``per-token``   — one scale per (row, head, token), over the head's channels.

A batch row is one request, so rows never share a scale: results do not depend on what else is in
the batch. Only real positions (attention mask 1) count toward a scale and get quantized; padding is
left as it is (attention masks it anyway; zero-padding columns stay zero).

During generation ``quantize_cache(..., start=c)`` quantizes only the newly written columns ``c:``;
already-stored entries are never re-quantized. For per-tensor and per-channel the scale is the absmax
over the row's whole stored tensor *including* the new columns — a running absmax, as a cache that
keeps its grid and widens it when a larger value arrives. Attention inside the forward pass that
writes a column uses it unquantized (prefill included); every later step reads the quantized value.

Bits per layer: ``key_bits`` / ``value_bits`` everywhere, or a precision map ``{layer: "K8V4"}``.
16 bits means "not quantized".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

Granularity = Literal["per-tensor", "per-channel", "per-token"]
GRANULARITIES: tuple[str, ...] = ("per-tensor", "per-channel", "per-token")
FULL_PRECISION = 16
"""Bit width that means "leave this tensor in full precision"."""

_KV_RE = re.compile(r"K(\d+)V(\d+)", re.IGNORECASE)
_REDUCE_DIMS = {"per-tensor": (1, 2, 3), "per-channel": (2,), "per-token": (3,)}


def _check_bits(bits: int) -> int:
    if bits != FULL_PRECISION and not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2-8 (or {FULL_PRECISION} = full precision), got {bits}")
    return bits


def parse_kv_bits(spec: str) -> tuple[int, int]:
    """``"K8V4"`` → ``(8, 4)``: key and value bit widths."""
    match = _KV_RE.fullmatch(spec.strip())
    if match is None:
        raise ValueError(f"expected K<bits>V<bits> such as 'K8V4', got {spec!r}")
    return _check_bits(int(match[1])), _check_bits(int(match[2]))


def qmax(bits: int) -> int:
    """Largest grid level of a symmetric b-bit integer: 127 for int8, 7 for int4, 1 for int2."""
    return 2 ** (_check_bits(bits) - 1) - 1


def absmax_scale(t: torch.Tensor, bits: int, granularity: Granularity, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scale per group of ``t`` ``[B, H, T, D]`` (kept dims, broadcastable); ``mask`` ``[B, T]``
    (1 = real) keeps padding out of the absmax."""
    if t.ndim != 4:
        raise ValueError(f"expected a cache tensor [batch, kv_heads, seq, head_dim], got shape {tuple(t.shape)}")
    if granularity not in _REDUCE_DIMS:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    a = t.detach().abs().to(torch.float32)
    if mask is not None:
        a = a * mask[:, None, :, None].to(torch.float32)
    return a.amax(dim=_REDUCE_DIMS[granularity], keepdim=True) / qmax(bits)


def fake_quant(t: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``t / scale`` to the nearest level in [-qmax, qmax] and multiply back. A zero scale
    (an all-zero group) gives zeros."""
    q = qmax(bits)
    nonzero = scale > 0
    safe = torch.where(nonzero, scale, torch.ones_like(scale))
    out = torch.round(t.to(torch.float32) / safe).clamp(-q, q) * safe
    return torch.where(nonzero, out, torch.zeros_like(out)).to(t.dtype)


def quantize(t: torch.Tensor, bits: int, granularity: Granularity) -> torch.Tensor:
    """Symmetric fake-quant of a cache tensor ``[B, H, T, D]``: quantize → dequantize, same dtype.
    Error per element ≤ scale / 2 of its group; values on the grid come back exactly."""
    if bits == FULL_PRECISION:
        return t.clone()
    return fake_quant(t, absmax_scale(t, bits, granularity), bits)


class KVQuantConfig(BaseModel):
    """Bits for keys and values, one granularity, and an optional per-layer precision map."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_bits: int = 8
    value_bits: int = 8
    granularity: Granularity = "per-token"
    layers: dict[int, str] = Field(default_factory=dict, description='layer index → "K<bits>V<bits>"')

    @field_validator("key_bits", "value_bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        return _check_bits(value)

    @field_validator("layers")
    @classmethod
    def _layer_map(cls, value: dict[int, str]) -> dict[int, str]:
        for layer, spec in value.items():
            if layer < 0:
                raise ValueError(f"layer indices must be >= 0, got {layer}")
            parse_kv_bits(spec)
        return {k: value[k].upper() for k in sorted(value)}

    def bits(self, layer: int) -> tuple[int, int]:
        """(key bits, value bits) of one layer."""
        spec = self.layers.get(layer)
        return parse_kv_bits(spec) if spec else (self.key_bits, self.value_bits)

    @property
    def name(self) -> str:
        """The inline spec (``parse_kv_quant`` reads it back), e.g. ``K4V2/per-token@0=K8V4;1=K8V4``."""
        base = f"K{self.key_bits}V{self.value_bits}/{self.granularity}"
        return base + ("@" + ";".join(f"{k}={v}" for k, v in self.layers.items()) if self.layers else "")


def _layer_ranges(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    first, last = int(lo), int(hi or lo)
    if last < first:
        raise ValueError(f"layer range {text!r} is empty")
    return list(range(first, last + 1))


def parse_kv_quant(spec: str) -> KVQuantConfig | None:
    """A quantization setting from the command line or a config file; None for full precision.

    Inline: ``K<k>V<v>[/<granularity>][@<layers>=K<k>V<v>;...]`` with layers ``3`` or ``0-1``,
    e.g. ``K8V4``, ``K4V4/per-channel``, ``K4V2@0-1=K8V4``. ``fp`` (or ``none``) = full precision.
    A path ending in .json / .yaml / .yml holds the ``KVQuantConfig`` fields instead.
    """
    spec = spec.strip()
    if spec.lower() in ("fp", "none", "full"):
        return None
    if spec.endswith((".json", ".yaml", ".yml")):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no KV quantization config at {path}")
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            import yaml

            data = yaml.safe_load(path.read_text())
        return KVQuantConfig.model_validate(data)
    head, _, layer_part = spec.partition("@")
    bits_part, _, granularity = head.partition("/")
    key_bits, value_bits = parse_kv_bits(bits_part)
    layers: dict[int, str] = {}
    for item in filter(None, layer_part.split(";")):
        where, eq, bits = item.partition("=")
        if not eq:
            raise ValueError(f"layer map entry {item!r}: expected <layers>=K<bits>V<bits>, e.g. 0-1=K8V4")
        for layer in _layer_ranges(where):
            layers[layer] = bits
    fields = {"granularity": granularity} if granularity else {}
    return KVQuantConfig(key_bits=key_bits, value_bits=value_bits, layers=layers, **fields)


@torch.inference_mode()
def quantize_cache(cache, cfg: KVQuantConfig, mask: torch.Tensor | None = None, start: int = 0) -> None:
    """Fake-quantize a transformers 5.x cache in place (``cache.layers[i].keys/values``), columns
    ``start:`` only, real positions only (``mask`` ``[B, T]``, 1 = real; None = all real)."""
    layers = cache.layers
    beyond = [i for i in cfg.layers if i >= len(layers)]
    if beyond:
        raise ValueError(f"KV quantization map names layers {beyond}, but the model has {len(layers)} layers")
    for i, layer in enumerate(layers):
        for attr, bits in zip(("keys", "values"), cfg.bits(i)):
            if bits == FULL_PRECISION:
                continue
            t = getattr(layer, attr)
            new = t[:, :, start:]
            if cfg.granularity == "per-token":
                scale = absmax_scale(new, bits, "per-token")
            else:  # running absmax over every stored real position of the row
                scale = absmax_scale(t, bits, cfg.granularity, mask)
            q = fake_quant(new, scale, bits)
            if mask is not None:
                q = torch.where(mask[:, None, start:, None].bool(), q, new)
            t[:, :, start:] = q
