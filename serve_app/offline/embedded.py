"""The embedded default model's vocabulary, chat template and reply formats (docs/method.md §7).

The tokenizer is a byte-level BPE (any text encodes, so hostile input never fails to tokenize)
whose pre-tokenizer isolates every digit, trained on rendered task conversations. The chat template
is Qwen3-style: ``enable_thinking=False`` opens the assistant turn with ``<think>\\n\\n</think>\\n\\n``
(fast mode), anything else with ``<think>\\n`` (slow mode).
"""

from __future__ import annotations

import random
from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from serve_app.core.prompts import FAST_PREFIX, SLOW_PREFIX, THINK_CLOSE, THINK_OPEN
from serve_app.core.task import Problem, TaskConfig, sample_problem

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, THINK_OPEN, THINK_CLOSE]
CHECK_HEADER = "Let me check by undoing each step."
REDO_HEADER = "Let me redo each step to be sure."
VOCAB_SIZE = 384


def chat_template() -> str:
    return resources.files("serve_app.offline").joinpath("chat_template.jinja").read_text()


def render_prompt(question: str, thinking: bool) -> str:
    """The exact text the chat template produces for one user question (used for training)."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n" + (
        SLOW_PREFIX if thinking else FAST_PREFIX
    )


def fast_reply(problem: Problem) -> str:
    """Direct answer: the empty think block is already in the prompt."""
    return f"{problem.answer}{IM_END}"


def _columns(x: int, y: int, op: str) -> list[str]:
    """Column-by-column working of ``x op y`` on non-negative ints (``x >= y`` for ``-``), units first.

    Addition: ``7+8=15`` then ``3+4+1=8`` (the ``+1`` is the carry). Subtraction: ``15-9=6`` (a
    leading 1 marks a borrow) then ``8-1-1=6`` (the ``-1`` pays it back). Every column is a
    one-digit fact, which a 3M-parameter model learns far more reliably than whole-number sums.
    """
    xs, ys = str(x)[::-1], str(y)[::-1]
    cols, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        a = int(xs[i]) if i < len(xs) else 0
        b = int(ys[i]) if i < len(ys) else 0
        if op == "+":
            total = a + b + carry
            cols.append(f"{a}+{b}+1={total}" if carry else f"{a}+{b}={total}")
            carry = total // 10
        else:
            rest = a - b - carry
            paid = "-1" if carry else ""
            cols.append(f"1{a}-{b}{paid}={rest + 10}" if rest < 0 else f"{a}-{b}{paid}={rest}")
            carry = 1 if rest < 0 else 0
    return cols


def step_line(acc: int, op: str, operand: int) -> str:
    """One worked step: reduce the signed step to whole-number arithmetic, work it, state it.

    ``-142 + 48`` has the value ``-(142 - 48)``, so its line reads ``142 - 48 instead``; the sign
    follows from the sign of ``acc`` and whether the operands were swapped.
    """
    value = acc + operand if op == "+" else acc - operand
    mag = abs(acc)
    adds = (acc >= 0) == (op == "+")
    if adds:
        x, y, col_op = mag, operand, "+"
    else:
        x, y, col_op = max(mag, operand), min(mag, operand), "-"
    plain = acc >= 0 and (op == "+" or mag >= operand)
    lead = "" if plain else f" {x} {col_op} {y} instead,"
    return f"{acc} {op} {operand}:{lead} {', '.join(_columns(x, y, col_op))}, so {value}"


def slow_thought(problem: Problem) -> str:
    """The thinking text of a slow reply (no ``</think>``): worked steps, then two re-checks.

    1. the worked steps, column by column;
    2. a re-check that undoes every step back to the first number;
    3. a second pass that redoes every step, then a closing agreement line.

    Both re-checks are deliberate overthinking, as reasoning models do on easy questions: they
    never change the answer (the last worked step already holds it), and they are what fast/slow
    switching exists to cut. A thought closed anywhere after the first pass still has its answer.
    """
    steps, acc = [], problem.operands[0]
    for op, operand, value in zip(problem.ops, problem.operands[1:], problem.running_values()):
        steps.append(step_line(acc, op, operand))
        acc = value
    lines = [*steps, CHECK_HEADER]
    for op, operand in reversed(list(zip(problem.ops, problem.operands[1:]))):
        undo = "-" if op == "+" else "+"
        back = acc - operand if op == "+" else acc + operand
        lines.append(f"{acc} {undo} {operand} = {back}")
        acc = back
    lines.append(f"{acc} is the first number, so the answer is {problem.answer}.")
    lines += [REDO_HEADER, *steps, f"Both passes agree, so the answer is {problem.answer}."]
    return "\n".join(lines) + "\n"


def first_pass_chars(problem: Problem) -> int:
    """Length of the worked steps in ``slow_thought`` (where the first re-check starts)."""
    return slow_thought(problem).index(CHECK_HEADER)


def slow_reply(problem: Problem) -> str:
    """Thinking (``slow_thought``), then the answer after ``</think>``."""
    return f"{slow_thought(problem)}{THINK_CLOSE}\n\n{problem.answer}{IM_END}"


def reply(problem: Problem, thinking: bool) -> str:
    return slow_reply(problem) if thinking else fast_reply(problem)


def _tokenizer_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    cfg = TaskConfig()
    texts = []
    for i in range(n):
        p = sample_problem(rng, rng.randint(cfg.min_operators, cfg.max_operators))
        thinking = i % 2 == 0
        texts.append(render_prompt(p.question, thinking) + reply(p, thinking))
    texts.append("system user assistant You are a helpful assistant. Answer the question.")
    return texts


def build_tokenizer(seed: int = 0, corpus_size: int = 4000) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE (digits isolated) and wrap it with the chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_tokenizer_corpus(corpus_size, seed), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, THINK_OPEN, THINK_CLOSE],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tokenizer.chat_template = chat_template()
    return tokenizer
