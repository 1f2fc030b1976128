"""Typed messages between the deployments (router -> pool -> router). Plain dataclasses: Ray
pickles them, and the pool's request router reads ``Job.predicted_tokens`` as a field."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.core.early_exit import EarlyExit
from serve_app.core.policy import Mode


@dataclass(frozen=True)
class Job:
    """One choice to generate, as the router hands it to a generation pool."""

    prompt_ids: list[int]
    """The shared prompt (``core.prompts.encode_messages``): the pool adds its own mode prefix."""
    max_tokens: int
    online: bool = False
    """Two-step switching on the decode probe (docs/method.md §5)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    predicted_tokens: float = 0.0
    """The router's prediction of this job's generated tokens (what the request router balances)."""
    request_id: str = ""
    """The response id the client sees; errors name it, logs carry it."""
    max_thinking_tokens: int | None = None
    """Hard cap on the tokens of an open thought (``GenRequest.max_thinking_tokens``)."""
    resume: tuple[tuple[int, ...], ...] = ()
    """Continue a reply another replica started: the token ids of every ``Delta`` it streamed, in order."""
    early_exit: EarlyExit | None = None
    """A peer's early-exit rule (``GenRequest.early_exit``)."""


@dataclass(frozen=True)
class Delta:
    """Text a streamed reply adds: inside the thought (``reasoning``) and after it (``content``)."""

    reasoning: str
    content: str
    token_ids: tuple[int, ...] = ()
    """The generated token ids this delta covers (text may trail them by a few held-back characters).
    The router keeps them so that a reply whose replica dies can be resumed on another one."""


@dataclass
class Final:
    """How one generated choice ended (the pool's last streamed item)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    start_mode: Mode
    end_mode: Mode
    switched_at: int | None
    confidence: float | None
    replica: str | None
    retried: bool = False
    """Set by the router: the first replica failed and another generated the choice."""
    thinking_capped: bool = False
    """``max_thinking_tokens`` closed the thought."""
    resumed: bool = False
    """The replica streaming this choice died mid-stream and another one continued it (``Job.resume``)."""
    exited_at: int | None = None
    """An early-exit rule closed the thought at this generated-token index."""
    probe_tokens: int = 0
    """Tokens of the early-exit rule's side-branch probes."""


@dataclass
class Reply:
    """A whole, non-streamed choice."""

    reasoning: str
    content: str
    final: Final
