"""Router: the ingress. Tokenises, asks the prefill pool for the difficulty, picks the pool from
difficulty and live load (``serve_app.policy``), and relays the pool's reply as OpenAI JSON or SSE."""


import asyncio
import base64
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from serve_app.api import APIError, chat_body, chunk, completion_body, create_app, info, rank_choices, sse, usage
from serve_app.config import AppConfig
from serve_app.engine import encode_messages, mode_prefix_ids
from serve_app.policy import Decision, PoolLoad, choose_pool, expected_tokens
from serve_app.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, _Sampling, completion_id, now

from deployments.metrics import RouterMetrics

app = create_app()


@dataclass
class Plan:
    prompt_ids: list[int]
    decision: Decision
    difficulty: float | None
    online: bool
    max_tokens: int


def _overloaded(exc: Exception) -> APIError:
    return APIError(503, f"the service is at capacity, retry shortly ({type(exc).__name__})", "overloaded_error",
                    code="overloaded", headers={"Retry-After": "1"})


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, cfg: AppConfig, prefill: DeploymentHandle, fast: DeploymentHandle, slow: DeploymentHandle, tau: float, context_length: int):
        self.cfg, self.tau, self.context = cfg, tau, context_length
        self.prefill, self.pools = prefill, {"fast": fast, "slow": slow}
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
        self.prefix_len = {m: len(ids) for m, ids in mode_prefix_ids(self.tokenizer).items()}
        self.load = {"fast": PoolLoad(), "slow": PoolLoad()}
        self.metrics = RouterMetrics()

    # -------------------------------------------------------------------------------- planning
    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        return encode_messages(self.tokenizer, messages)

    async def _plan(self, body: _Sampling, messages: list[dict]) -> Plan:
        cfg = self.cfg
        if body.model != cfg.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this service serves {cfg.model_name!r} (see GET /v1/models)",
                           param="model", code="model_not_found")
        if body.n > cfg.max_n:
            raise APIError(400, f"n must be ≤ {cfg.max_n}", param="n")
        prompt_ids = self._prompt_ids(messages)
        forced = body.forced_mode() or (None if cfg.default_mode == "auto" else cfg.default_mode)
        pools = [forced] if forced else ["fast", "slow"]
        limit = min(cfg.pool(p).max_tokens for p in pools)
        room = self.context - len(prompt_ids) - max(self.prefix_len[p] for p in pools)
        if room <= 0:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context}", param="messages",
                           code="context_length_exceeded")
        if body.max_tokens is not None and body.max_tokens > limit:
            raise APIError(400, f"max_tokens must be ≤ {limit} for this request", param="max_tokens")
        if body.max_tokens is not None and body.max_tokens > room:
            raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({body.max_tokens}) exceeds the context "
                           f"({self.context})", param="max_tokens", code="context_length_exceeded")
        if forced:
            decision = Decision(pool=forced, reason="forced", predicted_tokens=expected_tokens(self.tau if forced == "slow" else 0.0, forced, cfg.policy))
            difficulty = None
        else:
            try:
                difficulty = float(await self.prefill.score.remote(prompt_ids))
            except (BackPressureError, DeploymentUnavailableError) as exc:
                raise _overloaded(exc) from exc
            self.metrics.difficulty.observe(difficulty)
            decision = choose_pool(difficulty, self.tau, self.load["fast"], self.load["slow"], cfg.policy)
        online = body.kvswitch.online if body.kvswitch.online is not None else forced is None
        max_tokens = body.max_tokens or min(cfg.pool(decision.pool).max_tokens, room)
        self.metrics.requests.inc(tags={"route": decision.pool, "reason": decision.reason})
        return Plan(prompt_ids, decision, difficulty, online, max_tokens)

    def _jobs(self, plan: Plan, body: _Sampling) -> list[dict]:
        jobs = []
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            jobs.append({"prompt_ids": plan.prompt_ids, "online": plan.online, "max_tokens": plan.max_tokens, "temperature": body.temperature,
                         "top_p": body.top_p, "seed": seed, "stop": body.stop, "predicted_tokens": plan.decision.predicted_tokens})
        return jobs

    # ------------------------------------------------------------------------------ load view
    def _start(self, plan: Plan, n: int) -> None:
        load = self.load[plan.decision.pool]
        load.running += n
        load.predicted_tokens += n * plan.decision.predicted_tokens
        self.metrics.inflight.set(load.running, tags={"route": plan.decision.pool})

    def _end(self, plan: Plan, finals: list[dict], n: int) -> None:
        pool = plan.decision.pool
        load = self.load[pool]
        load.running -= n
        load.predicted_tokens = max(load.predicted_tokens - n * plan.decision.predicted_tokens, 0.0)
        self.metrics.inflight.set(load.running, tags={"route": pool})
        for f in finals:
            self.metrics.tokens.inc(f["completion_tokens"], tags={"route": pool})
            slow_cost = expected_tokens(plan.difficulty if plan.difficulty is not None else self.tau, "slow", self.cfg.policy)
            if pool == "fast" or f["end_mode"] == "fast":
                self.metrics.saved.inc(max(slow_cost - f["completion_tokens"], 0.0))
            if f["switched_at"] is not None:
                self.metrics.switches.inc(tags={"direction": f"{f['start_mode']}->{f['end_mode']}"})

    # ---------------------------------------------------------------------------- generation
    async def _complete(self, plan: Plan, body: _Sampling) -> list[dict]:
        handle = self.pools[plan.decision.pool]
        n = body.n
        self._start(plan, n)
        outs: list[dict] = []
        try:
            outs = await asyncio.gather(*(handle.generate.remote(job) for job in self._jobs(plan, body)))
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise _overloaded(exc) from exc
        finally:
            self._end(plan, outs, n)
        return outs

    async def _stream(self, plan: Plan, body: _Sampling, kind: str) -> StreamingResponse:
        handle = self.pools[plan.decision.pool].options(stream=True)
        gens = [handle.generate_stream.remote(job) for job in self._jobs(plan, body)]
        self._start(plan, body.n)
        firsts = []
        try:  # the first item surfaces a full queue as a proper 503 before any byte is sent
            for g in gens:
                firsts.append(await g.__anext__())
        except (BackPressureError, DeploymentUnavailableError) as exc:
            for g in gens:
                g.cancel()
            self._end(plan, [], body.n)
            raise _overloaded(exc) from exc
        rid, created, model = completion_id("chatcmpl" if kind == "chat" else "cmpl"), now(), self.cfg.model_name
        return StreamingResponse(self._sse(plan, body, kind, gens, firsts, rid, created, model), media_type="text/event-stream")

    async def _sse(self, plan: Plan, body: _Sampling, kind: str, gens, firsts, rid, created, model) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen, first) -> None:
            try:
                await queue.put((i, first))
                async for item in gen:
                    await queue.put((i, item))
            except Exception as exc:  # noqa: BLE001 — reported to the client as an error event
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, g, f)) for i, (g, f) in enumerate(zip(gens, firsts))]
        finals: dict[int, dict] = {}
        try:
            if kind == "chat":
                for i in range(len(gens)):
                    yield sse(chunk(rid, created, model, kind, i, delta={"role": "assistant", "content": ""}))
            while len(finals) < len(gens):
                i, item = await queue.get()
                if isinstance(item, Exception):
                    yield sse({"error": {"message": f"generation failed: {item}", "type": "server_error", "param": None, "code": None}})
                    return
                if item.get("done"):
                    finals[i] = item
                    kv = info(item, plan.decision.pool, plan.decision.reason, plan.difficulty, plan.decision.predicted_tokens)
                    yield sse(chunk(rid, created, model, kind, i, finish_reason=item["finish_reason"], extra={"kvswitch": kv}))
                    continue
                delta = {}
                if item["reasoning"]:
                    delta["reasoning_content"] = item["reasoning"]
                if item["content"]:
                    delta["content"] = item["content"]
                yield sse(chunk(rid, created, model, kind, i, delta=delta, text=item["content"]))
            if body.stream_options and body.stream_options.include_usage:
                ordered = [finals[i] for i in sorted(finals)]
                yield sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created,
                           "model": model, "choices": [], "usage": usage(ordered)})
            yield sse("[DONE]")
        finally:  # also on client disconnect: cancel the generations so their slots free up
            for t in tasks:
                t.cancel()
            for g in gens:
                g.cancel()
            self._end(plan, list(finals.values()), len(gens))

    async def _serve(self, body: _Sampling, messages: list[dict], kind: str):
        plan = await self._plan(body, messages)
        if body.stream:
            return await self._stream(plan, body, kind)
        outs = await self._complete(plan, body)
        infos = [info(o, plan.decision.pool, plan.decision.reason, plan.difficulty, plan.decision.predicted_tokens) for o in outs]
        selection = None
        if body.kvswitch.select is not None and len(outs) > 1:
            outs, infos, selection = rank_choices(outs, infos, body.kvswitch.select, seed=body.seed or 0)
        build = chat_body if kind == "chat" else completion_body
        out = build(completion_id("chatcmpl" if kind == "chat" else "cmpl"), now(), self.cfg.model_name, outs, infos)
        if selection is not None:
            out["kvswitch"] = {**out["kvswitch"], "selection": selection}
        return JSONResponse(out)

    # -------------------------------------------------------------------------------- routes
    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        return await self._serve(body, messages, "chat")

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        return await self._serve(body, [{"role": "user", "content": body.prompt}], "completion")

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest):
        if body.model != self.cfg.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this service serves {self.cfg.model_name!r}", param="model",
                           code="model_not_found")
        prompts = [self._prompt_ids([{"role": "user", "content": t}]) for t in body.input]
        if max(len(p) for p in prompts) > self.context:
            raise APIError(400, f"an input is longer than the context ({self.context} tokens)", param="input", code="context_length_exceeded")
        try:
            vectors = await self.prefill.embed.remote(prompts)
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise _overloaded(exc) from exc
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        tokens = sum(len(p) for p in prompts)
        return {"object": "list", "model": self.cfg.model_name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "kvswitch",
                                            "max_model_len": self.context}]}

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}
