"""Tensors over JSON: little-endian float32 bytes in base64 (the encoding of the OpenAI embeddings
API's ``encoding_format: base64``). The admin endpoints (``/admin/v1/...``) send features this way:
exact float32, a quarter of the size of decimal text."""

from __future__ import annotations

import base64
import math

import numpy as np
import torch


def pack_f32(t: torch.Tensor) -> str:
    """A 1-D tensor as base64 of its float32 little-endian bytes."""
    return base64.b64encode(np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype="<f4").tobytes()).decode()


def unpack_f32(s: str) -> torch.Tensor:
    """``pack_f32``'s inverse: a 1-D float32 tensor."""
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype="<f4").copy())


def finite_or_none(scores: dict[str, float]) -> dict[str, float | None]:
    """Scores for JSON, which has no NaN: a score a reply cannot give (NaN) becomes null."""
    return {k: (None if v is None or math.isnan(v) else float(v)) for k, v in scores.items()}


def none_to_nan(scores: dict[str, float | None]) -> dict[str, float]:
    """``finite_or_none``'s inverse."""
    return {k: (math.nan if v is None else float(v)) for k, v in scores.items()}
