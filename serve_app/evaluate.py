"""``kvswitch eval``: greedy accuracy and generated tokens per policy, per operator count.

Every generated token counts, the closing ``<|im_end|>`` included. The JSON report holds
``{"policies": {"<policy>": {"n", "accuracy", "mean_tokens", "by_operators": {"<k>": {...}}}}}``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from pydantic import BaseModel, Field, field_validator
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app.generate import MAX_NEW_TOKENS, build_prompt, generate_greedy
from serve_app.task import is_correct, extract_answer, num_operators, read_jsonl

POLICIES = {"fast": False, "slow": True}
"""Policy name → thinking on/off. Routed policies join this table with the KV core."""


class EvalConfig(BaseModel):
    model: str
    dataset: str
    policies: list[str] = ["fast", "slow"]
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1)
    limit: int | None = Field(None, ge=1)

    @field_validator("policies")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [p for p in value if p not in POLICIES]
        if unknown or not value:
            raise ValueError(f"unknown policy {unknown}; choose from {sorted(POLICIES)}")
        return value


def load_model(path: str | Path):
    """Model and tokenizer from a local directory (never the hub), eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path}: expected a directory with config.json (train one with `kvswitch train-model`)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def summarize(records: list[dict]) -> dict:
    n = len(records)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
        "mean_tokens": sum(r["tokens"] for r in records) / n if n else 0.0,
        "finished_fraction": sum(r["finished"] for r in records) / n if n else 0.0,
    }


def run_policy(model, tokenizer, rows: list[dict], thinking: bool, cfg: EvalConfig, desc: str) -> list[dict]:
    # Similar prompt lengths batch together: less padding, shorter longest-reply per batch.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["question"]))
    records: list[dict | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc=desc, unit="q")
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        prompts = [build_prompt(tokenizer, rows[i]["question"], thinking) for i in idx]
        for i, gen in zip(idx, generate_greedy(model, tokenizer, prompts, cfg.max_new_tokens)):
            row = rows[i]
            records[i] = {
                "question": row["question"],
                "answer": str(row["answer"]),
                "operators": num_operators(row["question"]),
                "predicted": extract_answer(gen.text),
                "correct": is_correct(gen.text, row["answer"]),
                "tokens": gen.tokens,
                "finished": gen.finished,
                "output": gen.text,
            }
        bar.update(len(idx))
    bar.close()
    return records


def run_eval(cfg: EvalConfig) -> dict:
    model, tokenizer = load_model(cfg.model)
    rows = list(read_jsonl(cfg.dataset))[: cfg.limit]
    if not rows:
        raise ValueError(f"{cfg.dataset} holds no questions")
    report: dict = {"model": cfg.model, "dataset": cfg.dataset, "n_questions": len(rows), "policies": {}}
    for policy in cfg.policies:
        started = time.time()
        records = run_policy(model, tokenizer, rows, POLICIES[policy], cfg, desc=policy)
        by_k = defaultdict(list)
        for r in records:
            by_k[r["operators"]].append(r)
        report["policies"][policy] = {
            **summarize(records),
            "by_operators": {str(k): summarize(v) for k, v in sorted(by_k.items())},
            "wall_s": round(time.time() - started, 2),
            "records": records,
        }
    return report


def print_report(report: dict) -> None:
    for name, pol in report["policies"].items():
        print(f"\npolicy {name}: accuracy {pol['accuracy']:.3f}  mean tokens {pol['mean_tokens']:.1f}  "
              f"ended with <|im_end|> {pol['finished_fraction']:.3f}  (n={pol['n']})")
        print(f"{'operators':>9} {'n':>5} {'accuracy':>9} {'mean_tokens':>12}")
        for k, cell in pol["by_operators"].items():
            print(f"{k:>9} {cell['n']:>5} {cell['accuracy']:>9.3f} {cell['mean_tokens']:>12.1f}")
    if {"fast", "slow"} <= report["policies"].keys():
        fast, slow = report["policies"]["fast"], report["policies"]["slow"]
        print(f"\nslow / fast mean tokens: {slow['mean_tokens'] / fast['mean_tokens']:.1f}x")


def plot_report(report: dict, path: str | Path) -> None:
    """Accuracy and mean generated tokens per operator count, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_tok) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pol in report["policies"].items():
        ks = [int(k) for k in pol["by_operators"]]
        ax_acc.plot(ks, [c["accuracy"] for c in pol["by_operators"].values()], marker="o", label=name)
        ax_tok.plot(ks, [c["mean_tokens"] for c in pol["by_operators"].values()], marker="o", label=name)
    ax_acc.set(xlabel="operators", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy by difficulty")
    ax_tok.set(xlabel="operators", ylabel="mean generated tokens", yscale="log", title="Generated tokens")
    for ax in (ax_acc, ax_tok):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
