"""Batched greedy generation with the HF engine, used by evaluation and the training monitor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Generation:
    text: str
    tokens: int
    """Every generated token, the closing ``<|im_end|>`` included."""
    finished: bool
    """True when the reply ended with the end-of-turn token (not cut by max_new_tokens)."""


def build_prompt(tokenizer: PreTrainedTokenizerBase, question: str, thinking: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        enable_thinking=thinking,
        tokenize=False,
    )


MAX_NEW_TOKENS = 1792
"""Default generation cap: the embedded model's (v2) longest slow replies, 8 operators with the check, are
~1350 tokens; its context is 2048. Engines stop a reply earlier where the context ends."""


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
) -> list[Generation]:
    """Greedy decode a batch of prompt texts (left-padded), stopping each row at end-of-turn."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    results = []
    for row in new.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
            finished = True
        else:
            row = [t for t in row if t != tokenizer.pad_token_id]
            finished = False
        results.append(Generation(tokenizer.decode(row), len(row), finished))
    return results
