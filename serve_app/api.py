"""The HTTP surface without Ray: the FastAPI app with OpenAI-style error handling, and the
builders of OpenAI response bodies and SSE chunks. ``deployments/router.py`` adds the routes."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve_app.schemas import KvswitchInfo, error_body


class APIError(Exception):
    """An error with its HTTP status; rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def create_app() -> FastAPI:
    app = FastAPI(title="kvswitch", description="OpenAI-compatible LLM service with KV-cache fast/slow routing", version="0.1.0")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    return app


# ------------------------------------------------------------------------------- response bodies


def info(final: dict, pool: str, reason: str, difficulty: float | None, predicted_tokens: float | None = None) -> dict:
    return KvswitchInfo(
        route=pool,
        reason=reason,
        difficulty=None if difficulty is None else round(float(difficulty), 2),
        start_mode=final["start_mode"],
        end_mode=final["end_mode"],
        switched=final["switched_at"] is not None,
        switched_at=final["switched_at"],
        confidence=final["confidence"],
        replica=final["replica"],
        predicted_tokens=None if predicted_tokens is None else round(float(predicted_tokens), 1),
    ).model_dump()


def rank_choices(outs: list[dict], infos: list[dict], rule: str, seed: int) -> tuple[list[dict], list[dict], dict]:
    """Best-of-n: the choice ``rule`` picks first, the others after it in sample order. Every
    choice's info gets its sample index and score; returns the reordered outs, infos and a summary."""
    from serve_app.bestofn import select
    from serve_app.task import extract_answer

    answers = [None if (a := extract_answer(o["content"])) is None else str(a) for o in outs]
    chosen, scores = select(answers, [o["confidence"] for o in outs], rule, seed=seed)
    finite = [s if math.isfinite(s) else None for s in scores]
    for i, info_ in enumerate(infos):
        info_["selection"] = {"rule": rule, "sample": i, "score": finite[i], "chosen": i == chosen}
    order = [chosen] + [i for i in range(len(outs)) if i != chosen]
    summary = {"rule": rule, "chosen_sample": chosen, "scores": finite, "confidences": [o["confidence"] for o in outs]}
    return [outs[i] for i in order], [infos[i] for i in order], summary


def usage(finals: list[dict]) -> dict:
    prompt = finals[0]["prompt_tokens"] if finals else 0
    completion = sum(f["completion_tokens"] for f in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": sum(f["reasoning_tokens"] for f in finals)},
    }


def chat_body(rid: str, created: int, model: str, outs: list[dict], infos: list[dict]) -> dict:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": o["content"], "reasoning_content": o["reasoning"] or None},
            "finish_reason": o["finish_reason"],
            "logprobs": None,
            "kvswitch": infos[i],
        }
        for i, o in enumerate(outs)
    ]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(outs), "kvswitch": infos[0]}


def completion_body(rid: str, created: int, model: str, outs: list[dict], infos: list[dict]) -> dict:
    choices = [
        {"index": i, "text": o["content"], "reasoning_content": o["reasoning"] or None, "finish_reason": o["finish_reason"],
         "logprobs": None, "kvswitch": infos[i]}
        for i, o in enumerate(outs)
    ]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(outs), "kvswitch": infos[0]}


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
