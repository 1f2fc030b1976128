"""Output-free answer-correctness scores: Chain-of-Embedding (CoE) and token-level baselines.

CoE (Wang et al., ICLR 2025; KV variant arXiv 2601.20326) reads a trajectory of per-layer
embeddings ``e_0 … e_T`` (a ``[T+1, D]`` tensor) and scores how "straight" the path is:

    M_t = ‖e_{t+1} − e_t‖ / ‖e_T − e_0‖                          (relative step magnitude)
    A_t = arccos(cos(e_{t+1}, e_t)) / arccos(cos(e_T, e_0))      (relative step angle)
    CoE-R = mean_t M_t − mean_t A_t
    CoE-C = | mean_t M_t · exp(i·A_t) |

for ``t = 0 … T-1``. Everything is computed in float64; denominators are clamped to ``EPS`` and
cosines to ``[-1, 1]``, so no input yields NaN (a zero vector has cosine 0 with anything).

Also here: token-level baselines (max-prob, perplexity, entropy) and the Platt-scaled
score → confidence map that serving applies (fitted offline: ``serve_app.offline.metrics``).
Pure math: no Ray, no model code, no scikit-learn. See docs/method.md §6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel

EPS = 1e-12
"""Clamp for zero denominators (norms and the endpoint angle)."""

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------------------- CoE


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, 0 where either vector is zero, clamped to [-1, 1]."""
    denom = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(EPS)
    return ((a * b).sum(-1) / denom).clamp(-1.0, 1.0)


class CoePath:
    """A trajectory ``e_0 … e_T`` kept as what CoE reads of it, so an engine can build it while it
    decodes (one point per token, no stored points): per step ``t`` the absolute step norm
    ``‖e_{t+1} − e_t‖`` and angle ``arccos(cos(e_{t+1}, e_t))`` (``steps``, float64 ``[T, 2]``), and the
    endpoint span ``(‖e_T − e_0‖, arccos(cos(e_T, e_0)))``. ``coe_features`` / ``coe_scores`` accept it
    in place of the ``[T+1, D]`` tensor and give the same values."""

    def __init__(self, steps, span: tuple[float, float]):
        self.steps = torch.as_tensor(steps, dtype=torch.float64).reshape(-1, 2)
        self.span = (float(span[0]), float(span[1]))

    @classmethod
    def from_trajectory(cls, trajectory: torch.Tensor) -> CoePath:
        e = torch.as_tensor(trajectory).detach().to(torch.float64)
        if e.shape[0] < 2:
            return cls(torch.zeros(0, 2), (0.0, 0.0))
        steps = torch.stack([(e[1:] - e[:-1]).norm(dim=-1), torch.arccos(_cos(e[1:], e[:-1]))], -1)
        return cls(steps, (float((e[-1] - e[0]).norm()), float(torch.arccos(_cos(e[-1], e[0])))))

    def __len__(self) -> int:
        """Number of points (``T + 1``), as ``len`` of the trajectory tensor."""
        return self.steps.shape[0] + 1

    def __repr__(self) -> str:
        return f"CoePath(points={len(self)}, span={self.span})"


def step_summary(prev: torch.Tensor, point: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """New points of ``CoePath``s, one per row (``[N, D]`` each, or ``[D]``): per row (step norm, step
    angle) from ``prev`` and the span (norm, angle) from ``first`` → float64 ``[N, 4]`` (the formulas
    ``coe_features`` uses)."""
    p, q, f = (t.to(torch.float64) for t in (prev, point, first))
    return torch.stack([(q - p).norm(dim=-1), torch.arccos(_cos(q, p)), (q - f).norm(dim=-1), torch.arccos(_cos(q, f))], -1)


def coe_features(trajectory: torch.Tensor | CoePath) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step relative magnitudes ``M`` and angles ``A`` (each float64 ``[T]``) of ``[T+1, D]``
    (or of a ``CoePath``).

    Returns two empty tensors when ``T < 1`` (fewer than two points).
    """
    if isinstance(trajectory, CoePath):
        if trajectory.steps.shape[0] < 1:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty
        m_den, a_den = max(trajectory.span[0], EPS), max(trajectory.span[1], EPS)
        return trajectory.steps[:, 0] / m_den, trajectory.steps[:, 1] / a_den
    e = torch.as_tensor(trajectory).detach().to(torch.float64)
    if e.ndim != 2:
        raise ValueError(f"trajectory must be [T+1, D], got shape {tuple(e.shape)}")
    if e.shape[0] < 2:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty
    m_den = (e[-1] - e[0]).norm().clamp_min(EPS)
    a_den = torch.arccos(_cos(e[-1], e[0])).clamp_min(EPS)
    mags = (e[1:] - e[:-1]).norm(dim=-1) / m_den
    angles = torch.arccos(_cos(e[1:], e[:-1])) / a_den
    return mags, angles


def coe_scores(trajectory: torch.Tensor | CoePath) -> dict[str, float]:
    """CoE-R and CoE-C of a trajectory ``[T+1, D]``: ``{"coe_r": …, "coe_c": …}``.

    ``CoE-R = mean(M) − mean(A)``; ``CoE-C = sqrt(mean(M cos A)² + mean(M sin A)²)``.
    Degenerate ``T < 1`` (a single point) returns ``0.0`` for both.
    """
    mags, angles = coe_features(trajectory)
    if mags.numel() == 0:
        return {"coe_r": 0.0, "coe_c": 0.0}
    coe_r = mags.mean() - angles.mean()
    coe_c = torch.hypot((mags * torch.cos(angles)).mean(), (mags * torch.sin(angles)).mean())
    return {"coe_r": float(coe_r), "coe_c": float(coe_c)}


# ------------------------------------------------------------------------- token-level baselines


def token_stats(logits: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(max prob, log prob of chosen, entropy)``, each float32 ``[B]``.

    ``logits`` is ``[B, V]``, ``chosen`` the sampled token ids ``[B]``. All three come from one
    ``log_softmax`` in float32; ``-inf`` (masked) logits contribute 0 to the entropy.
    """
    logp = torch.log_softmax(logits.detach().to(torch.float32), dim=-1)
    probs = logp.exp()
    max_prob = probs.max(dim=-1).values
    chosen_logp = logp.gather(-1, chosen.long().reshape(-1, 1)).squeeze(-1)
    entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(logp)).sum(-1)
    return max_prob, chosen_logp, entropy


def _mean(values: ArrayLike) -> float:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return float(arr.mean()) if arr.size else float("nan")


def maxprob(token_max_probs: ArrayLike) -> float:
    """Mean over generated tokens of the max softmax probability (higher = more confident).

    NaN for an empty sequence.
    """
    return _mean(token_max_probs)


def perplexity_score(token_logprobs: ArrayLike) -> float:
    """Negative perplexity ``-exp(-mean log p(chosen))`` (higher = more confident).

    NaN for an empty sequence.
    """
    mean_lp = _mean(token_logprobs)
    return float("nan") if math.isnan(mean_lp) else -math.exp(-mean_lp)


def entropy_score(token_entropies: ArrayLike) -> float:
    """Negative mean per-token predictive entropy in nats (higher = more confident).

    NaN for an empty sequence.
    """
    return -_mean(token_entropies)


# --------------------------------------------------------------------------------- calibration


class ConfidenceCalibration(BaseModel):
    """Platt-scaled map from a raw score to P(correct): ``sigmoid(a · sign · score + b)``.

    ``sign`` orients the score so that higher means more likely correct; the fit-time
    standardisation is folded into ``a`` and ``b``.
    """

    score: str
    sign: Literal[1, -1] = 1
    a: float = 0.0
    b: float = 0.0
    fitted_on: int = 0
    train_auroc: float = float("nan")

    def confidence(self, score: float | ArrayLike) -> float | np.ndarray:
        """Calibrated P(correct) in [0, 1]: a float for a scalar input, else an array."""
        z = self.a * self.sign * np.asarray(score, dtype=np.float64) + self.b
        conf = 0.5 * (1.0 + np.tanh(0.5 * z))  # numerically stable sigmoid
        return float(conf) if conf.ndim == 0 else conf

    def to_dict(self) -> dict[str, object]:
        """Plain dict (``model_dump``)."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ConfidenceCalibration:
        """Inverse of ``to_dict`` (``model_validate``)."""
        return cls.model_validate(data)
