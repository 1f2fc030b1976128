"""``kvswitch eval --best-of N``: sample N replies per question, pick one by KV-CoE or by vote.

For every question: greedy fast and greedy slow (the references), then N sampled replies per
sampled mode (temperature > 0, one recorded seed per sample). Each sample is graded (the grader's
``extract`` and ``correct``, ``serve_app.core.grading``) and scored with the probe's per-mode
KV-CoE confidence — the number the service returns. Best-of-N for N = 1, 2, 4, … ≤ N_max comes
from disjoint groups of the same N_max samples (``serve_app.core.bestofn.best_of_n_curve``);
``random`` is the uniform-pick baseline and ``coe:maxprob`` ranks by mean token max-probability
instead (a non-KV reference). Tokens spent by best-of-N are the sum over its N samples.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.core.bestofn import RULES, best_of_n_curve, sign_test_p
from serve_app.core.confidence import coe_scores, maxprob
from serve_app.core.grading import Grader, GraderName, get_grader
from serve_app.core.kv_coe import kv_confidence
from serve_app.core.quant import KVQuantConfig
from serve_app.core.task import num_operators
from serve_app.engines.base import GenRequest
from serve_app.offline.common import grader_name, setup
from serve_app.offline.generate import MAX_NEW_TOKENS
from serve_app.offline.metrics import auroc

REFERENCE_RULES = ("random", "coe:maxprob")


class BestOfNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dataset: str
    n: int = Field(8, ge=1, description="samples per question (N_max)")
    modes: list[str] = ["fast"]
    rules: list[str] = ["coe", "vote", "coe-vote"]
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    """Sample j of question q uses seed ``seed * 1_000_000 + q * n + j``; ``random`` picks use ``seed`` too."""
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1)
    limit: int | None = Field(None, ge=1)
    probe: str | None = None
    kv_quant: KVQuantConfig | None = None
    grader: GraderName | None = None
    """How samples are graded and voted on; None: the probe's recorded grader, else ``number``."""
    question_field: str | None = None
    answer_field: str | None = None

    @field_validator("modes")
    @classmethod
    def _modes(cls, value: list[str]) -> list[str]:
        if not value or set(value) - {"fast", "slow"}:
            raise ValueError(f"best-of-N samples fast and/or slow mode, got {value}")
        return list(dict.fromkeys(value))

    @field_validator("rules")
    @classmethod
    def _rules(cls, value: list[str]) -> list[str]:
        unknown = [r for r in value if r not in RULES]
        if unknown or not value:
            raise ValueError(f"unknown selection rule {unknown}; choose from {list(RULES)}")
        return list(dict.fromkeys(value))

    def probe_path(self) -> Path:
        return Path(self.probe) if self.probe else Path(self.model) / "probe.pt"

    def sizes(self) -> list[int]:
        """N = 1, 2, 4, … that divide N_max, and N_max itself."""
        return sorted({2**k for k in range(self.n.bit_length()) if self.n % 2**k == 0} | {self.n})


def _sample_record(res, answer_ref: str, confidence, grader: Grader) -> dict:
    conf = kv_confidence(confidence, res.end_mode, res)
    return {
        "answer": grader.extract(res.reply),
        "correct": grader.correct(res.reply, answer_ref),
        "tokens": res.tokens,
        "confidence": None if conf is None else round(conf, 6),
        "kv_coe": {k: round(v, 6) for k, v in coe_scores(res.kv_trajectory).items()},
        "maxprob": round(maxprob(res.token_max_probs), 6),
    }


def _paired(a: list[bool], b: list[bool]) -> dict:
    wins = sum(x and not y for x, y in zip(a, b))
    losses = sum(y and not x for x, y in zip(a, b))
    return {"correct": sum(a), "other_correct": sum(b), "margin": sum(a) - sum(b), "wins": wins, "losses": losses,
            "sign_test_p": sign_test_p(wins, losses)}


def _without_picks(curve: dict) -> dict:
    """The curve minus the per-question ``chosen`` lists (the records hold every sample)."""
    return {n: {k: {kk: vv for kk, vv in v.items() if kk != "chosen"} if isinstance(v, dict) else v for k, v in cell.items()}
            for n, cell in curve.items()}


def run_best_of_n(cfg: BestOfNConfig) -> dict:
    cfg = cfg.model_copy(update={"grader": grader_name(cfg.grader, cfg.probe_path())})
    grader = get_grader(cfg.grader)
    exp = setup(cfg.model, cfg.dataset, cfg.limit, grader=cfg.grader, question_field=cfg.question_field, answer_field=cfg.answer_field)
    rows, prompt_ids = exp.rows, exp.prompt_ids
    probe = exp.probe(cfg.probe_path())
    if not probe.confidence:
        raise ValueError(f"probe {cfg.probe_path()} has no KV-CoE confidence mapping; recalibrate it with `kvswitch calibrate`")
    run = lambda reqs, desc: exp.run(reqs, cfg.batch_size, desc=desc, kv_quant=cfg.kv_quant)  # noqa: E731

    report: dict = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "n_questions": len(rows),
        "probe": str(cfg.probe_path()),
        "config": cfg.model_dump(mode="json"),
        "kv_quant": None if cfg.kv_quant is None else cfg.kv_quant.name,
        "greedy": {},
        "sampled": {},
    }
    greedy: dict[str, list[dict]] = {}
    for mode in ("fast", "slow"):
        started = time.time()
        res = run([GenRequest(prompt_ids=p, mode=mode, max_new_tokens=cfg.max_new_tokens) for p in prompt_ids], f"greedy {mode}")
        greedy[mode] = [_sample_record(r, row["answer"], probe.confidence, grader) for r, row in zip(res, rows)]
        ok = [s["correct"] for s in greedy[mode]]
        report["greedy"][mode] = {"accuracy": sum(ok) / len(ok), "correct": sum(ok), "n": len(ok),
                                  "mean_tokens": sum(s["tokens"] for s in greedy[mode]) / len(ok), "wall_s": round(time.time() - started, 2)}

    rules = cfg.rules + [r for r in REFERENCE_RULES if r not in cfg.rules]
    for mode in cfg.modes:
        started = time.time()
        seeds = [[cfg.seed * 1_000_000 + q * cfg.n + j for j in range(cfg.n)] for q in range(len(rows))]
        reqs = [GenRequest(prompt_ids=prompt_ids[q], mode=mode, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, seed=seeds[q][j])
                for q in range(len(rows)) for j in range(cfg.n)]
        flat = run(reqs, f"{mode} x{cfg.n} samples")
        samples = [[_sample_record(flat[q * cfg.n + j], rows[q]["answer"], probe.confidence, grader) | {"seed": seeds[q][j]}
                    for j in range(cfg.n)] for q in range(len(rows))]
        curve = best_of_n_curve(samples, cfg.sizes(), rules, seed=cfg.seed)
        top = curve[str(cfg.n)]
        flat_ok = [s["correct"] for per_q in samples for s in per_q]
        entry = {
            "curve": _without_picks(curve),
            # each rule's pick against the greedy reply of the same mode: does spending N samples beat one greedy reply?
            "vs_greedy": {rule: _paired(top[rule]["chosen"], [s["correct"] for s in greedy[mode]]) for rule in rules},
            "vs_random": {rule: _paired(top[rule]["chosen"], top["random"]["chosen"]) for rule in rules if rule != "random"},
            "sample_accuracy": sum(flat_ok) / len(flat_ok),
            "sample_confidence_auroc": auroc([s["confidence"] if s["confidence"] is not None else float("nan")
                                              for per_q in samples for s in per_q], flat_ok),
            "sample_maxprob_auroc": auroc([s["maxprob"] for per_q in samples for s in per_q], flat_ok),
            "wall_s": round(time.time() - started, 2),
            "records": [{"question": row["question"], "answer": str(row["answer"]), "operators": num_operators(row["question"]),
                         "greedy_fast": greedy["fast"][q], "greedy_slow": greedy["slow"][q], "samples": samples[q]}
                        for q, row in enumerate(rows)],
        }
        report["sampled"][mode] = entry
    return report


def print_best_of_n(report: dict) -> None:
    g = report["greedy"]
    print(f"\ngreedy fast {g['fast']['accuracy']:.3f} ({g['fast']['correct']}/{g['fast']['n']}, {g['fast']['mean_tokens']:.1f} tokens); "
          f"greedy slow {g['slow']['accuracy']:.3f} ({g['slow']['correct']}/{g['slow']['n']}, {g['slow']['mean_tokens']:.1f} tokens)")
    for mode, entry in report["sampled"].items():
        curve = entry["curve"]
        rules = [k for k, v in next(iter(curve.values())).items() if isinstance(v, dict)]
        print(f"\nbest-of-N, {mode} mode (sample accuracy {entry['sample_accuracy']:.3f}; sample AUROC: "
              f"KV-CoE confidence {entry['sample_confidence_auroc']:.3f}, maxprob {entry['sample_maxprob_auroc']:.3f})")
        print(f"{'N':>3} {'tokens':>8} " + " ".join(f"{r:>12}" for r in rules))
        for n, cell in curve.items():
            print(f"{n:>3} {cell[rules[0]]['mean_tokens']:>8.1f} " + " ".join(f"{cell[r]['accuracy']:>12.3f}" for r in rules))
        n_max = list(curve)[-1]
        for name, table in ((f"greedy {mode}", entry["vs_greedy"]), ("random pick", entry["vs_random"])):
            print(f"N={n_max} vs {name}: " + "; ".join(
                f"{r} {c['correct']} vs {c['other_correct']} ({c['margin']:+d}, {c['wins']} won / {c['losses']} lost, p={c['sign_test_p']:.3g})"
                for r, c in table.items()))


def plot_best_of_n(report: dict, path: str | Path) -> None:
    """Accuracy vs N per rule (greedy references as lines; the accuracy axis fits the curves so a
    small effect stays visible), and accuracy vs tokens spent on a full 0–1 axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = report["greedy"]
    fig, (ax_n, ax_tok) = plt.subplots(1, 2, figsize=(12, 4.4))
    ax_n.set_xscale("log", base=2)
    ax_n.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for mode, entry in report["sampled"].items():
        curve = entry["curve"]
        ns = [int(n) for n in curve]
        for rule in [k for k, v in curve[str(ns[0])].items() if isinstance(v, dict)]:
            acc = [curve[str(n)][rule]["accuracy"] for n in ns]
            style = {"linestyle": ":"} if rule in ("pass", "sample_mean") else {}
            ax_n.plot(ns, acc, marker="o", label=f"{mode} {rule}", **style)
            ax_tok.plot([curve[str(n)][rule]["mean_tokens"] for n in ns], acc, marker="o", label=f"{mode} {rule}", **style)
        ax_n.set_xticks(ns, [str(n) for n in ns])
    for mode, color in (("fast", "grey"), ("slow", "black")):
        if mode == "fast" or mode in report["sampled"]:  # greedy slow off the scale of fast-only curves
            ax_n.axhline(g[mode]["accuracy"], color=color, linestyle="--", label=f"greedy {mode} ({g[mode]['accuracy']:.3f})")
        ax_tok.scatter([g[mode]["mean_tokens"]], [g[mode]["accuracy"]], color=color, marker="s", s=50, label=f"greedy {mode}")
    ax_n.set(xlabel="N (samples)", ylabel="accuracy",
             title=f"Best-of-N accuracy (greedy slow {g['slow']['accuracy']:.3f}, {g['slow']['mean_tokens']:.0f} tokens)")
    ax_tok.set(xscale="log", xlabel="generated tokens per question", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy vs tokens spent")
    for ax in (ax_n, ax_tok):
        ax.grid(alpha=0.3)
    ax_n.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
