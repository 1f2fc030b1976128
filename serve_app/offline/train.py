"""Train the embedded default model from scratch (docs/method.md §7): a small Qwen3 on chain arithmetic.

Read top to bottom: constants, data, the loop. Both modes are mixed in every run: fast replies
answer directly after the empty think block; slow replies work the steps, undo them to re-check,
then answer. Loss is on reply tokens only (the question's operands are noise to predict).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from tqdm import tqdm
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from typing import Literal

from serve_app.core.prompts import THINK_CLOSE
from serve_app.core.task import Problem, TaskConfig, generate_problems, is_correct, sample_problem
from serve_app.offline import checked
from serve_app.offline.embedded import IM_END, build_tokenizer, first_pass_chars, render_prompt, reply, slow_thought
from serve_app.offline.generate import MAX_NEW_TOKENS, build_prompt, generate_greedy

MONITOR_SEED = 7_777  # in-training spot checks; never used for shipped evaluation sets


class TrainConfig(BaseModel):
    """Everything that decides the trained weights; stored next to them as train_config.json."""

    seed: int = 0
    steps: int = Field(9000, ge=1)
    tokens_per_batch: int = Field(6144, ge=256)
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.05
    slow_fraction: float = Field(0.3, ge=0, le=1)
    # Fast replies are one-shot answers; only short chains are learnable that way, so a share of
    # fast examples is pinned to one operator (the rest are uniform, so fast stays wrong on hard ones).
    # Fast examples are ~25 tokens against ~240 for slow ones: a high fast share by count costs the
    # slow mode little (about 10% of its examples at 0.3 vs 0.5) and gives one-shot answers the
    # volume they need now that slow steps are worked column by column.
    fast_one_operator_fraction: float = Field(0.6, ge=0, le=1)
    # A share of slow examples is cut at a random token after the worked steps and closed with
    # ``</think>\n\n`` (no loss on those tokens: the model must not learn to close by itself), then
    # answered. That is what an online slow → fast switch does at serving time (docs/method.md §5).
    forced_close_fraction: float = Field(0.25, ge=0, le=1)
    reply_format: Literal["v1", "checked", "checked-keyed", "checked-judged"] = "v1"
    """``v1``: the shipped model's slow replies (a scripted re-check that always agrees); ``checked``:
    the v2 replies of ``serve_app.offline.checked`` (first pass, a step-by-step check, a redo from a
    slip it finds); ``checked-keyed``: the same with the check's operands looked up by key
    (``checked_thought(keyed=True)``); ``checked-judged``: ``checked`` with each verdict pair written,
    then judged (``checked_thought(judged=True)``)."""
    slip_fraction: float = Field(0.3, ge=0, le=1)
    """``checked``: share of slow replies whose first pass carries one slip (masked) for the check to find."""
    check_slip_fraction: float = Field(0.0, ge=0, le=1)
    """``checked``: share of the slow replies with a right first pass (and not force-closed) whose
    check makes one slip of its own in an undo (masked): a false alarm the redo must mend."""
    double_slip_fraction: float = Field(0.0, ge=0, le=1)
    """``checked``: share of the slow replies with a first-pass slip whose check slips too, at the same
    step: the undo takes an operand that is neither the question's nor the first pass's (masked), so
    the redo must read the question's (``checked.sample_double_slip``)."""
    operation_slip_fraction: float = Field(0.0, ge=0, le=1)
    """``checked``: share of the first-pass slips that flip the step's operation (``- 36`` for ``+ 36``,
    ``checked.sample_operation_slip``) instead of an operand or result slip."""
    close_step_fraction: float = Field(0.0, ge=0, le=1)
    """Share of slow training questions with one step rebuilt as a signed step whose two magnitudes
    differ by at most 9 (``with_close_step``: ``-65 + 68``, ``93 - 89``)."""
    check_weight: float = Field(1.0, ge=1)
    """``checked``: loss weight of the check's verdict and redo tokens (``checked.check_spans``); every
    other reply token weighs 1."""
    fast_small_fraction: float = Field(0.0, ge=0, le=1)
    """Share of fast examples that are two-operator questions with single-digit operands (one-shot
    answers the model can learn: fast is then enough for small operands, not only one operator)."""
    max_positions: int = Field(1024, ge=256)
    """The model's context (``max_position_embeddings``); long chains with the v2 check need 2048."""
    init_from: str | None = None
    """Fine-tune from this checkpoint directory instead of starting from scratch."""
    layers: int = Field(4, ge=4)
    hidden_size: int = 256
    intermediate_size: int = 768
    attention_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    bf16: bool = True
    threads: int = 2
    monitor_every: int = 1500
    monitor_size: int = Field(32, ge=1)
    """Questions per (operator count, mode) cell of the greedy accuracy monitor (1, 3 and 6 operators)."""
    task: TaskConfig = TaskConfig()


def model_config(cfg: TrainConfig, tokenizer) -> Qwen3Config:
    if cfg.kv_heads >= cfg.attention_heads or cfg.attention_heads % cfg.kv_heads:
        raise ValueError("GQA needs kv_heads < attention_heads and attention_heads % kv_heads == 0")
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.attention_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_positions,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sample_batches(cfg: TrainConfig, tokenizer, rng: random.Random, pool_size: int = 2048):
    """Endless length-bucketed batches of (input_ids, labels, loss weights); about tokens_per_batch
    tokens each."""
    while True:
        rows = []
        for _ in range(pool_size):
            thinking = rng.random() < cfg.slow_fraction
            problem = sample_training_problem(cfg, rng, thinking)
            p = tokenizer.encode(render_prompt(problem.question, thinking), add_special_tokens=False)
            if thinking and cfg.reply_format != "v1":
                rows.append((p, *checked_example(tokenizer, problem, rng, cfg)))
            elif thinking and rng.random() < cfg.forced_close_fraction:
                ids, labels = forced_close_reply(tokenizer, problem, rng)
                rows.append((p, ids, labels, None))
            else:
                r = tokenizer.encode(reply(problem, thinking), add_special_tokens=False)
                rows.append((p, r, r, None))
        rows.sort(key=lambda pr: len(pr[0]) + len(pr[1]))
        batches, start = [], 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and (end - start + 1) * (len(rows[end][0]) + len(rows[end][1])) <= cfg.tokens_per_batch:
                end += 1
            batches.append(rows[start:end])
            start = end
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(p) + len(r) for p, r, _, _ in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            weights = torch.ones((len(batch), width))
            for i, (p, r, lab, w) in enumerate(batch):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                labels[i, len(p) : len(p) + len(r)] = torch.tensor(lab)
                if w is not None:
                    weights[i, len(p) : len(p) + len(r)] = torch.tensor(w)
            yield ids, labels, weights


def sample_training_problem(cfg: TrainConfig, rng: random.Random, thinking: bool):
    """A slow example: operator count uniform over the task's range. A fast one: one operator
    (``fast_one_operator_fraction``), two single-digit operands and one operator more
    (``fast_small_fraction``), else as a slow one."""
    task = cfg.task
    k = rng.randint(task.min_operators, task.max_operators)
    if not thinking:
        r = rng.random()
        if r < cfg.fast_one_operator_fraction:
            k = task.min_operators
        elif r < cfg.fast_one_operator_fraction + cfg.fast_small_fraction:
            return sample_problem(rng, 2, 9)
    problem = sample_problem(rng, k, task.max_operand, task.operands)
    if thinking and cfg.close_step_fraction and rng.random() < cfg.close_step_fraction:
        return with_close_step(rng, problem, task.max_operand)
    return problem


def with_close_step(rng: random.Random, problem: Problem, max_operand: int) -> Problem:
    """``problem`` with one step, at a uniform position, rebuilt as a signed step whose two magnitudes
    differ by at most 9: ``-a + b`` after a negative running value, ``a - b`` after a non-negative one,
    ``b = a + d`` with ``d`` uniform in -9..9 (kept within 0..``max_operand``), so the step's result is
    ``d`` or ``-d``, about half of the time across zero. Where v2's first pass goes wrong most (``kvswitch
    first-pass-errors``: the magnitudes written smaller first or miscopied). The later steps keep
    their operations and operands."""
    j = rng.randrange(problem.num_operators)
    before = problem.operands[0] if j == 0 else problem.running_values()[j - 1]
    operand = min(max(abs(before) + rng.randint(-9, 9), 0), max_operand)
    operands = (*problem.operands[: j + 1], operand, *problem.operands[j + 2 :])
    ops = (*problem.ops[:j], "+" if before < 0 else "-", *problem.ops[j + 1 :])
    return Problem(operands, ops)


def checked_example(tokenizer, problem, rng: random.Random, cfg: TrainConfig) -> tuple[list[int], list[int], list[float] | None]:
    """A v2 slow reply (``checked``): with ``slip_fraction`` one slip in the first pass, its line
    masked (the model learns to find and repair a slip, not to make one); else, with
    ``forced_close_fraction``, cut after the first pass and closed (what an online switch does); else,
    with ``check_slip_fraction``, one slip in an undo of the check, masked (a false alarm it mends);
    a slipped reply, with ``double_slip_fraction``, also a slip in the undo of the slipped step (masked);
    ``operation_slip_fraction`` of the slips flip the step's operation.
    Returns (reply ids, labels, loss weights: ``check_weight`` on the check's verdict and redo tokens,
    None when every token weighs 1)."""
    slip = checked.sample_slip(rng, problem) if rng.random() < cfg.slip_fraction else None
    if slip is not None and cfg.operation_slip_fraction and rng.random() < cfg.operation_slip_fraction:
        slip = checked.sample_operation_slip(rng, problem) or slip
    fmt = {"keyed": cfg.reply_format == "checked-keyed", "judged": cfg.reply_format == "checked-judged"}
    if slip is None and rng.random() < cfg.forced_close_fraction:
        thought, _ = checked.checked_thought(problem, **fmt)
        ids, labels = close_after_first_pass(tokenizer, thought, thought.index(checked.CHECK_HEADER), problem.answer, rng)
        return ids, labels, None
    check_slip = None
    if slip is None and cfg.check_slip_fraction and rng.random() < cfg.check_slip_fraction:
        check_slip = checked.sample_check_slip(rng, problem)
    elif slip is not None and cfg.double_slip_fraction and rng.random() < cfg.double_slip_fraction:
        check_slip = checked.sample_double_slip(rng, problem, slip)
    thought, masked = checked.checked_thought(problem, slip, check_slip=check_slip, **fmt)
    text = f"{thought}{THINK_CLOSE}\n\n{problem.answer}{IM_END}"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = list(enc.input_ids)
    for i, (a, b) in enumerate(enc.offset_mapping):
        if any(a < e and b > s for s, e in masked):  # a token of a slipped line
            labels[i] = -100
    if cfg.check_weight == 1.0:
        return list(enc.input_ids), labels, None
    spans = checked.check_spans(thought)
    weights = [cfg.check_weight if any(a < e and b > s for s, e in spans) else 1.0 for a, b in enc.offset_mapping]
    return list(enc.input_ids), labels, weights


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, each target token weighted, averaged over the weights of the tokens
    that count (label != -100). With every weight 1 it is the mean the model's own loss computes."""
    logits, labels, weights = logits[:, :-1].float(), labels[:, 1:], weights[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none")
    w = weights.reshape(-1) * (labels.reshape(-1) != -100)
    return (ce * w).sum() / w.sum()


def forced_close_reply(tokenizer, problem, rng: random.Random) -> tuple[list[int], list[int]]:
    """A slow reply cut at a random token after the worked steps, closed, then answered.

    Returns (reply ids, labels): the close tokens carry label -100 (they are injected, not learnt).
    """
    return close_after_first_pass(tokenizer, slow_thought(problem), first_pass_chars(problem), problem.answer, rng)


def close_after_first_pass(tokenizer, thought: str, first_chars: int, answer: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """``thought`` cut at a random token from its first ``first_chars`` characters (the first pass) on,
    ``</think>\n\n`` appended with label -100 (injected, not learnt), then ``answer``."""
    ids = tokenizer.encode(thought, add_special_tokens=False)
    first = len(tokenizer.encode(thought[:first_chars], add_special_tokens=False))
    cut = rng.randint(min(first, len(ids)), len(ids))
    close = tokenizer.encode(f"{THINK_CLOSE}\n\n", add_special_tokens=False)
    tail = tokenizer.encode(f"{answer}{IM_END}", add_special_tokens=False)
    return ids[:cut] + close + tail, ids[:cut] + [-100] * len(close) + tail


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def monitor(model, tokenizer, n_per_cell: int = 32, operators: tuple[int, ...] = (1, 3, 6), max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Greedy accuracy of both modes at each operator count on a fixed small set (operands 0-99)."""
    model.eval()
    report = {}
    for k in operators:
        problems = generate_problems(n_per_cell, MONITOR_SEED + k, TaskConfig(min_operators=k, max_operators=k))
        for thinking in (False, True):
            gens = generate_greedy(
                model, tokenizer, [build_prompt(tokenizer, p.question, thinking) for p in problems],
                max_new_tokens=max_new_tokens if thinking else 16,
            )
            acc = sum(is_correct(g.text, p.answer) for g, p in zip(gens, problems)) / len(problems)
            report[f"{'slow' if thinking else 'fast'}@{k}"] = round(acc, 3)
    model.train()
    return report


def train(cfg: TrainConfig, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    if cfg.init_from:
        # Fine-tuning keeps the checkpoint's tokenizer and architecture.
        tokenizer = AutoTokenizer.from_pretrained(cfg.init_from, local_files_only=True)
        model = Qwen3ForCausalLM.from_pretrained(cfg.init_from, local_files_only=True, dtype=torch.float32)
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, cfg.max_positions)  # RoPE: no table to grow
        tokenizer.model_max_length = model.config.max_position_embeddings
    else:
        tokenizer = build_tokenizer(seed=cfg.seed)
        tokenizer.model_max_length = cfg.max_positions
        model = Qwen3ForCausalLM(model_config(cfg, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    out.mkdir(parents=True, exist_ok=True)
    log = {"params": n_params, "config": cfg.model_dump(), "monitor": [], "loss": []}
    batches = sample_batches(cfg, tokenizer, rng)
    model.train()
    started, tokens_seen = time.time(), 0
    bar = tqdm(range(cfg.steps), desc="train", unit="step", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        ids, labels, weights = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            if cfg.check_weight == 1.0:
                loss = model(input_ids=ids, labels=labels).loss
            else:
                loss = weighted_loss(model(input_ids=ids).logits, labels, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += ids.numel()
        if step % 50 == 0:
            elapsed = time.time() - started
            log["loss"].append([step, round(loss.item(), 4), round(elapsed, 1)])
            bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens_seen / elapsed:.0f}")
        if (step + 1) % cfg.monitor_every == 0 or step + 1 == cfg.steps:
            longest = cfg.task.max_operators if cfg.reply_format != "v1" else 6
            report = monitor(model, tokenizer, cfg.monitor_size, tuple(sorted({1, 3, 6, longest})),
                             MAX_NEW_TOKENS if cfg.reply_format == "v1" else cfg.max_positions - 256)
            log["monitor"].append({"step": step + 1, "elapsed_s": round(time.time() - started, 1), **report})
            tqdm.write(f"step {step + 1}: {report}")
            save(model, tokenizer, cfg, log, out)
    log["train_seconds"] = round(time.time() - started, 1)
    log["tokens_seen"] = tokens_seen
    save(model, tokenizer, cfg, log, out)
    return log


def save(model, tokenizer, cfg: TrainConfig, log: dict, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train_config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
