"""OpenAI-compatible request and response bodies (the subset kvswitch serves), plus the
``kvswitch`` extension object. Validation here is what turns bad input into a 400."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.core.early_exit import EarlyExit, parse_exit

Mode = Literal["auto", "fast", "slow"]


def _check_text(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode text (a lone surrogate such as \\ud800 is not)") from None
    elif isinstance(value, list):
        for item in value:
            _check_text(item)


class _Body(BaseModel):
    # Unknown OpenAI parameters are ignored (clients send many); NaN / inf are refused.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """JSON may carry lone UTF-16 surrogates (``"\\ud800"``) that no tokenizer can encode: a 400,
        not a 500. Each nested model checks its own fields."""
        if isinstance(data, dict):
            for value in data.values():
                _check_text(value)
        return data


class KvswitchOptions(_Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: Mode | None = None
    """auto: the probe and the live load pick the pool; fast / slow force it."""
    online: bool | str | None = None
    """Mid-generation switching (default: the service's setting): true / ``"kv"`` the decode probe,
    false none; or a peer's early exit for A/B tests, ``"dynasor[:K[,W]]"`` or ``"deer[:LAMBDA]"``
    (``serve_app.core.early_exit``; pools on the HF engine)."""
    select: Literal["coe", "vote", "coe-vote"] | None = None
    """Best-of-n: with n > 1, put the choice this rule picks first (serve_app.core.bestofn)."""
    @field_validator("online")
    @classmethod
    def _online_policy(cls, v: bool | str | None) -> bool | str | None:
        if isinstance(v, str) and v != "kv":
            parse_exit(v)  # a ValueError says how to write it
        return v

    def kv_online(self) -> bool | None:
        """Switching on the decode probe: True / False, None for the service's default."""
        return True if self.online == "kv" else (False if isinstance(self.online, str) else self.online)

    def early_exit(self) -> EarlyExit | None:
        return parse_exit(self.online) if isinstance(self.online, str) and self.online != "kv" else None

    max_thinking_tokens: int | None = Field(None, ge=0)
    """Hard cap on the tokens of an open thought: once reached, the thought is closed and the reply
    answers (a backstop; vLLM's ``thinking_token_budget`` semantics, which is accepted as an alias)."""


class ChatTemplateKwargs(_Body):
    enable_thinking: bool | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SamplingRequest(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    kvswitch: KvswitchOptions = KvswitchOptions()
    chat_template_kwargs: ChatTemplateKwargs = ChatTemplateKwargs()
    thinking_token_budget: int | None = Field(None, ge=0)
    """vLLM's name for ``kvswitch.max_thinking_tokens``."""

    def thinking_cap(self) -> int | None:
        return self.kvswitch.max_thinking_tokens if self.kvswitch.max_thinking_tokens is not None else self.thinking_token_budget

    @field_validator("temperature")
    @classmethod
    def _greedy_below_eps(cls, v: float) -> float:
        return 0.0 if v < 1e-5 else v  # as vLLM: a vanishing temperature means greedy decoding

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("max_tokens must be a positive integer")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported by kvswitch")
        return v

    @model_validator(mode="after")
    def _one_thinking_cap(self) -> "SamplingRequest":
        caps = {self.kvswitch.max_thinking_tokens, self.thinking_token_budget} - {None}
        if len(caps) > 1:
            raise ValueError("thinking_token_budget and kvswitch.max_thinking_tokens disagree; send one")
        return self

    @model_validator(mode="after")
    def _select_needs_choices(self) -> "SamplingRequest":
        if self.kvswitch.select is not None and self.stream:
            raise ValueError("kvswitch.select ranks finished choices: send it with stream=false")
        return self

    @model_validator(mode="after")
    def _mode(self) -> "SamplingRequest":
        thinking = self.chat_template_kwargs.enable_thinking
        if thinking is not None:
            wanted = "slow" if thinking else "fast"
            if self.kvswitch.mode not in (None, wanted):
                raise ValueError(f"chat_template_kwargs.enable_thinking={thinking} contradicts kvswitch.mode={self.kvswitch.mode!r}")
        return self

    def forced_mode(self) -> Literal["fast", "slow"] | None:
        """The mode the client fixed (``enable_thinking`` is honoured), else None."""
        thinking = self.chat_template_kwargs.enable_thinking
        if thinking is not None:
            return "slow" if thinking else "fast"
        return None if self.kvswitch.mode in (None, "auto") else self.kvswitch.mode


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    @model_validator(mode="after")
    def _max_tokens_alias(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None:
            if self.max_completion_tokens <= 0:
                raise ValueError("max_completion_tokens must be a positive integer")
            self.max_tokens = self.max_completion_tokens
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be from the assistant (continuation is not supported)")
        return self


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    """Wrapped in the chat template as one user message, so routing works as for chat."""

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send one prompt per request")
            v = v[0]
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    """base64: little-endian float32 bytes (what the openai client asks for by default)."""

    @field_validator("input")
    @classmethod
    def _texts(cls, v: str | list[str]) -> list[str]:
        texts = [v] if isinstance(v, str) else v
        if any(not t.strip() for t in texts):
            raise ValueError("input strings must not be empty")
        if len(texts) > 256:
            raise ValueError("at most 256 inputs per request")
        return texts


class AdminFeaturesRequest(_Body):
    """``POST /admin/v1/features``: the prefill pool's probe feature of token-level prompts."""

    model_config = ConfigDict(extra="forbid")
    prompt_ids: list[list[int]] = Field(min_length=1)

    @field_validator("prompt_ids")
    @classmethod
    def _prompts(cls, v: list[list[int]]) -> list[list[int]]:
        if any(not p for p in v):
            raise ValueError("every prompt needs at least one token id")
        return v


class AdminGenerateRequest(_Body):
    """``POST /admin/v1/generate``: one greedy-or-sampled reply in a forced mode, token level (an
    ``serve_app.engines.base.GenRequest`` over HTTP)."""

    model_config = ConfigDict(extra="forbid")
    prompt_ids: list[int] = Field(min_length=1)
    mode: Literal["fast", "slow"]
    add_prefix: bool = True
    """False: ``prompt_ids`` already end inside the assistant turn (calibration's forced closes)."""
    max_new_tokens: int = Field(ge=1)
    max_thinking_tokens: int | None = Field(None, ge=1)
    record_every: int | None = Field(None, ge=1)
    """Pool the last S cached positions every this many counted tokens (the decode head's inputs)."""
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None


# ----------------------------------------------------------------------------------- responses


class KvswitchInfo(BaseModel):
    route: Literal["fast", "slow"]
    """The pool that generated the reply."""
    reason: str
    """easy / hard / borderline-shifted / forced / prefill-unavailable."""
    difficulty: float | None
    start_mode: Literal["fast", "slow"]
    end_mode: Literal["fast", "slow"]
    switched: bool
    switched_at: int | None
    """Generated-token index of the switch, when one happened."""
    confidence: float | None
    """Calibrated P(correct) from KV Chain-of-Embedding (no extra forward pass)."""
    replica: str | None = None
    """The pool replica that generated the reply."""
    predicted_tokens: float | None = None
    """Tokens the router predicted for this request when it chose the pool (what the pool's request
    router balances replicas on)."""
    fallback: str | None = None
    """Set when routing had to fall back: ``prefill_unavailable`` (no difficulty from the prefill
    pool, so the service's ``fallback_mode`` pool answered)."""
    retried: bool = False
    """The first replica failed before streaming anything and another replica generated the reply."""
    thinking_capped: bool = False
    """The thought was closed by ``max_thinking_tokens`` (not by the model or a switch)."""
    early_exit: str | None = None
    """The peer early-exit rule the request asked for (``kvswitch.online``), e.g. ``dynasor:32,3``."""
    exited_at: int | None = None
    """Generated-token index at which that rule closed the thought, when it did."""
    probe_tokens: int = 0
    """Tokens its side-branch answer probes fed and generated (not part of ``completion_tokens``)."""
    resumed: bool = False
    """The replica streaming this reply died mid-stream and another one continued it from the tokens
    already sent (greedy and seeded sampling continue as they would have)."""


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
