"""KV-CoE variants: which trajectory of a reply's KV cache Chain-of-Embedding reads.

A variant is named ``kv_{axis}_{part}_{tokens}_{score}``:

- ``axis`` — ``token``: one point per generated token, the layer-average of that token's K/V
  (``e_0`` = the last prompt position; what the method paper calls KV-CoE and what this project
  served first); ``layer``: one point per layer ``l``, layer ``l``'s K/V averaged over the generated
  tokens — the hidden-state CoE formula (Wang et al., ICLR 2025) with the hidden state of layer ``l``
  replaced by layer ``l``'s cache, the like-for-like counterpart of hidden-state CoE.
- ``part`` — ``kv`` (``[K; V]``, heads flattened), ``k`` or ``v``.
- ``tokens`` — ``all`` generated tokens, ``thought`` (inside an open thought) or ``answer``.
- ``score`` — ``r`` (CoE-R) or ``c`` (CoE-C), ``serve_app.core.confidence.coe_scores``.

Everything comes from what an engine keeps while it decodes, with no second forward: the token-axis
trajectory (``GenResult.kv_trajectory``: the points, or their running ``CoePath`` summary) and
per-layer running sums of K and V over the generated tokens, split into thought and answer
(``GenResult.kv_layer_sums``, float64 ``[2 (thought, answer), 2 (K, V), layers, kv_heads*head_dim]``,
with ``GenResult.kv_counts`` tokens in each set). A running ``CoePath`` only gives the token-axis
``kv``/``all`` variant; the stored points (``[T+1, 2D]``, with ``GenResult.kv_thought`` per
generated point) give every token-axis variant. A variant a reply cannot give is NaN (and so is one
over an empty token set), which the metrics drop.

Pure math: no Ray, no model code. See docs/method.md §6.
"""

from __future__ import annotations

import itertools
import math

import torch

from serve_app.core.confidence import CoePath, ConfidenceCalibration, coe_scores

AXES = ("token", "layer")
PARTS = ("kv", "k", "v")
TOKEN_SETS = ("all", "thought", "answer")
SCORES = ("r", "c")
VARIANTS = tuple(f"kv_{a}_{p}_{t}_{s}" for a, p, t, s in itertools.product(AXES, PARTS, TOKEN_SETS, SCORES))
SERVABLE = ("kv_token_kv_all_r", "kv_token_kv_all_c",
            *(v for v in VARIANTS if v.startswith("kv_layer_")))
"""Variants both engines give while serving (a running ``CoePath`` has only the token-axis
``kv``/``all`` trajectory; the layer sums give every layer-axis variant)."""
DEFAULT_VARIANT = "kv_token_kv_all_r"
"""The variant ``kvswitch calibrate`` fits the served confidence on (with CoE-C if that separates better)."""
LEGACY = {"kv_coe_r": "kv_token_kv_all_r", "kv_coe_c": "kv_token_kv_all_c"}
"""Score names of probes calibrated before the variants existed."""
THOUGHT, ANSWER = 0, 1
"""Indices of ``kv_layer_sums``' first axis."""


def parse_variant(name: str) -> tuple[str, str, str, str]:
    """``(axis, part, tokens, score)`` of a variant name (or a legacy ``kv_coe_r``/``kv_coe_c``)."""
    name = LEGACY.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown KV-CoE variant {name!r}: expected kv_{{token|layer}}_{{kv|k|v}}_{{all|thought|answer}}_{{r|c}}")
    _, axis, part, tokens, score = name.split("_")
    return axis, part, tokens, score


def layer_trajectory(layer_sums: torch.Tensor, counts, part: str = "kv", tokens: str = "all") -> torch.Tensor | None:
    """The layer-axis trajectory ``[layers, D]``: per layer the mean K (``k``), V (``v``) or
    ``[K; V]`` (``kv``) over the ``tokens`` set; None when that set is empty."""
    sets = {"all": [THOUGHT, ANSWER], "thought": [THOUGHT], "answer": [ANSWER]}[tokens]
    n = sum(int(counts[i]) for i in sets)
    if n == 0:
        return None
    mean = layer_sums[sets].to(torch.float64).sum(0) / n  # [2, L, D]
    return {"k": mean[0], "v": mean[1], "kv": torch.cat([mean[0], mean[1]], -1)}[part]


def token_trajectory(points: torch.Tensor, thought, part: str = "kv", tokens: str = "all") -> torch.Tensor | None:
    """The token-axis trajectory of the stored points ``[T+1, 2D]`` (``e_0`` first): the columns of
    ``part`` and ``e_0`` followed by the generated points in the ``tokens`` set; None when that set
    is empty."""
    d = points.shape[1] // 2
    cols = {"kv": slice(None), "k": slice(0, d), "v": slice(d, None)}[part]
    gen = points[1:]
    if tokens != "all":
        mask = torch.as_tensor(list(thought), dtype=torch.bool)
        gen = gen[mask if tokens == "thought" else ~mask]
    if gen.shape[0] == 0:
        return None
    return torch.cat([points[:1], gen])[:, cols]


def _trajectory(axis: str, part: str, tokens: str, trajectory, layer_sums, counts, thought):
    """The trajectory a variant reads, or None when the reply cannot give it."""
    if axis == "layer":
        return None if layer_sums is None or counts is None else layer_trajectory(layer_sums, counts, part, tokens)
    if trajectory is None:
        return None
    if (part, tokens) == ("kv", "all"):
        return trajectory
    if isinstance(trajectory, CoePath) or (tokens != "all" and thought is None):
        return None
    return token_trajectory(trajectory, thought, part, tokens)


def variant_score(name: str, trajectory: torch.Tensor | CoePath | None, layer_sums: torch.Tensor | None = None, counts=None,
                  thought=None) -> float:
    """The score of one variant for one reply; NaN when the reply cannot give it."""
    axis, part, tokens, score = parse_variant(name)
    traj = _trajectory(axis, part, tokens, trajectory, layer_sums, counts, thought)
    return math.nan if traj is None else coe_scores(traj)[f"coe_{score}"]


def all_variant_scores(trajectory, layer_sums=None, counts=None, thought=None) -> dict[str, float]:
    """Every variant's score of one reply (NaN where it cannot give one); each trajectory's CoE is
    computed once."""
    out = {}
    for axis, part, tokens in itertools.product(AXES, PARTS, TOKEN_SETS):
        traj = _trajectory(axis, part, tokens, trajectory, layer_sums, counts, thought)
        scores = {"coe_r": math.nan, "coe_c": math.nan} if traj is None else coe_scores(traj)
        for score in SCORES:
            out[f"kv_{axis}_{part}_{tokens}_{score}"] = scores[f"coe_{score}"]
    return out


def result_variant_score(name: str, result) -> float:
    """``variant_score`` of a ``GenResult`` (any object with ``kv_trajectory``, ``kv_layer_sums``,
    ``kv_counts`` and ``kv_thought``), or its precomputed ``coe_scores``."""
    if getattr(result, "coe_scores", None) is not None:
        return result.coe_scores.get(LEGACY.get(name, name), math.nan)
    return variant_score(name, result.kv_trajectory, getattr(result, "kv_layer_sums", None), getattr(result, "kv_counts", None),
                         getattr(result, "kv_thought", None))


def result_variant_scores(result) -> dict[str, float]:
    """``all_variant_scores`` of a ``GenResult`` (its precomputed ``coe_scores`` when it has them)."""
    if getattr(result, "coe_scores", None) is not None:
        return dict(result.coe_scores)
    return all_variant_scores(result.kv_trajectory, getattr(result, "kv_layer_sums", None), getattr(result, "kv_counts", None),
                              getattr(result, "kv_thought", None))


def kv_confidence(calibrations: dict[str, ConfidenceCalibration] | None, mode: str, result) -> float | None:
    """Calibrated P(correct) of a reply (a ``GenResult``) that ended in ``mode``: the probe's
    per-mode KV-CoE mapping applied to the variant it was fitted on, with the direction learned at
    calibration (``ConfidenceCalibration.sign``). None when the probe has no mapping for that mode or
    the reply cannot give that variant."""
    cal = (calibrations or {}).get(mode)
    if cal is None or result is None:
        return None
    score = result_variant_score(cal.score, result)
    return None if math.isnan(score) else float(cal.confidence(score))
