"""The switching policy, both steps of it (docs/method.md §4–5), as pure functions:

- one-step routing, ``choose_pool``: (prompt difficulty, live pool load, config) → pool;
- two-step switching, ``switch_decision``: one online check of a reply being generated → switch or not.

No Ray, no model: calibration (τ) happens outside, load is measured by the caller. Like
RouteLLM's router, one function with one meaning each.
"""

from __future__ import annotations

import statistics
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

Pool = Literal["fast", "slow"]
Mode = Pool


class PolicyConfig(BaseModel):
    """Thresholds of the load-aware policy. ``tau`` defaults to the probe's calibrated threshold."""

    model_config = ConfigDict(extra="forbid")

    tau: float | None = Field(None, description="difficulty above which a request starts slow; None = the probe's")
    borderline_margin: float = Field(15.0, ge=0, description="d in (tau, tau + margin] may go fast when the slow pool is saturated")
    slow_saturation_requests: int | None = Field(None, ge=1, description="in-flight slow requests (this router's view) at which "
                                                 "the slow pool counts as saturated; None = where Ray would start refusing slow requests "
                                                 "(max_ongoing_requests × min replicas + max_queued_requests; see AppConfig)")
    slow_saturation_tokens: float | None = Field(None, gt=0, description="or predicted outstanding slow tokens at which it does (None = off)")
    fast_saturation_requests: int = Field(64, ge=1, description="the fast pool never takes shifted traffic beyond this")
    fast_tokens: float = Field(4.0, ge=0, description="expected generated tokens of a fast request")
    slow_tokens_min: float = Field(120.0, ge=0, description="expected slow tokens at difficulty 0")
    slow_tokens_max: float = Field(420.0, ge=0, description="expected slow tokens at difficulty 100")

    @model_validator(mode="after")
    def _ordered(self) -> "PolicyConfig":
        if self.slow_tokens_max < self.slow_tokens_min:
            raise ValueError("slow_tokens_max must be ≥ slow_tokens_min")
        return self


class PoolLoad(BaseModel):
    """Live load of one pool as the router sees it."""

    running: int = 0
    """Requests sent to the pool and not finished (queued at the pool or generating)."""
    predicted_tokens: float = 0.0
    """Predicted tokens still to generate for those requests."""


class Decision(BaseModel):
    pool: Pool
    reason: Literal["easy", "hard", "borderline-shifted", "forced", "prefill-unavailable"]
    predicted_tokens: float


def expected_tokens(difficulty: float, pool: Pool, cfg: PolicyConfig) -> float:
    """Predicted generated tokens: flat for fast, linear in difficulty (0–100) for slow."""
    if pool == "fast":
        return cfg.fast_tokens
    d = min(max(difficulty, 0.0), 100.0) / 100.0
    return cfg.slow_tokens_min + d * (cfg.slow_tokens_max - cfg.slow_tokens_min)


TOKEN_MAP_FIELDS = ("fast_tokens", "slow_tokens_min", "slow_tokens_max")
"""The ``PolicyConfig`` fields of the ``expected_tokens`` map, which a probe may carry fitted for its model."""


def fit_token_map(difficulty: Sequence[float], slow_tokens: Sequence[float], fast_tokens: Sequence[float]) -> dict[str, float]:
    """The ``expected_tokens`` map fitted on a dev set's replies: ``fast_tokens`` the mean fast reply;
    the slow line by least squares of each question's slow reply tokens on its difficulty (clamped to
    0–100 as ``expected_tokens`` clamps it), read at 0 and 100, floored at 0 and kept ordered."""
    d = [min(max(float(x), 0.0), 100.0) for x in difficulty]
    if len(d) != len(slow_tokens) or len(d) < 2 or not fast_tokens:
        raise ValueError("a token map needs at least two questions with a difficulty and a slow reply, and fast replies")
    if len(set(d)) == 1:
        raise ValueError("a token map needs questions of more than one difficulty")
    slope, intercept = statistics.linear_regression(d, [float(t) for t in slow_tokens])
    low = max(intercept, 0.0)
    return {"fast_tokens": statistics.fmean(fast_tokens), "slow_tokens_min": low, "slow_tokens_max": max(intercept + 100.0 * slope, low)}


def slow_saturated(load: PoolLoad, cfg: PolicyConfig) -> bool:
    if cfg.slow_saturation_requests is not None and load.running >= cfg.slow_saturation_requests:
        return True
    return cfg.slow_saturation_tokens is not None and load.predicted_tokens >= cfg.slow_saturation_tokens


def choose_pool(difficulty: float, tau: float, fast: PoolLoad, slow: PoolLoad, cfg: PolicyConfig) -> Decision:
    """d ≤ τ → fast; d > τ → slow, except that a *borderline* request (τ < d ≤ τ + margin) goes fast
    while the slow pool is saturated and the fast pool is not. Clearly hard requests always go slow,
    and load never pushes an easy request to the slow pool."""
    if difficulty <= tau:
        return Decision(pool="fast", reason="easy", predicted_tokens=expected_tokens(difficulty, "fast", cfg))
    borderline = difficulty <= tau + cfg.borderline_margin
    if borderline and slow_saturated(slow, cfg) and fast.running < cfg.fast_saturation_requests:
        return Decision(pool="fast", reason="borderline-shifted", predicted_tokens=expected_tokens(difficulty, "fast", cfg))
    return Decision(pool="slow", reason="hard", predicted_tokens=expected_tokens(difficulty, "slow", cfg))


# ---------------------------------------------------------------------------- two-step switching


class OnlineConfig(BaseModel):
    """Two-step switching (docs/method.md §5): every ``every`` generated tokens re-score the last S cached
    positions; slow → fast below ``tau - delta``, fast → slow above ``tau + delta``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(8, ge=1, description="k: generated tokens between checks")
    tau: float = 50.0
    delta: float = 20.0
    max_switches: int = Field(1, ge=0)
    confirm: int = Field(1, ge=1, description="consecutive checks past the threshold before switching (1 = the paper)")


def unreachable_switches(online: OnlineConfig, low: float = 0.0, high: float = 100.0) -> list[str]:
    """What ``online`` can never do on difficulties in ``[low, high]`` (the probe's clamped range):
    e.g. τ 30 with δ 45 puts the slow → fast threshold at −15, so a slow thought never closes early."""
    notes = []
    if online.tau - online.delta <= low:
        notes.append(f"tau - delta = {online.tau - online.delta:g} <= {low:g}: slow -> fast never fires")
    if online.tau + online.delta >= high:
        notes.append(f"tau + delta = {online.tau + online.delta:g} >= {high:g}: fast -> slow never fires")
    return notes


def switch_decision(mode: Mode, difficulty: float, streak: int, online: OnlineConfig) -> tuple[Mode | None, int]:
    """One online check: (the mode to switch into now, or None; the new streak). Slow → fast below
    τ − δ, fast → slow above τ + δ, after ``confirm`` consecutive checks past the threshold."""
    target = None
    if mode == "slow" and difficulty < online.tau - online.delta:
        target = "fast"
    elif mode == "fast" and difficulty > online.tau + online.delta:
        target = "slow"
    streak = streak + 1 if target is not None else 0
    if target is not None and streak >= online.confirm:
        return target, 0
    return None, streak


def length_route(prompt_tokens: int, threshold: int) -> Mode:
    """The prompt-length peer (issue 21): slow when the prompt is longer than ``threshold`` tokens."""
    return "slow" if prompt_tokens > threshold else "fast"


def fit_length_threshold(prompt_tokens: list[int], fast_enough: list[bool]) -> int:
    """The length threshold that agrees with the most "fast is enough" labels (fast at or below it,
    slow above); ties go to the smallest threshold. Candidates: every observed length, and one
    below the shortest (everything slow)."""
    if not prompt_tokens or len(prompt_tokens) != len(fast_enough):
        raise ValueError("fitting a length threshold needs one label per prompt, and at least one prompt")
    best, best_agree = min(prompt_tokens) - 1, -1
    for threshold in sorted({min(prompt_tokens) - 1, *prompt_tokens}):
        agree = sum((n <= threshold) == ok for n, ok in zip(prompt_tokens, fast_enough))
        if agree > best_agree:
            best, best_agree = threshold, agree
    return best
