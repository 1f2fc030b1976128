"""Planning a request, as pure functions: (request, prompt length, difficulty, pool load, config)
→ ``Plan``. The router does the I/O around them (tokenising, the prefill call, metrics).

``admit`` checks the request against the service's limits before anything is computed; ``plan``
picks the pool (``core.policy.choose_pool``, docs/method.md §4) and the reply's budget; ``jobs``
turns a plan into one typed ``Job`` per choice."""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.config import AppConfig
from serve_app.core.early_exit import EarlyExit
from serve_app.core.policy import Decision, Mode, PoolLoad, choose_pool, expected_tokens
from serve_app.serving.errors import APIError
from serve_app.serving.messages import Job
from serve_app.serving.schemas import SamplingRequest


@dataclass(frozen=True)
class Admission:
    """A request that passed the limits."""

    forced: Mode | None
    """The mode the request (or the service's ``default_mode``) forces; None = the probe decides."""
    room: int
    """Tokens left for the reply once the prompt and the longest possible mode prefix are counted."""


@dataclass
class Plan:
    prompt_ids: list[int]
    decision: Decision
    difficulty: float | None
    online: bool
    max_tokens: int
    fallback: str | None = None
    """``prefill_unavailable`` when no difficulty arrived and ``fallback_mode`` was used."""
    deadline: float = 0.0
    """Loop time at which the generation is cancelled."""
    request_id: str = ""
    """The response id (``chatcmpl-…``/``cmpl-…``) the client sees and errors name."""
    max_thinking_tokens: int | None = None
    """The request's thinking cap, within the service's ``limits.max_thinking_tokens``."""
    early_exit: EarlyExit | None = None
    """A peer's early-exit rule (``kvswitch.online``: dynasor / deer), run by the generation pool."""


def max_prompt_tokens(cfg: AppConfig, context: int) -> int:
    return min(cfg.limits.max_prompt_tokens or context, context)


def check_target(body: SamplingRequest, cfg: AppConfig) -> None:
    """What needs no prompt: the served model and the number of choices (404 / 400)."""
    if body.model != cfg.model_name:
        raise APIError(404, f"model {body.model!r} does not exist; this service serves {cfg.model_name!r} (see GET /v1/models)",
                       param="model", code="model_not_found")
    if body.n > cfg.max_n:
        raise APIError(400, f"n must be ≤ {cfg.max_n}", param="n")
    if body.kvswitch.early_exit() is not None and cfg.pool("slow").engine != "hf":
        raise APIError(400, f"kvswitch.online={body.kvswitch.online!r} probes answers in side branches of the HF engine's cache; "
                            f"this service's slow pool runs on {cfg.pool('slow').engine}", param="kvswitch.online", code="unsupported_online_policy")


def admit(body: SamplingRequest, prompt_len: int, cfg: AppConfig, context: int, prefix_len: dict[str, int]) -> Admission:
    """Refuse (``APIError``, a 4xx) what the service cannot serve: another model, too many choices,
    a prompt or a prompt plus ``max_tokens`` beyond the limits."""
    check_target(body, cfg)
    max_prompt = max_prompt_tokens(cfg, context)
    if prompt_len > max_prompt:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this service takes at most {max_prompt}", param="messages",
                       code="context_length_exceeded")
    forced = body.forced_mode() or (None if cfg.default_mode == "auto" else cfg.default_mode)
    pools = [forced] if forced else ["fast", "slow"]
    limit = min(cfg.pool(p).max_tokens for p in pools)
    total = min(cfg.limits.max_total_tokens or context, context)
    room = total - prompt_len - max(prefix_len[p] for p in pools)
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens; prompt and reply together may have {total}", param="messages",
                       code="context_length_exceeded")
    if body.max_tokens is not None and body.max_tokens > limit:
        raise APIError(400, f"max_tokens must be ≤ {limit} for this request", param="max_tokens")
    if body.max_tokens is not None and body.max_tokens > room:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({body.max_tokens}) exceeds the "
                       f"{total} tokens a request may have", param="max_tokens", code="context_length_exceeded")
    return Admission(forced, room)


def predicted_tokens(pool: Mode, tau: float, cfg: AppConfig) -> float:
    """The prediction for a request sent to ``pool`` without a difficulty of its own (forced or fallback)."""
    return expected_tokens(tau if pool == "slow" else 0.0, pool, cfg.policy)


def plan(body: SamplingRequest, prompt_ids: list[int], admission: Admission, difficulty: float | None,
         load: dict[str, PoolLoad], tau: float, cfg: AppConfig, deadline: float = 0.0) -> Plan:
    """The pool, the reason and the reply budget. ``difficulty`` is None for a forced request and
    when the prefill pool gave none (then ``cfg.fallback_mode`` answers; online switching stays on,
    since the decode probe runs in the generation pool)."""
    fallback = None
    if admission.forced:
        decision = Decision(pool=admission.forced, reason="forced", predicted_tokens=predicted_tokens(admission.forced, tau, cfg))
    elif difficulty is None:
        fallback = "prefill_unavailable"
        decision = Decision(pool=cfg.fallback_mode, reason="prefill-unavailable",
                            predicted_tokens=predicted_tokens(cfg.fallback_mode, tau, cfg))
    else:
        decision = choose_pool(difficulty, tau, load["fast"], load["slow"], cfg.policy)
    # the decode probe runs in the generation pool, so a fallback request still switches online
    kv_online, early_exit = body.kvswitch.kv_online(), body.kvswitch.early_exit()
    online = kv_online if kv_online is not None else admission.forced is None and early_exit is None
    max_tokens = body.max_tokens or min(cfg.pool(decision.pool).max_tokens, admission.room)
    caps = [c for c in (body.thinking_cap(), cfg.limits.max_thinking_tokens) if c is not None]
    return Plan(prompt_ids, decision, difficulty, online, max_tokens, fallback, deadline, max_thinking_tokens=min(caps) if caps else None,
                early_exit=early_exit)


def jobs(plan: Plan, body: SamplingRequest) -> list[Job]:
    """One job per choice; choice i samples with ``seed + i`` when a seed is given."""
    return [Job(prompt_ids=plan.prompt_ids, max_tokens=plan.max_tokens, online=plan.online, temperature=body.temperature,
                top_p=body.top_p, seed=None if body.seed is None else body.seed + i, stop=list(body.stop or []),
                predicted_tokens=plan.decision.predicted_tokens, request_id=plan.request_id, max_thinking_tokens=plan.max_thinking_tokens,
                early_exit=plan.early_exit)
            for i in range(body.n)]
