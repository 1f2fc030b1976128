"""Mode prompts: the think tags, each mode's prefix and the shared prompt every request prefills.

The defaults are Qwen3's hybrid-thinking format (the embedded model's chat template has the same
switch): fast mode opens the assistant turn with an empty thought ``<think>\n\n</think>\n\n``,
slow mode with ``<think>\n``; a mid-generation switch appends ``</think>\n\n`` (slow -> fast) or
``<think>\n`` (fast -> slow). See docs/method.md §5.

``resolve_prompts`` derives a checkpoint's mode prompts from its own chat template: a template
with Qwen3's ``enable_thinking`` switch gives its thinking-off turn as the fast prefix; a template
without one (DeepSeek-R1-distill style: every turn thinks) gets the fast mode by prefilling an
empty think block. A template that cannot give both modes is refused at load (docs/models.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # core needs no transformers at run time: any object with encode / apply_chat_template works
    from transformers import PreTrainedTokenizerBase

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FAST_PREFIX = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
SLOW_PREFIX = f"{THINK_OPEN}\n"
_PROBE_TURN = [{"role": "user", "content": "1 + 1"}]


class ThinkTags(BaseModel):
    """The tags a model's thought sits between (``think_tags`` in the service config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    open: str = Field(THINK_OPEN, min_length=1)
    close: str = Field(THINK_CLOSE, min_length=1)


class ModePrompts(BaseModel):
    """Model-specific mode texts (Qwen3 style by default). Configuration, not code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fast_prefix: str = FAST_PREFIX
    slow_prefix: str = SLOW_PREFIX
    close_think: str = f"{THINK_CLOSE}\n\n"
    """Appended to a slow reply to end thinking (slow → fast switch)."""
    open_think: str = f"{THINK_OPEN}\n"
    """Appended to a fast reply to start thinking (fast → slow switch)."""
    always_thinks: bool = False
    """The chat template has no thinking switch (R1 style): fast mode is a prefilled empty thought."""

    @classmethod
    def for_tags(cls, tags: ThinkTags, **fields) -> ModePrompts:
        """The Qwen3-format texts with the given tags."""
        return cls(fast_prefix=f"{tags.open}\n\n{tags.close}\n\n", slow_prefix=f"{tags.open}\n", close_think=f"{tags.close}\n\n",
                   open_think=f"{tags.open}\n", **fields)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], thinking: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking, tokenize=False)


def resolve_prompts(tokenizer: PreTrainedTokenizerBase, tags: ThinkTags = ThinkTags()) -> ModePrompts:
    """The mode prompts a checkpoint's chat template gives, or a ``ValueError`` saying why it cannot
    give both modes: no chat template; think tags neither in the template nor in the vocabulary
    (set ``think_tags``); a thinking-on turn that is already closed (thinking cannot be turned on);
    a thinking-off turn that is not the thinking-on turn plus one empty thought."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template: kvswitch needs a hybrid-thinking chat model")
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if not any(tag in template or tag in vocab for tag in (tags.open, tags.close)):
        raise ValueError(f"neither the chat template nor the vocabulary knows the think tags {tags.open!r} / {tags.close!r}: "
                         "kvswitch needs a model that thinks between tags (set think_tags if its tags differ)")
    prompts = ModePrompts.for_tags(tags)
    on, off = _render(tokenizer, _PROBE_TURN, True), _render(tokenizer, _PROBE_TURN, False)
    if on.rstrip().endswith(tags.close):
        raise ValueError(f"the chat template closes the thought itself ({tags.close!r} ends the thinking-on turn): thinking "
                         "cannot be turned on, so there is no slow mode")
    if not on.endswith(prompts.slow_prefix) and on.endswith(tags.open):  # a template that opens the thought without a newline
        prompts = prompts.model_copy(update={"slow_prefix": tags.open})
    base = on.removesuffix(prompts.slow_prefix)
    if off == on:  # no switch: every turn thinks (R1-distill); fast = an empty thought prefilled
        return prompts.model_copy(update={"always_thinks": True})
    fast = off.removeprefix(base) if off.startswith(base) else None
    if fast is None or not fast.startswith(tags.open) or tags.close not in fast or fast[len(tags.open):fast.find(tags.close)].strip():
        raise ValueError(f"the chat template's thinking-off turn is not its thinking-on turn plus an empty thought "
                         f"({off[len(base):]!r} after the shared prompt): cannot derive the fast mode")
    return prompts.model_copy(update={"fast_prefix": fast})


def base_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], prompts: ModePrompts = ModePrompts()) -> str:
    """The shared prompt text every request prefills: the chat template with the generation
    prompt, minus the slow-mode prefix where the template adds one (real Qwen3 templates add none;
    R1-style templates always do)."""
    text = _render(tokenizer, messages, True)
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
