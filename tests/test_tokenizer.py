import pytest
from transformers import AutoTokenizer

from serve_app.embedded import FAST_PREFIX, SLOW_PREFIX, render_prompt, reply, slow_reply
from serve_app.task import Problem, generate_problems


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


def test_slow_reply_steps_and_checks_are_arithmetically_true():
    for p in generate_problems(100, seed=5):
        text = slow_reply(p)
        body, answer = text.split("</think>")
        for line in body.splitlines():
            if " = " in line:
                lhs, rhs = line.split(" = ")
                a, op, b = lhs.split()
                assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(rhs)
        assert f"{p.operands[0]} is the first number" in body
        assert answer == f"\n\n{p.answer}<|im_end|>"
        assert reply(p, thinking=False) == f"{p.answer}<|im_end|>"


def test_slow_reply_has_one_step_line_and_one_check_line_per_operator():
    p = Problem((1, 2, 3, 4), ("+", "-", "+"))
    lines = slow_reply(p).split("</think>")[0].strip().splitlines()
    assert lines == [
        "1 + 2 = 3",
        "3 - 3 = 0",
        "0 + 4 = 4",
        "Let me check by undoing each step.",
        "4 - 4 = 0",
        "0 + 3 = 3",
        "3 - 2 = 1",
        "1 is the first number, so the answer is 4.",
    ]
