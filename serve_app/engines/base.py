"""What every engine offers the serving layer, whatever runs the model (HF transformers or vLLM).

An ``Engine`` serves one pool: it computes prompt features (probe feature, KV embedding), streams
one request's tokens (with online switching inside the engine) and reports its load. Deployments
talk to this protocol only; ``engines.load.make_engine(cfg, pool)`` builds the configured one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence

import torch
from pydantic import BaseModel

from serve_app.core.early_exit import EarlyExit
from serve_app.core.kv_features import PoolingConfig
from serve_app.core.policy import Mode
from serve_app.core.prompts import ModePrompts, ThinkTags, mode_prefix_ids, resolve_prompts, switch_ids

SAMPLING_EPS = 1e-5
"""Temperatures below this sample greedily (vLLM's ``_SAMPLING_EPS``)."""


class DifficultyScorer(Protocol):
    """What the engine needs from a calibrated probe (serve_app.core.probe.Probe implements it)."""

    pooling: PoolingConfig
    decode_pooling: PoolingConfig
    """Pooling of the last S cached positions during decoding (often the same as ``pooling``)."""

    def prompt_difficulty(self, features: torch.Tensor, kind: str = "kv") -> torch.Tensor: ...

    def decode_difficulty(self, features: torch.Tensor) -> torch.Tensor: ...


@dataclass
class GenRequest:
    prompt_ids: list[int]
    """Token ids of the shared prompt: the chat template up to the assistant turn, no think prefix."""
    mode: Mode | None = None
    """Forced mode; ``None`` lets the probe decide (d > tau → slow)."""
    online: bool = False
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0 (or below ``SAMPLING_EPS``, vLLM's cut-off): greedy."""
    top_p: float = 1.0
    seed: int | None = None
    add_prefix: bool = True
    """False: ``prompt_ids`` already end inside the assistant turn (calibration's forced closes)."""
    request_id: str = ""
    """The service's id of the request (logs only)."""
    max_thinking_tokens: int | None = None
    """Hard cap on thinking tokens (vLLM's ``thinking_token_budget`` semantics): once the open
    thought holds this many tokens, the close-think tokens are forced and the reply answers."""
    already: int = 0
    """Tokens of this reply generated before this request (a reply resumed on another replica after
    its first one died; ``prompt_ids`` then end with them and ``add_prefix`` is False). Online checks
    and seeded sampling continue on the schedule of the first replica."""
    record_every: int | None = None
    """Calibration through a service (``kvswitch calibrate --url``): pool the last S cached positions
    every this many counted tokens with the engine's decode pooling (``GenResult.recorded``), as a
    batch-wide ``record`` does offline."""
    early_exit: EarlyExit | None = None
    """A peer's early-exit rule (Dynasor-CoT or DEER, ``serve_app.core.early_exit``): probe the
    answer in side branches while the thought is open and end it when the rule fires (HF engine)."""


class GenerationError(RuntimeError):
    """One request's generation failed (the details are in the replica's log, not in the message:
    clients see only the request id). The other requests of the batch go on."""

    def __init__(self, request_id: str = ""):
        super().__init__(f"generation failed (request {request_id or 'without id'}); the details are in the service's logs")
        self.request_id = request_id

    def __reduce__(self):  # Ray pickles it across processes
        return (GenerationError, (self.request_id,))


@dataclass
class GenResult:
    text: str
    """The generated text (switch tokens included), without the mode prefix."""
    reply: str
    """The whole assistant turn: mode prefix + text. Grade this."""
    tokens: int
    """Every generated token plus every appended switch token."""
    finished: bool
    start_mode: Mode
    end_mode: Mode
    difficulty: float | None = None
    """Prompt difficulty (0–100) from the probe, when a probe was used."""
    switched_at: int | None = None
    """Generated-token index at which the switch tokens were appended."""
    thinking_capped: bool = False
    """The thought was closed by ``max_thinking_tokens``, not by the model or the probe."""
    exited_at: int | None = None
    """Early exit: the generated-token index at which the rule closed the thought."""
    probe_tokens: int = 0
    """Early exit: tokens fed and generated in side branches (not part of ``tokens``)."""
    probe_answers: list[str | None] = field(default_factory=list)
    """Early exit: every side-branch answer, in order (None: not complete)."""
    checks: list[tuple[int, float]] = field(default_factory=list)
    prompt_feature: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    hidden_feature: torch.Tensor | None = None
    kv_trajectory: torch.Tensor | None = None
    """[T+1, 2*kv_heads*head_dim]: last prompt position, then every fed generated token (on vLLM a
    ``CoePath``, its running summary)."""
    kv_thought: list[bool] | None = None
    """Per generated trajectory point: inside an open thought (the token-axis thought/answer variants)."""
    kv_layer_sums: torch.Tensor | None = None
    """float64 [2 (thought, answer), 2 (K, V), layers, kv_heads*head_dim]: per-layer K and V summed over
    the generated tokens (the layer-axis KV-CoE variants, serve_app.core.kv_coe)."""
    kv_counts: tuple[int, int] | None = None
    """Generated tokens in the thought and in the answer (the divisors of ``kv_layer_sums``)."""
    hidden_trajectory: torch.Tensor | None = None
    """[layers+1, hidden]: hidden state per layer averaged over the generated tokens."""
    token_max_probs: list[float] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    token_entropies: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    recorded: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """(counted tokens so far, pooled feature of the last S cached positions), when recording."""
    coe_scores: dict[str, float] | None = None
    """Every KV-CoE variant's score, computed where the reply was generated (a reply fetched from a
    service by ``kvswitch calibrate/eval --url`` carries these instead of its trajectory)."""


class EngineStats(BaseModel):
    """One replica's load, as the pool's request router and the metrics read it."""

    queued: int = 0
    """Requests accepted but not yet decoding."""
    running: int = 0
    """Requests decoding."""
    predicted_tokens: float = 0.0
    """Predicted tokens still to generate for all of them."""


DTYPES = ("auto", "float32", "bfloat16", "float16")
"""A model's dtype on an engine: ``auto`` is the checkpoint's own (its config's ``dtype``)."""


def checkpoint_dtype(model_config, dtype: str = "auto") -> str:
    """``dtype`` with ``auto`` resolved to the checkpoint's dtype name (``float32`` when its config
    records none, as transformers loads it). vLLM's own ``auto`` would run a float32 checkpoint in
    half precision: kvswitch passes the resolved name to both engines."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    got = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or torch.float32
    name = str(got).removeprefix("torch.")
    return name if name in DTYPES else "float32"


class TokenSetup:
    """The token ids every engine derives from its tokenizer and mode prompts (one place for both engines)."""

    def __init__(self, tokenizer, prompts: ModePrompts | ThinkTags | None = None):
        """``prompts``: the mode prompts, or the think tags to derive them from the tokenizer's chat
        template with (``resolve_prompts``; None: the default tags)."""
        if not isinstance(prompts, ModePrompts):
            prompts = resolve_prompts(tokenizer, prompts or ThinkTags())
        self.tokenizer, self.prompts = tokenizer, prompts
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.prefix_ids = mode_prefix_ids(tokenizer, prompts)
        """Each mode's prefix, fed after the shared prompt (counted as prompt tokens)."""
        self.switch_ids = switch_ids(tokenizer, prompts)
        """Tokens appended when a reply switches *into* the given mode (counted as generated)."""


class Engine(Protocol):
    """One pool's model runtime. ``stream`` yields ``(new token ids, None)`` while the reply
    decodes, then ``([...], GenResult)`` once; closing the iterator cancels the request."""

    tokenizer: object
    prompts: ModePrompts
    probe: DifficultyScorer
    eos_id: int
    pad_id: int
    prefix_ids: dict[str, list[int]]

    async def features(self, prompts: Sequence[Sequence[int]], embedding: bool = False) -> list[dict[str, torch.Tensor]]: ...

    def stream(self, request: GenRequest, predicted_tokens: float = 0.0) -> AsyncIterator[tuple[list[int], GenResult | None]]: ...

    def stats(self) -> EngineStats: ...
