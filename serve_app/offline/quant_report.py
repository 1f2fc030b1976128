"""``kvswitch quant-report``: probe, routing and KV-CoE quality under simulated KV quantization.

For each setting (``fp`` = full precision, the reference) and each probe: the prompt's KV probe
feature is pooled from the quantized prefill cache; greedy fast replies and ``kv-online`` routed
replies are generated with every cache write quantized (``serve_app.core.quant``). Reported per row:

* probe AUROC of "fast is enough" (the fast reply under the same setting is right; score −difficulty);
* routed (``kv-online``) accuracy, mean generated tokens, fast fraction, switches;
* KV-CoE AUROC: the probe's per-mode confidence on the fast replies (both classes present) and
  on the routed replies, "correct" positive.

Several probes (``--probes``) answer "does a probe calibrated at full precision survive quantized
serving, and does calibrating on quantized KV (``kvswitch calibrate --kv-quant``) recover it".
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from serve_app.core.grading import GraderName, get_grader
from serve_app.core.kv_coe import kv_confidence
from serve_app.core.quant import FULL_PRECISION, parse_kv_quant
from serve_app.offline.common import grader_name, setup
from serve_app.offline.generate import MAX_NEW_TOKENS
from serve_app.offline.metrics import auroc

DEFAULT_SETTINGS = ("fp", "K8V8", "K4V4", "K4V16", "K16V4", "K3V16", "K16V3", "K2V16", "K16V2", "K8V8/per-tensor",
                    "K4V4/per-tensor", "K4V4/per-channel", "K2V16/per-channel", "K16V2/per-channel", "K4V2@0-1=K8V4")


class QuantReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dataset: str
    settings: list[str] = list(DEFAULT_SETTINGS)
    """``serve_app.core.quant.parse_kv_quant`` specs; ``fp`` is added first when missing."""
    probes: list[str] = []
    """Probe checkpoints to compare; default ``<model>/probe.pt``. Online thresholds come from each probe."""
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1)
    limit: int | None = Field(None, ge=1)
    grader: GraderName | None = None
    """How replies are graded; None: the first probe's recorded grader, else ``number``."""
    question_field: str | None = None
    answer_field: str | None = None

    def probe_paths(self) -> list[Path]:
        return [Path(p) for p in self.probes] or [Path(self.model) / "probe.pt"]


def _auroc_or_none(scores: list[float | None], ok: list[bool]) -> float:
    return auroc([float("nan") if s is None else s for s in scores], ok)


def run_quant_report(cfg: QuantReportConfig) -> dict:
    cfg = cfg.model_copy(update={"grader": grader_name(cfg.grader, cfg.probe_paths()[0])})
    grader = get_grader(cfg.grader)
    exp = setup(cfg.model, cfg.dataset, cfg.limit, grader=cfg.grader, question_field=cfg.question_field, answer_field=cfg.answer_field)
    engine, rows, prompt_ids = exp.engine, exp.rows, exp.prompt_ids
    probes = {str(p): exp.probe(p) for p in cfg.probe_paths()}
    settings = cfg.settings if any(s.strip().lower() == "fp" for s in cfg.settings) else ["fp", *cfg.settings]
    report: dict = {"model": cfg.model, "dataset": cfg.dataset, "n_questions": len(rows), "probes": list(probes),
                    "grader": cfg.grader, "settings": []}

    for spec in settings:
        quant = parse_kv_quant(spec)
        started = time.time()
        fast = exp.run(exp.requests(mode="fast", max_new_tokens=cfg.max_new_tokens), cfg.batch_size, desc=f"{spec} fast", kv_quant=quant)
        fast_ok = [grader.correct(r.reply, row["answer"]) for r, row in zip(fast, rows)]
        entry: dict = {
            "setting": "fp" if quant is None else quant.name,
            "kv_quant": None if quant is None else quant.model_dump(),
            "fast": {"accuracy": sum(fast_ok) / len(rows), "correct": sum(fast_ok),
                     "mean_tokens": sum(r.tokens for r in fast) / len(rows)},
            "probes": {},
        }
        for name, probe in probes.items():
            feats = torch.cat([engine.prompt_features(prompt_ids[i : i + cfg.batch_size], probe.pooling, kv_quant=quant, embedding=False)["kv"]
                               for i in tqdm(range(0, len(rows), cfg.batch_size), desc=f"{spec} features", unit="batch")])
            difficulty = probe.predict("kv", feats).tolist()
            routed = exp.run(exp.requests(online=True, max_new_tokens=cfg.max_new_tokens), cfg.batch_size, desc=f"{spec} kv-online",
                             probe=probe, online=probe.online_config(), kv_quant=quant)
            routed_ok = [grader.correct(r.reply, row["answer"]) for r, row in zip(routed, rows)]
            entry["probes"][name] = {
                "probe_auroc": auroc([-d for d in difficulty], fast_ok),
                "routed": {
                    "accuracy": sum(routed_ok) / len(rows),
                    "correct": sum(routed_ok),
                    "mean_tokens": sum(r.tokens for r in routed) / len(rows),
                    "fast_fraction": sum(r.start_mode == "fast" for r in routed) / len(rows),
                    "switches": sum(r.switched_at is not None for r in routed),
                },
                "kv_coe_auroc_fast": _auroc_or_none([kv_confidence(probe.confidence, r.end_mode, r) for r in fast], fast_ok),
                "kv_coe_auroc_routed": _auroc_or_none([kv_confidence(probe.confidence, r.end_mode, r) for r in routed], routed_ok),
            }
        entry["wall_s"] = round(time.time() - started, 1)
        report["settings"].append(entry)
    report["sensitivity"] = key_value_sensitivity(report)
    return report


def key_value_sensitivity(report: dict) -> list[dict]:
    """Keys-only vs values-only settings at the same bits and granularity (no layer map): the drop
    of each measure from full precision, first probe. Larger drop = more sensitive."""
    first = report["probes"][0]
    base = report["settings"][0]["probes"][first]
    by_cfg = {}
    for e in report["settings"]:
        q = e["kv_quant"]
        if q and not q["layers"]:
            by_cfg[(q["key_bits"], q["value_bits"], q["granularity"])] = e["probes"][first]
    out = []
    for (kb, vb, gran), keys_only in sorted(by_cfg.items()):
        values_only = by_cfg.get((FULL_PRECISION, kb, gran))
        if vb != FULL_PRECISION or kb == FULL_PRECISION or values_only is None:
            continue
        drop = lambda cell, f: f(base) - f(cell)  # noqa: E731
        measures = {"probe_auroc": lambda c: c["probe_auroc"], "routed_accuracy": lambda c: c["routed"]["accuracy"],
                    "kv_coe_auroc_fast": lambda c: c["kv_coe_auroc_fast"]}
        out.append({"bits": kb, "granularity": gran,
                    "keys_only_drop": {m: drop(keys_only, f) for m, f in measures.items()},
                    "values_only_drop": {m: drop(values_only, f) for m, f in measures.items()}})
    return out


def print_quant_report(report: dict) -> None:
    print(f"\n{'setting':>28} {'probe':>24} {'fast acc':>9} {'probe AUROC':>12} {'routed acc':>11} {'tokens':>8} "
          f"{'fast %':>7} {'CoE AUROC fast':>15} {'CoE AUROC routed':>17}")
    for e in report["settings"]:
        for name, c in e["probes"].items():
            r = c["routed"]
            print(f"{e['setting']:>28} {Path(name).stem:>24} {e['fast']['accuracy']:>9.3f} {c['probe_auroc']:>12.3f} {r['accuracy']:>11.3f} "
                  f"{r['mean_tokens']:>8.1f} {r['fast_fraction']:>7.1%} {c['kv_coe_auroc_fast']:>15.3f} {c['kv_coe_auroc_routed']:>17.3f}")
    for s in report.get("sensitivity", []):
        print(f"int{s['bits']} {s['granularity']}: drop from fp, keys only {s['keys_only_drop']}, values only {s['values_only_drop']}")


def plot_quant_report(report: dict, path: str | Path) -> None:
    """One bar group per setting (one bar per probe): probe AUROC, routed accuracy, KV-CoE AUROC
    of the fast replies, routed tokens; the dashed line is full precision with the first probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [e["setting"].replace("/", " ") for e in report["settings"]]
    probes = report["probes"]
    fig, axes = plt.subplots(2, 2, figsize=(16, 9))
    panels = (("probe AUROC (fast is enough)", lambda c: c["probe_auroc"]), ("routed accuracy (kv-online)", lambda c: c["routed"]["accuracy"]),
              ("KV-CoE AUROC, fast replies", lambda c: c["kv_coe_auroc_fast"]), ("routed mean generated tokens", lambda c: c["routed"]["mean_tokens"]))
    width = 0.8 / len(probes)
    for ax, (title, value) in zip(axes.flat, panels):
        for j, name in enumerate(probes):
            ys = [value(e["probes"][name]) for e in report["settings"]]
            ax.bar([i + j * width for i in range(len(labels))], [float("nan") if y is None else y for y in ys], width, label=Path(name).stem)
        ax.axhline(value(report["settings"][0]["probes"][probes[0]]), color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks([i + width * (len(probes) - 1) / 2 for i in range(len(labels))], labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
