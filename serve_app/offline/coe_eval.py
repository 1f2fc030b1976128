"""KV-CoE variants offline: the CoE table of one mode (every KV-CoE variant of
``serve_app.core.kv_coe``, hidden-state CoE, the token-level baselines and the served confidence),
score directions learned on a dev set, and ``kvswitch fit-coe``, which chooses the served variant
on a dev set and fits its per-mode confidence there.

A raw score's direction is arbitrary (hidden-state CoE-R ranks wrong answers above right ones in
one mode and below in the other). Every score therefore gets a direction, +1 or -1, learned where
the calibration is fitted (the sign that gives AUROC >= 0.5 there), and the tables report AUROC both
raw and with that learned direction, never with one fitted on the set being reported."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from serve_app.core.confidence import (
    coe_scores,
    entropy_score,
    maxprob,
    perplexity_score,
)
from serve_app.core.grading import get_grader
from serve_app.core.kv_coe import (
    SERVABLE,
    VARIANTS,
    result_variant_score,
    result_variant_scores,
)
from serve_app.core.probe import Probe
from serve_app.offline.generate import MAX_NEW_TOKENS
from serve_app.offline.metrics import auroc, coe_table, fit_confidence

BASELINES = ("hidden_coe_r", "hidden_coe_c", "maxprob", "perplexity", "entropy")


def score_columns(res: list, token_scores: bool = True) -> dict[str, list[float]]:
    """Every score of every reply: the KV-CoE variants (NaN where a reply cannot give one) and, with
    ``token_scores`` (the HF engine), hidden-state CoE and the token-level baselines."""
    per_reply = [result_variant_scores(r) for r in res]
    cols = {name: [v[name] for v in per_reply] for name in VARIANTS}
    if token_scores:
        hid = [coe_scores(r.hidden_trajectory) if r.hidden_trajectory is not None else {"coe_r": math.nan, "coe_c": math.nan} for r in res]
        cols.update({
            "hidden_coe_r": [s["coe_r"] for s in hid],
            "hidden_coe_c": [s["coe_c"] for s in hid],
            "maxprob": [maxprob(r.token_max_probs) for r in res],
            "perplexity": [perplexity_score(r.token_logprobs) for r in res],
            "entropy": [entropy_score(r.token_entropies) for r in res],
        })
    return cols


def learn_directions(cols: dict[str, list[float]], ok: list[bool]) -> dict[str, int]:
    """Per score: +1 when it ranks right answers above wrong ones on these replies (AUROC >= 0.5),
    else -1; +1 when it cannot be told (one class, or no finite score)."""
    out = {}
    for name, values in cols.items():
        a = auroc(values, ok)
        out[name] = -1 if not math.isnan(a) and a < 0.5 else 1
    return out


def coe_entry(res: list, ok: list[bool], cal=None, directions: dict[str, int] | None = None, token_scores: bool = True) -> dict:
    """The CoE table of one mode: ``score_metrics`` per score (raw), plus ``sign`` and
    ``auroc_directed`` where ``directions`` (learned elsewhere) give one; ``kv_confidence`` is the
    served confidence (the calibration ``cal``'s variant, direction and scale); ``scores`` keeps every
    reply's raw scores for re-analysis."""
    cols = score_columns(res, token_scores)
    if cal is not None:
        raw = [result_variant_score(cal.score, r) for r in res]
        cols["kv_confidence"] = [math.nan if math.isnan(s) else float(cal.confidence(s)) for s in raw]
    cols = {k: v for k, v in cols.items() if any(not math.isnan(x) for x in v)}  # what the engine cannot give is left out
    table = coe_table(cols, ok)
    for name, sign in (directions or {}).items():
        if name in table:
            table[name]["sign"] = sign
            table[name]["auroc_directed"] = auroc([sign * v for v in cols[name]], ok)
    return {"n": len(ok), "n_correct": int(sum(ok)), "table": table,
            "scores": {k: [None if math.isnan(v) else round(v, 6) for v in vals] for k, vals in cols.items()}}


def choose_variant(cols: dict[str, list[float]], ok: list[bool], candidates=SERVABLE) -> tuple[str, dict[str, float]]:
    """The candidate with the highest AUROC on these (dev) replies with the direction learned on
    them; candidates these replies cannot score (NaN: no finite score, or one class) are out, and
    when none is left the first candidate is kept. Returns it and every candidate's directed AUROC."""
    table = {name: _directed(cols[name], ok) for name in candidates}
    scored = [n for n in candidates if not math.isnan(table[n])]
    return (max(scored, key=lambda n: table[n]) if scored else candidates[0]), table


class FitCoeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    probe: str
    dataset: str
    """A dev set with errors in both modes (never the test set)."""
    out: str | None = None
    """Where to write the probe (default: over ``probe``)."""
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1)
    variant: str | None = None
    """Fit this variant instead of choosing one."""
    grader: str | None = None
    """Default: the probe's."""


def run_fit_coe(cfg: FitCoeConfig) -> dict:
    """Greedy fast and slow replies on the dev set; per mode the direction of every score, the
    servable variant with the best directed AUROC (or ``cfg.variant``) and its Platt-scaled
    confidence. Writes the probe (``confidence`` and ``coe``) and returns the report."""
    from serve_app.offline.common import grader_name, setup

    grader = get_grader(grader_name(cfg.grader, cfg.probe))
    exp = setup(cfg.model, cfg.dataset, cfg.limit, min_rows=2, grader=grader.name)
    probe = exp.probe(cfg.probe)
    dev: dict[str, tuple[dict[str, list[float]], list[bool]]] = {}
    for mode in ("fast", "slow"):
        res = exp.run(exp.requests(mode=mode, max_new_tokens=cfg.max_new_tokens), cfg.batch_size, desc=f"{mode} (dev)",
                      collect_hidden=True)
        ok = [grader.correct(r.reply, row["answer"]) for r, row in zip(res, exp.rows)]
        dev[mode] = (score_columns(res), ok)
    if cfg.variant is not None and cfg.variant not in SERVABLE:
        raise ValueError(f"{cfg.variant!r} cannot be served (both engines give only {', '.join(SERVABLE)})")
    confidence, directions, chosen, table = {}, {}, {}, {}
    for mode, (cols, ok) in dev.items():
        best, table[mode] = choose_variant(cols, ok)
        chosen[mode] = cfg.variant or best
        directions[mode] = learn_directions(cols, ok)
        confidence[mode] = fit_confidence(cols[chosen[mode]], ok, chosen[mode]).to_dict()
    probe.data["confidence"] = confidence
    probe.data["coe"] = {"variant": chosen, "directions": directions, "dataset": str(cfg.dataset), "n": len(exp.rows),
                         "errors": {m: len(ok) - sum(ok) for m, (_, ok) in dev.items()}}
    out = Path(cfg.out or cfg.probe)
    probe.save(out)
    return {"variant": chosen, "probe": str(out), "dataset": str(cfg.dataset), "n": len(exp.rows),
            "errors": probe.data["coe"]["errors"], "dev_auroc_directed": table,
            "baselines_dev_auroc_directed": {m: {b: _directed(cols[b], ok) for b in BASELINES} for m, (cols, ok) in dev.items()}}


def _directed(values: list[float], ok: list[bool]) -> float:
    """AUROC with the direction learned on the same replies."""
    a = auroc(values, ok)
    return a if math.isnan(a) else max(a, 1.0 - a)


def probe_directions(probe: Probe | None) -> dict[str, dict[str, int]]:
    """Per mode the score directions a probe learned (``fit-coe``); empty when it has none."""
    return ((probe.data.get("coe") or {}).get("directions") or {}) if probe is not None else {}
