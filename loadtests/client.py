"""One streamed chat completion against any OpenAI-compatible server, timed chunk by chunk.

The request is a plain OpenAI body. A forced mode is sent as
``chat_template_kwargs.enable_thinking`` (what vLLM and SGLang pass to Qwen3's chat template,
and what kvswitch honours), so ``--compare`` also works against a plain vLLM server; ``auto``
sends nothing extra and lets kvswitch route. Usage comes from ``stream_options.include_usage``;
a server that does not send it gets its tokens counted as text-bearing chunks
(``tokens_from_usage`` is then False). The ``kvswitch`` object of the final chunk is optional.
"""

from __future__ import annotations

import json
import time

import httpx

from loadtests.stats import RequestRecord
from serve_app.core.early_exit import EXIT_KINDS, parse_exit
from serve_app.core.grading import GRADERS, get_grader
from serve_app.core.task import extract_answer

MODES = ("auto", "fast", "slow")
PEER_MODES = "budget:B (thinking budget), dynasor[:K[,W]] and deer[:LAMBDA] (early exit, kvswitch only)"


def check_mode(mode: str) -> str:
    """``mode`` if it is a routing mode or a peer policy the service runs, else a ``ValueError``."""
    kind, _, arg = mode.partition(":")
    if mode in MODES:
        return mode
    if kind == "budget" and arg.isdigit() and int(arg) >= 0:
        return mode
    if kind in EXIT_KINDS:
        parse_exit(mode)
        return mode
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)} or {PEER_MODES}")


def request_body(model: str, question: str, mode: str, max_tokens: int | None, temperature: float = 0.0) -> dict:
    """A forced mode as ``enable_thinking``; ``budget:B`` as slow with vLLM's ``thinking_token_budget``
    (kvswitch reads it too); ``dynasor`` / ``deer`` as slow with ``kvswitch.online`` set to the rule."""
    check_mode(mode)
    kind, _, arg = mode.partition(":")
    body: dict = {"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
                  "stream_options": {"include_usage": True}, "temperature": temperature}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if mode != "auto":
        body["chat_template_kwargs"] = {"enable_thinking": mode != "fast"}
    if kind == "budget":
        body["thinking_token_budget"] = int(arg)
    elif kind in EXIT_KINDS:
        body["kvswitch"] = {"online": mode}
    return body


def grade(content: str, answer: str, grader: str = "number") -> bool:
    """With the ``number`` grader (the default): integer answers (the arithmetic task) by the
    task's rule, the last integer after the last ``</think>``; other answers by case-insensitive
    containment in the reply's answer part. Any other grader of ``serve_app.core.grading``
    (``math``, ``choice``, ``exact``) grades by its own ``correct``."""
    if grader != "number":
        return get_grader(grader).correct(content, answer)
    try:
        reference = int(str(answer).strip())
    except ValueError:
        text = content.rsplit("</think>", 1)[-1]
        return str(answer).strip().lower() in text.lower()
    return extract_answer(content) == reference


def add_data_arguments(p) -> None:
    """``--question-field``, ``--answer-field`` and ``--grader`` of the load-test commands."""
    p.add_argument("--question-field", dest="question_field", help="the data set's question column (default: detected, docs/data.md)")
    p.add_argument("--answer-field", dest="answer_field", help="the data set's answer column (default: detected, docs/data.md)")
    p.add_argument("--grader", choices=list(GRADERS), help="how replies are graded (default number: see loadtests.client.grade)")


def _error_message(body: bytes) -> str:
    return _error(body)[0]


def _error(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, error.type, error.code) of an error body; type and code are None unless it is an
    OpenAI-style JSON error."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode(errors="replace"), None, None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            code = err.get("code")
            return str(err.get("message", err))[:300], err.get("type"), None if code is None else str(code)
        return str(err)[:300], None, None
    return str(data)[:300], None, None


def _fail(rec: RequestRecord, status: str, body: bytes) -> RequestRecord:
    rec.status = status
    rec.error, rec.error_type, rec.error_code = _error(body)
    return rec


async def send(client: httpx.AsyncClient, url: str, body: dict, rec: RequestRecord, timeout: float, grader: str = "number") -> RequestRecord:
    """POST ``body`` (streamed) to ``{url}/v1/chat/completions`` and fill ``rec`` in place, the
    reply graded by ``grader`` (``grade``). Never raises for a failed request: the failure is the
    record's ``status``."""
    start = time.perf_counter()
    content, reasoning_chunks = [], 0
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                return _fail(rec, str(resp.status_code), await resp.aread())
            async for line in resp.aiter_lines():
                if time.perf_counter() - start > timeout:
                    raise httpx.ReadTimeout("the request ran past its timeout")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return _fail(rec, "stream_error", data.encode())
                usage = event.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens")
                    rec.completion_tokens = usage.get("completion_tokens")
                    details = usage.get("completion_tokens_details") or {}
                    rec.reasoning_tokens = details.get("reasoning_tokens")
                    rec.tokens_from_usage = rec.completion_tokens is not None
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or ""
                    thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    if text or thought:
                        now = time.perf_counter() - start
                        if rec.ttft is None:
                            rec.ttft = now
                        rec.chunk_times.append(now)
                        content.append(text)
                        reasoning_chunks += bool(thought)
                    if choice.get("finish_reason"):
                        rec.finish_reason = choice["finish_reason"]
                    info = choice.get("kvswitch")
                    if isinstance(info, dict):
                        _take_kvswitch(rec, info)
    except (httpx.TransportError, TimeoutError) as exc:
        return _transport_failure(rec, exc, timeout)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        rec.status, rec.error = "bad_response", f"{type(exc).__name__}: {exc}"[:300]
        return rec
    rec.e2e = time.perf_counter() - start
    if not done and rec.finish_reason is None:  # some servers (transformers serve) end after finish_reason, without [DONE]
        rec.status, rec.error = "bad_response", "the stream ended without a finish_reason or [DONE]"
        return rec
    rec.content = "".join(content)
    if rec.completion_tokens is None:  # no usage from the server: one token per text-bearing chunk
        rec.completion_tokens = len(rec.chunk_times)
        rec.reasoning_tokens = reasoning_chunks or None
    rec.correct = grade(rec.content, rec.answer, grader)
    return rec


def _transport_failure(rec: RequestRecord, exc: BaseException, timeout: float) -> RequestRecord:
    """A request that got no (complete) answer: ``timeout``, or ``connection`` for any other
    transport failure (refused, reset, cut off)."""
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        rec.status, rec.error = "timeout", f"no complete reply within {timeout:g} s"
    else:
        rec.status, rec.error = "connection", f"{type(exc).__name__}: {exc}"[:300]
    return rec


async def send_plain(client: httpx.AsyncClient, url: str, body: dict, rec: RequestRecord, timeout: float,
                     grader: str = "number") -> RequestRecord:
    """A non-streamed ``body`` (``stream: false``), recorded like ``send`` records a streamed one
    (no TTFT or chunk times). Never raises for a failed request."""
    start = time.perf_counter()
    try:
        resp = await client.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
    except (httpx.TransportError, TimeoutError) as exc:
        return _transport_failure(rec, exc, timeout)
    rec.e2e = time.perf_counter() - start
    if resp.status_code != 200:
        return _fail(rec, str(resp.status_code), resp.content)
    try:
        data = resp.json()
        choice = data["choices"][0]
        rec.content = choice["message"]["content"] or ""
        rec.finish_reason = choice.get("finish_reason")
        rec.completion_tokens = data["usage"]["completion_tokens"]
        if isinstance(data.get("kvswitch"), dict):
            _take_kvswitch(rec, data["kvswitch"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        rec.status, rec.error = "bad_response", f"{type(exc).__name__}: {exc}"[:300]
        return rec
    rec.correct = grade(rec.content, rec.answer, grader)
    return rec


def _take_kvswitch(rec: RequestRecord, info: dict) -> None:
    rec.route = info.get("route")
    rec.reason = info.get("reason")
    rec.difficulty = info.get("difficulty")
    rec.switched = info.get("switched")
    rec.end_mode = info.get("end_mode")
    rec.replica = info.get("replica")
    rec.predicted_tokens = info.get("predicted_tokens")
    rec.confidence = info.get("confidence")
    rec.retried = info.get("retried")
    rec.resumed = info.get("resumed")
    rec.fallback = info.get("fallback")
    rec.exited_at = info.get("exited_at")
    rec.probe_tokens = info.get("probe_tokens")


async def discover_model(client: httpx.AsyncClient, url: str) -> str:
    """The first model id ``GET /v1/models`` lists."""
    try:
        resp = await client.get(f"{url}/v1/models", timeout=30)
    except httpx.TransportError as exc:
        raise RuntimeError(f"cannot reach {url} ({type(exc).__name__}: {exc}); is the service running? (make serve, or --launch)") from exc
    if resp.status_code != 200:
        raise RuntimeError(f"GET {url}/v1/models answered {resp.status_code}: {_error_message(resp.content)}; pass --model")
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{url}/v1/models lists no model; pass --model")
    return data[0]["id"]
