import re

import pytest
from transformers import AutoTokenizer

from serve_app.core.prompts import FAST_PREFIX, SLOW_PREFIX
from serve_app.core.task import Problem, generate_problems
from serve_app.offline.embedded import render_prompt, reply, slow_reply, step_line


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def test_digits_are_single_tokens(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("What is 1234 + 56?", add_special_tokens=False)["input_ids"])
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("123456")


@pytest.mark.parametrize(
    "text",
    [
        "What is 37 + 48 - 19?",
        "<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>\n\n",
        "unicode: héllo 世界 😀 \t tabs\nnew lines  double  spaces",
        "control \x00\x01\x7f chars",
    ],
)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_special_tokens_are_single_ids(tokenizer):
    for tok in ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [tok]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"


def test_template_fast_mode_opens_with_empty_think_block(tokenizer):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert text.endswith(FAST_PREFIX)


def test_template_slow_mode_opens_think_block_and_is_the_default(tokenizer):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    on = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True, tokenize=False)
    default = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert on == default == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert on.endswith(SLOW_PREFIX)


def test_template_matches_training_prompt_and_drops_old_thoughts(tokenizer):
    q = "What is 5 - 7?"
    for thinking in (False, True):
        msgs = [{"role": "user", "content": q}]
        assert tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, enable_thinking=thinking, tokenize=False
        ) == render_prompt(q, thinking)
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "<think>\n1 + 1 = 2\n</think>\n\n2"},
        {"role": "user", "content": q},
    ]
    text = tokenizer.apply_chat_template(history, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "<|im_start|>assistant\n2<|im_end|>\n" in text  # previous reasoning is not replayed


STEP_RE = re.compile(r"^(-?\d+) ([+-]) (\d+):(?: (\d+) ([+-]) (\d+) instead,)? (.+), so (-?\d+)$")
COLUMN_RE = re.compile(r"^(1?)(\d)([+-])(\d)((?:[+-]1)?)=(\d+)$")


def check_step(line: str) -> int:
    """Re-derive one worked step from its own columns; return the value it states."""
    m = STEP_RE.match(line)
    assert m, line
    acc, op, operand = int(m[1]), m[2], int(m[3])
    value = acc + operand if op == "+" else acc - operand
    assert int(m[8]) == value, line
    if m[4] is not None:
        x, col_op, y = int(m[4]), m[5], int(m[6])
    else:
        x, col_op, y = acc, op, operand
    assert x >= 0 and y >= 0 and (col_op == "+" or x >= y), line
    assert (x + y if col_op == "+" else x - y) == abs(value), line
    digits, carry = [], 0
    for i, col in enumerate(m[7].split(", ")):
        c = COLUMN_RE.match(col)
        assert c, (line, col)
        borrowed, a, cop, b, paid, shown = c.groups()
        assert cop == col_op and int(a) == x // 10**i % 10 and int(b) == y // 10**i % 10, (line, col)
        assert paid == ("" if not carry else ("+1" if col_op == "+" else "-1")), (line, col)
        if col_op == "+":
            assert not borrowed and int(shown) == int(a) + int(b) + carry
            digits.append(int(shown) % 10)
            carry = int(shown) // 10
        else:
            rest = int(a) - int(b) - carry
            assert bool(borrowed) == (rest < 0) and int(shown) == rest + 10 * bool(borrowed), (line, col)
            digits.append(int(shown))
            carry = int(bool(borrowed))
    assert sum(d * 10**i for i, d in enumerate(digits)) + carry * 10 ** len(digits) == abs(value), line
    return value


def test_every_worked_step_checks_out_column_by_column():
    for p in generate_problems(300, seed=5):
        body, answer = slow_reply(p).split("</think>")
        lines = body.strip().splitlines()
        k = p.num_operators
        values = [check_step(line) for line in lines[:k]]
        assert values == p.running_values()
        assert lines[k] == "Let me check by undoing each step."
        for line in lines[k + 1 : 2 * k + 1]:  # the re-check: compact undo lines
            lhs, rhs = line.split(" = ")
            a, op, b = lhs.split()
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(rhs)
        assert lines[2 * k + 1] == f"{p.operands[0]} is the first number, so the answer is {p.answer}."
        assert lines[2 * k + 2] == "Let me redo each step to be sure."
        assert lines[2 * k + 3 : 3 * k + 3] == lines[:k]
        assert lines[-1] == f"Both passes agree, so the answer is {p.answer}."
        assert answer == f"\n\n{p.answer}<|im_end|>"
        assert reply(p, thinking=False) == f"{p.answer}<|im_end|>"


def test_step_lines_are_right_for_every_reachable_running_value():
    # running values stay within [-6*99, 6*99 + 99]; check every one against every operand
    for acc in range(-6 * 99, 7 * 99 + 1, 7):
        for operand in range(100):
            for op in "+-":
                assert check_step(step_line(acc, op, operand)) == (acc + operand if op == "+" else acc - operand)


def test_slow_reply_layout():
    p = Problem((37, 48, 19, 60), ("+", "-", "-"))
    assert slow_reply(p) == (
        "37 + 48: 7+8=15, 3+4+1=8, so 85\n"
        "85 - 19: 15-9=6, 8-1-1=6, so 66\n"
        "66 - 60: 6-0=6, 6-6=0, so 6\n"
        "Let me check by undoing each step.\n"
        "6 + 60 = 66\n"
        "66 + 19 = 85\n"
        "85 - 48 = 37\n"
        "37 is the first number, so the answer is 6.\n"
        "Let me redo each step to be sure.\n"
        "37 + 48: 7+8=15, 3+4+1=8, so 85\n"
        "85 - 19: 15-9=6, 8-1-1=6, so 66\n"
        "66 - 60: 6-0=6, 6-6=0, so 6\n"
        "Both passes agree, so the answer is 6.\n"
        "</think>\n\n6<|im_end|>"
    )
    assert step_line(-142, "+", 48) == "-142 + 48: 142 - 48 instead, 12-8=4, 14-4-1=9, 1-0-1=0, so -94"
    assert step_line(32, "-", 35) == "32 - 35: 35 - 32 instead, 5-2=3, 3-3=0, so -3"
    assert step_line(-55, "-", 97) == "-55 - 97: 55 + 97 instead, 5+7=12, 5+9+1=15, so -152"
