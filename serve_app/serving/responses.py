"""OpenAI response bodies, SSE chunks and the ``kvswitch`` object, from the typed messages."""

from __future__ import annotations

import json
import math
from typing import Any

from serve_app.core.bestofn import select
from serve_app.core.grading import Grader, get_grader
from serve_app.serving.messages import Final, Reply
from serve_app.serving.plan import Plan
from serve_app.serving.schemas import KvswitchInfo


def info(final: Final, plan: Plan) -> dict:
    """The ``kvswitch`` object of one choice: how it was routed (``plan``) and how it ended."""
    return KvswitchInfo(
        route=plan.decision.pool,
        reason=plan.decision.reason,
        difficulty=None if plan.difficulty is None else round(float(plan.difficulty), 2),
        start_mode=final.start_mode,
        end_mode=final.end_mode,
        switched=final.switched_at is not None,
        switched_at=final.switched_at,
        confidence=final.confidence,
        replica=final.replica,
        predicted_tokens=round(float(plan.decision.predicted_tokens), 1),
        fallback=plan.fallback,
        retried=final.retried,
        resumed=final.resumed,
        thinking_capped=final.thinking_capped,
        early_exit=None if plan.early_exit is None else plan.early_exit.label,
        exited_at=final.exited_at,
        probe_tokens=final.probe_tokens,
    ).model_dump()


def rank_choices(outs: list[Reply], infos: list[dict], rule: str, seed: int,
                 grader: Grader | None = None) -> tuple[list[Reply], list[dict], dict]:
    """Best-of-n: the choice ``rule`` picks first, the others after it in sample order. Every
    choice's info gets its sample index and score; returns the reordered outs, infos and a summary.
    Votes count the final answers ``grader`` reads (default ``number``, the arithmetic task's)."""
    grader = grader or get_grader()
    answers = [grader.extract(o.content) for o in outs]
    chosen, scores = select(answers, [o.final.confidence for o in outs], rule, seed=seed)
    finite = [s if math.isfinite(s) else None for s in scores]
    for i, info_ in enumerate(infos):
        info_["selection"] = {"rule": rule, "sample": i, "score": finite[i], "chosen": i == chosen}
    order = [chosen] + [i for i in range(len(outs)) if i != chosen]
    summary = {"rule": rule, "chosen_sample": chosen, "scores": finite, "confidences": [o.final.confidence for o in outs]}
    return [outs[i] for i in order], [infos[i] for i in order], summary


def usage(finals: list[Final]) -> dict:
    prompt = finals[0].prompt_tokens if finals else 0
    completion = sum(f.completion_tokens for f in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": sum(f.reasoning_tokens for f in finals)},
    }


def chat_body(rid: str, created: int, model: str, outs: list[Reply], infos: list[dict]) -> dict:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": o.content, "reasoning_content": o.reasoning or None},
            "finish_reason": o.final.finish_reason,
            "logprobs": None,
            "kvswitch": infos[i],
        }
        for i, o in enumerate(outs)
    ]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage([o.final for o in outs]), "kvswitch": infos[0]}


def completion_body(rid: str, created: int, model: str, outs: list[Reply], infos: list[dict]) -> dict:
    choices = [
        {"index": i, "text": o.content, "reasoning_content": o.reasoning or None, "finish_reason": o.final.finish_reason,
         "logprobs": None, "kvswitch": infos[i]}
        for i, o in enumerate(outs)
    ]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage([o.final for o in outs]), "kvswitch": infos[0]}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chunk(rid: str, created: int, model: str, kind: str, index: int, delta: dict | None = None, text: str | None = None,
          finish_reason: str | None = None, extra: dict | None = None) -> dict:
    """One streamed choice update: ``chat.completion.chunk`` (delta) or ``text_completion`` (text)."""
    if kind == "chat":
        choice = {"index": index, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        if delta and delta.get("reasoning_content"):
            choice["reasoning_content"] = delta["reasoning_content"]
        obj = "text_completion"
    if extra:
        choice.update(extra)
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
