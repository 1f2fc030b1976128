"""Router: the ingress. Tokenises, asks the prefill pool for the difficulty, picks the pool from
difficulty and live load (``serve_app.core.policy``), and relays the pool's reply as OpenAI JSON or SSE.

Faults: a request whose replica dies before it streamed anything is retried once on another
replica; a stream whose replica dies mid-reply is resumed on another one from the tokens already
sent (``resume_streams``). Otherwise it ends with a clear error (a JSON 503, or an SSE error event),
never a hang or a silently truncated reply. Without a difficulty from the prefill pool (down, overloaded, slow),
requests go to ``fallback_mode`` with ``kvswitch.fallback`` set. Every generation is cancelled at
``limits.request_timeout_s``."""


import asyncio
import base64
import logging
from dataclasses import replace
from typing import AsyncIterator

import numpy as np
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from deployments.admin import REPLICA_FAILURES, AdminRoutes, app
from deployments.metrics import RouterMetrics
from deployments.router_loads import RouterLoads
from serve_app.config import AppConfig
from serve_app.core.grading import get_grader
from serve_app.core.prompts import encode_messages, mode_prefix_ids, resolve_prompts
from serve_app.engines.base import GenerationError
from serve_app.serving.api import api_keys, check_exposure
from serve_app.serving.errors import APIError, generation_failed, overloaded, replica_failed, timed_out
from serve_app.serving.lease import LeasedStreamingResponse
from serve_app.serving.messages import Delta, Final, Job, Reply
from serve_app.serving.plan import Plan, admit, check_target, jobs, max_prompt_tokens, plan
from serve_app.serving.responses import chat_body, chunk, completion_body, info, rank_choices, sse, usage
from serve_app.serving.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingRequest, completion_id, now

logger = logging.getLogger("ray.serve")


MAX_RESUMES = 2
"""How often one streamed choice may move to another replica after its replica died."""

STREAM_BUFFER = 64
"""Items buffered per streamed reply between the pools and the client; a slow client holds the
pools' streams back (back-pressure) instead of growing the router's memory."""


def _serve_http_host() -> str | None:
    """The interface Serve's HTTP proxy listens on; None when it cannot be determined (then
    ``check_exposure`` refuses to start without API keys)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception as exc:  # noqa: BLE001 — fail closed: check_exposure decides what None means
        logger.warning("could not determine Serve's HTTP host (%s: %s)", type(exc).__name__, exc)
        return None


@serve.deployment
@serve.ingress(app)
class Router(AdminRoutes):
    def __init__(self, cfg: AppConfig, prefill: DeploymentHandle, fast: DeploymentHandle, slow: DeploymentHandle, tau: float, context_length: int,
                 board: DeploymentHandle | None = None):
        self.cfg, self.tau, self.context = cfg, tau, context_length
        self.prefill, self.pools = prefill, {"fast": fast, "slow": slow}
        self.grader = get_grader(cfg.grader)  # reads the answers `select: vote` counts
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
        self.prompts = resolve_prompts(self.tokenizer, cfg.think_tags)  # the pools' own (same template, same tags)
        self.prefix_len = {m: len(ids) for m, ids in mode_prefix_ids(self.tokenizer, self.prompts).items()}
        self.metrics = RouterMetrics()
        self.loads = RouterLoads(cfg, tau, board, serve.get_replica_context().replica_id.unique_id, self.metrics)
        guard = app.state.guard
        guard.max_body_bytes = cfg.limits.max_body_bytes
        guard.set_keys(api_keys(cfg))
        guard.on_error = lambda status: self.metrics.errors.inc(tags={"status": str(status)})
        check_exposure(cfg, guard.auth_enabled, _serve_http_host())
        logger.info("kvswitch router: %s; fast prefix %r", "no thinking switch in the chat template (fast = a prefilled empty thought)"
                    if self.prompts.always_thinks else "the chat template's thinking switch", self.prompts.fast_prefix)
        logger.info("kvswitch router: API keys %s", f"required ({len(guard.key_digests)} configured)" if guard.auth_enabled else "off")

    # -------------------------------------------------------------------------------- planning
    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        return encode_messages(self.tokenizer, messages, self.prompts)

    async def _plan(self, body: SamplingRequest, messages: list[dict], kind: str) -> Plan:
        """Admit the request, ask the prefill pool for the difficulty unless the mode is forced, and plan."""
        deadline = asyncio.get_running_loop().time() + self.cfg.limits.request_timeout_s
        check_target(body, self.cfg)  # before tokenising: a wrong model or n is refused whatever the messages
        prompt_ids = await asyncio.to_thread(self._prompt_ids, messages)  # CPU work off the event loop
        admission = admit(body, len(prompt_ids), self.cfg, self.context, self.prefix_len)
        difficulty = None if admission.forced else await self._difficulty(prompt_ids)
        if difficulty is not None:
            self.metrics.difficulty.observe(difficulty)
        p = plan(body, prompt_ids, admission, difficulty, self.loads.view(), self.tau, self.cfg, deadline)
        p.request_id = completion_id("chatcmpl" if kind == "chat" else "cmpl")
        self.metrics.requests.inc(tags={"route": p.decision.pool, "reason": p.decision.reason})
        return p

    async def _retrying(self, what: str, start, first):
        """``start()`` → a DeploymentResponse (or response generator), ``first(it)`` → what to await
        from it (the result, or the first streamed item). When the replica dies before that arrives
        (nothing has reached the client yet), start once more on another replica. Returns (it, that,
        retried); a second failure, or the first with retries off, raises the replica's error."""
        for attempt in (0, 1):
            it = start()
            try:
                return it, await first(it), attempt > 0
            except REPLICA_FAILURES as exc:
                it.cancel()
                if attempt or not self.cfg.retry_on_replica_failure:
                    raise
                self.metrics.retries.inc(tags={"target": what})
                logger.warning("%s replica failed (%s); retrying once on another replica", what, type(exc).__name__)
            except BaseException:
                it.cancel()
                raise
        raise AssertionError("unreachable")

    async def _call(self, what: str, call, timeout: float):
        """``call()`` → a DeploymentResponse, awaited within ``timeout`` and retried once (a prefill
        or embedding call has no partial output to lose)."""
        async with asyncio.timeout(timeout):
            return (await self._retrying(what, call, lambda resp: resp))[1]

    async def _pool_call(self, what: str, call):
        """``_call`` within the request timeout, its failures as the API's errors (503 overloaded or
        replica failed, 504 timeout, 500 generation failed): embeddings and the admin endpoints."""
        limits = self.cfg.limits
        try:
            return await self._call(what, call, limits.request_timeout_s)
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise overloaded(exc) from exc
        except TimeoutError as exc:
            raise timed_out(limits.request_timeout_s) from exc
        except REPLICA_FAILURES as exc:
            raise replica_failed(what, exc, retried=self.cfg.retry_on_replica_failure) from exc
        except GenerationError as exc:
            raise generation_failed(exc.request_id) from exc

    async def _difficulty(self, prompt_ids: list[int]) -> float | None:
        """The prefill pool's difficulty, or None when it cannot give one in time (then the request
        is routed by ``fallback_mode``)."""
        try:
            return float(await self._call("prefill", lambda: self.prefill.score.remote(prompt_ids), self.cfg.limits.prefill_timeout_s))
        except (TimeoutError, BackPressureError, DeploymentUnavailableError, *REPLICA_FAILURES) as exc:
            cause = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            self.metrics.fallbacks.inc(tags={"cause": cause})
            logger.warning("prefill pool gave no difficulty (%s); routing to %s", cause, self.cfg.fallback_mode)
            return None

    # ---------------------------------------------------------------------------- generation
    async def _generate(self, plan: Plan, job: Job) -> Reply:
        """One whole reply; retried once on another replica if the first one dies (the client has
        received nothing yet)."""
        pool = plan.decision.pool
        try:
            _, out, retried = await self._retrying(pool, lambda: self.pools[pool].generate.remote(job), lambda resp: resp)
        except REPLICA_FAILURES as exc:
            raise replica_failed(pool, exc, retried=self.cfg.retry_on_replica_failure) from exc
        out.final.retried = retried
        return out

    async def _complete(self, plan: Plan, body: SamplingRequest) -> list[Reply]:
        lease = self.loads.start(plan, body.n)
        outs: list[Reply] = []
        tasks = [asyncio.create_task(self._generate(plan, job)) for job in jobs(plan, body)]
        try:
            async with asyncio.timeout_at(plan.deadline):
                outs = await asyncio.gather(*tasks)
        except TimeoutError as exc:
            self.metrics.timeouts.inc()
            raise timed_out(self.cfg.limits.request_timeout_s) from exc
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise overloaded(exc) from exc
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 — the client gets the request id, the log the details
            raise self._failed(plan, exc) from exc
        finally:
            for t in tasks:  # one choice failed or the client left: stop the others too
                t.cancel()
            lease.release([o.final for o in outs])
        return outs

    def _failed(self, plan: Plan, exc: BaseException) -> APIError:
        logger.error("request %s: generation failed: %r", plan.request_id, exc)
        return generation_failed(plan.request_id)

    async def _open(self, plan: Plan, job: Job):
        """Start one streamed choice and wait for its first item; a replica that dies before it sends
        anything is replaced by a retry on another replica. Returns (stream, first item, retried)."""
        pool = plan.decision.pool
        handle = self.pools[pool].options(stream=True)
        try:
            return await self._retrying(pool, lambda: handle.generate_stream.remote(job), lambda gen: gen.__anext__())
        except REPLICA_FAILURES as exc:
            raise replica_failed(pool, exc, retried=self.cfg.retry_on_replica_failure) from exc

    async def _stream(self, plan: Plan, body: SamplingRequest, kind: str) -> LeasedStreamingResponse:
        lease = self.loads.start(plan, body.n)
        job_list = jobs(plan, body)
        tasks = [asyncio.create_task(self._open(plan, job)) for job in job_list]
        try:  # the first items surface a full queue or a dead replica as a proper 503 before any byte is sent
            async with asyncio.timeout_at(plan.deadline):
                opened = await asyncio.gather(*tasks)
        except BaseException as exc:
            for t in tasks:
                t.cancel()
            for t in tasks:  # streams that did open are cancelled too
                if t.done() and not t.cancelled() and t.exception() is None:
                    t.result()[0].cancel()
            lease.release()
            if isinstance(exc, TimeoutError):
                self.metrics.timeouts.inc()
                raise timed_out(self.cfg.limits.request_timeout_s) from exc
            if isinstance(exc, (BackPressureError, DeploymentUnavailableError)):
                raise overloaded(exc) from exc
            if isinstance(exc, Exception) and not isinstance(exc, APIError):
                raise self._failed(plan, exc) from exc
            raise
        gens, firsts, retried = (list(x) for x in zip(*opened))
        finals: dict[int, Final] = {}
        pumps: list[asyncio.Task] = []

        def close() -> None:  # when the body ends, the client leaves (even before the first byte), or it is never sent
            if lease.released:
                return
            for t in pumps:
                t.cancel()
            for g in gens:
                g.cancel()
            lease.release(list(finals.values()))

        sse_body = self._sse(plan, body, kind, job_list, gens, firsts, retried, finals, pumps, close)
        return LeasedStreamingResponse(sse_body, close, media_type="text/event-stream", headers=self._headers(plan))

    @staticmethod
    def _headers(plan: Plan) -> dict[str, str]:
        return {"x-kvswitch-route": plan.decision.pool}

    def _error_event(self, plan: Plan, exc: BaseException) -> dict:
        self.metrics.errors.inc(tags={"status": "stream"})  # the reply had started (200): an SSE error event
        if isinstance(exc, TimeoutError):
            self.metrics.timeouts.inc()
            message, type_, code = (f"the reply did not finish within the service's {self.cfg.limits.request_timeout_s:g} s timeout; "
                                    "generation was cancelled and the reply is incomplete", "timeout_error", "request_timeout")
        elif isinstance(exc, REPLICA_FAILURES):
            message, type_, code = (f"the {plan.decision.pool} replica generating this reply failed after it had started streaming "
                                    f"({type(exc).__name__}); the reply is incomplete", "server_error", "replica_failed")
        else:
            err = self._failed(plan, exc)
            message, type_, code = f"{err.message}; the reply is incomplete", err.type, err.code
        return {"error": {"message": message, "type": type_, "param": None, "code": code}}

    async def _resume(self, plan: Plan, job: Job, chunks: list[tuple[int, ...]], exc: BaseException):
        """A new stream continuing ``job`` after the token chunks already streamed (its replica died)."""
        pool = plan.decision.pool
        self.metrics.retries.inc(tags={"target": f"{pool}-resume"})
        logger.warning("request %s: %s replica died mid-stream (%s); resuming after %d tokens on another replica", plan.request_id, pool,
                       type(exc).__name__, sum(len(c) for c in chunks))
        handle = self.pools[pool].options(stream=True)
        resumed = replace(job, resume=tuple(chunks))
        gen, first, _ = await self._retrying(pool, lambda: handle.generate_stream.remote(resumed), lambda g: g.__anext__())
        return gen, first

    async def _sse(self, plan: Plan, body: SamplingRequest, kind: str, job_list: list[Job], gens: list, firsts: list, retried: list,
                   finals: dict[int, Final], tasks: list[asyncio.Task], close) -> AsyncIterator[str]:
        """The SSE body of the opened streams ``gens`` (their first items ``firsts``), merged as their
        items arrive. A stream whose replica dies is resumed on another replica (``cfg.resume_streams``,
        up to ``MAX_RESUMES`` times); otherwise, or when the deadline passes, an error event and no
        ``[DONE]``. Fills ``finals`` and ``tasks`` (its pumps); ``close()`` cancels the rest and releases the lease."""
        rid, created, model = plan.request_id, now(), self.cfg.model_name
        queue: asyncio.Queue = asyncio.Queue(maxsize=STREAM_BUFFER * len(gens))

        async def pump(i: int) -> None:
            chunks: list[tuple[int, ...]] = []
            item, resumes = firsts[i], 0
            try:
                while True:
                    if isinstance(item, Delta):
                        if item.token_ids:
                            chunks.append(item.token_ids)
                        if item.reasoning or item.content:
                            await queue.put((i, item))
                    else:
                        await queue.put((i, item))
                        return
                    try:
                        item = await gens[i].__anext__()
                    except StopAsyncIteration:
                        return
                    except REPLICA_FAILURES as exc:
                        if not self.cfg.resume_streams or resumes >= MAX_RESUMES:
                            raise
                        resumes += 1
                        gens[i], item = await self._resume(plan, job_list[i], chunks, exc)
            except Exception as exc:  # noqa: BLE001 — reported to the client as an error event
                await queue.put((i, exc))

        tasks.extend(asyncio.create_task(pump(i)) for i in range(len(gens)))
        try:
            if kind == "chat":
                for i in range(len(gens)):
                    yield sse(chunk(rid, created, model, kind, i, delta={"role": "assistant", "content": ""}))
            while len(finals) < len(gens):
                try:
                    async with asyncio.timeout_at(plan.deadline):
                        i, item = await queue.get()
                except TimeoutError as exc:
                    item = exc
                if isinstance(item, BaseException):  # an error event and no [DONE]: the client sees the reply is incomplete
                    yield sse(self._error_event(plan, item))
                    return
                if isinstance(item, Final):
                    item.retried = retried[i]
                    finals[i] = item
                    yield sse(chunk(rid, created, model, kind, i, finish_reason=item.finish_reason, extra={"kvswitch": info(item, plan)}))
                    continue
                delta = {}
                if item.reasoning:
                    delta["reasoning_content"] = item.reasoning
                if item.content:
                    delta["content"] = item.content
                yield sse(chunk(rid, created, model, kind, i, delta=delta, text=item.content))
            if body.stream_options and body.stream_options.include_usage:
                ordered = [finals[i] for i in sorted(finals)]
                yield sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created,
                           "model": model, "choices": [], "usage": usage(ordered)})
            yield sse("[DONE]")
        finally:  # also on client disconnect: cancel the generations so their slots free up
            close()

    async def _serve(self, body: SamplingRequest, messages: list[dict], kind: str):
        plan = await self._plan(body, messages, kind)
        if body.stream:
            return await self._stream(plan, body, kind)
        outs = await self._complete(plan, body)
        infos = [info(o.final, plan) for o in outs]
        selection = None
        if body.kvswitch.select is not None and len(outs) > 1:
            outs, infos, selection = rank_choices(outs, infos, body.kvswitch.select, seed=body.seed or 0, grader=self.grader)
        build = chat_body if kind == "chat" else completion_body
        out = build(plan.request_id, now(), self.cfg.model_name, outs, infos)
        if selection is not None:
            out["kvswitch"] = {**out["kvswitch"], "selection": selection}
        return JSONResponse(out, headers=self._headers(plan))

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
        prompts = await asyncio.to_thread(lambda: [self._prompt_ids([{"role": "user", "content": t}]) for t in body.input])
        max_prompt = max_prompt_tokens(self.cfg, self.context)
        if max(len(p) for p in prompts) > max_prompt:
            raise APIError(400, f"an input is longer than {max_prompt} tokens", param="input", code="context_length_exceeded")
        vectors = await self._pool_call("prefill", lambda: self.prefill.embed.remote(prompts))
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        tokens = sum(len(p) for p in prompts)
        return {"object": "list", "model": self.cfg.model_name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "kvswitch",
                                            "max_model_len": self.context}]}

    @app.get("/v1/kvswitch/status")
    async def status(self):
        """Operators' view: each pool's replicas and own reported load, whether routing counts it as
        saturated, and this router replica's in-flight requests."""
        return self.loads.status()

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}
