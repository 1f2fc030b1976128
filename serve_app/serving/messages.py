"""Typed messages between the deployments (router -> pool -> router). Plain dataclasses: Ray
pickles them, and the pool's request router reads ``Job.predicted_tokens`` as a field."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Delta:
    """Text a streamed reply adds: inside the thought (``reasoning``) and after it (``content``)."""

    reasoning: str
    content: str


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


@dataclass
class Reply:
    """A whole, non-streamed choice."""

    reasoning: str
    content: str
    final: Final
