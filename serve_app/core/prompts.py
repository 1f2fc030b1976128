"""Mode prompts: the think tags, each mode's prefix and the shared prompt every request prefills.

The defaults are Qwen3's hybrid-thinking format (the embedded model's chat template has the same
switch): fast mode opens the assistant turn with an empty thought ``<think>\n\n</think>\n\n``,
slow mode with ``<think>\n``; a mid-generation switch appends ``</think>\n\n`` (slow -> fast) or
``<think>\n`` (fast -> slow). See docs/method.md §5.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # core needs no transformers at run time: any object with encode / apply_chat_template works
    from transformers import PreTrainedTokenizerBase

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FAST_PREFIX = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
SLOW_PREFIX = f"{THINK_OPEN}\n"


class ModePrompts(BaseModel):
    """Model-specific mode texts (Qwen3 style by default). Configuration, not code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fast_prefix: str = FAST_PREFIX
    slow_prefix: str = SLOW_PREFIX
    close_think: str = f"{THINK_CLOSE}\n\n"
    """Appended to a slow reply to end thinking (slow → fast switch)."""
    open_think: str = f"{THINK_OPEN}\n"
    """Appended to a fast reply to start thinking (fast → slow switch)."""


def base_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], prompts: ModePrompts = ModePrompts()) -> str:
    """The shared prompt text every request prefills: the chat template with the generation
    prompt, minus the slow-mode prefix where the template adds one (real Qwen3 templates add none)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=True, tokenize=False)
    if prompts.slow_prefix and text.endswith(prompts.slow_prefix):
        text = text[: -len(prompts.slow_prefix)]
    return text


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict], prompts: ModePrompts = ModePrompts()) -> list[int]:
    """Token ids of ``base_prompt`` (what the engine prefills and the router measures)."""
    return tokenizer.encode(base_prompt(tokenizer, messages, prompts), add_special_tokens=False)


def mode_prefix_ids(tokenizer: PreTrainedTokenizerBase, prompts: ModePrompts = ModePrompts()) -> dict[str, list[int]]:
    """Token ids of each mode's prefix (fed after the shared prompt; counted as prompt tokens)."""
    return {m: tokenizer.encode(t, add_special_tokens=False) for m, t in (("fast", prompts.fast_prefix), ("slow", prompts.slow_prefix))}




def switch_ids(tokenizer: PreTrainedTokenizerBase, prompts: ModePrompts = ModePrompts()) -> dict[str, list[int]]:
    """Token ids appended when a reply switches *into* the given mode (fast: close the thought;
    slow: open one). Counted as generated tokens."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return {"fast": enc(prompts.close_think), "slow": enc(prompts.open_think)}
