"""Generator: one class, deployed twice from config as the ``fast`` and ``slow`` pools.

The pool's ``Engine`` (``serve_app.engines.load.make_engine``: continuous batching over the HF
engine, or vLLM) decodes concurrent requests together; online switching happens inside it.
Replicas publish their load through ``record_routing_stats`` for the pool's request router."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import AsyncIterator

from ray import serve

from deployments.metrics import GeneratorMetrics, add
from deployments.reporting import LoadReporter
from serve_app.config import AppConfig
from serve_app.core.kv_coe import kv_confidence, result_variant_scores
from serve_app.core.wire import finite_or_none, pack_f32
from serve_app.engines.base import GenerationError, GenRequest
from serve_app.engines.load import make_engine
from serve_app.engines.reply import ReplyStream
from serve_app.serving.messages import Delta, Final, Job, Reply

logger = logging.getLogger("ray.serve")


@serve.deployment
class Generator:
    def __init__(self, cfg: AppConfig, pool: str, board=None):
        self.pool = pool
        self.engine = make_engine(cfg, pool)
        self.online_enabled = cfg.online.enabled
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.reporter = LoadReporter(board, pool, self.replica, lambda: self.engine.stats().model_dump(), cfg.load_view_period_s,
                                     cfg.load_view_stale_s / 3)
        self.reporter.ensure_started()
        self.metrics = GeneratorMetrics(pool)
        self.skip_ids = {self.engine.eos_id, self.engine.pad_id}
        # detokenising and the confidence run here, off the replica's event loop
        self.cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"kvswitch-{pool}-reply")

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    def record_routing_stats(self) -> dict:
        """Polled by the pool's request router (``PredictedTokensRouter``)."""
        self.reporter.ensure_started()
        stats = self.engine.stats().model_dump()
        self.metrics.observe(stats)
        return stats

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Polled by Serve's autoscaler for ``cluster.autoscaling.predicted_tokens_policy``."""
        stats = self.engine.stats()
        return {"predicted_tokens": float(stats.predicted_tokens), "running": float(stats.running), "queued": float(stats.queued)}

    async def generate_stream(self, job: Job) -> AsyncIterator[Delta | Final]:
        """Yield ``Delta`` text as the reply decodes, then one ``Final``. A failure ends this reply
        alone with ``GenerationError`` (its request id only; the details go to the log)."""
        self.reporter.ensure_started()
        try:
            async with aclosing(self._generate_stream(job)) as items:  # closed at once when the client goes
                async for item in items:
                    yield item
        except GenerationError:
            raise
        except Exception as exc:  # noqa: BLE001 — clients get the request id, the log gets the details
            logger.exception("generation failed for request %s", job.request_id or "?")
            raise GenerationError(job.request_id) from exc

    def _request(self, job: Job, reply: ReplyStream) -> GenRequest:
        """The engine request of ``job``; for a resumed reply, replay what was streamed into ``reply``
        and continue after it (prompt + mode prefix + those tokens, on the same sampling schedule).
        Online switching continues only while the reply is still in its starting mode (a thought that
        opened or closed may have been a switch)."""
        eng, online = self.engine, job.online and self.online_enabled
        if not job.resume:
            return GenRequest(prompt_ids=job.prompt_ids, mode=self.pool, online=online, max_new_tokens=job.max_tokens,
                              temperature=job.temperature, top_p=job.top_p, seed=job.seed, request_id=job.request_id,
                              max_thinking_tokens=job.max_thinking_tokens, early_exit=job.early_exit)
        done = [i for chunk in job.resume for i in chunk]
        ended = len(done) >= job.max_tokens or done[-1:] == [eng.eos_id]  # the reply was complete but for its Final
        for n, chunk in enumerate(job.resume):  # the client has this text already; the last push of an ended reply was final
            reply.push(list(chunk), ended and n == len(job.resume) - 1)
        moved = reply.in_think != (self.pool == "slow")
        return GenRequest(prompt_ids=list(job.prompt_ids) + list(eng.prefix_ids[self.pool]) + done, mode=self.pool,
                          online=online and not moved, max_new_tokens=0 if ended else job.max_tokens - len(done), temperature=job.temperature,
                          top_p=job.top_p, seed=job.seed, request_id=job.request_id, add_prefix=False, already=len(done),
                          max_thinking_tokens=None if moved else job.max_thinking_tokens, early_exit=None if moved else job.early_exit)

    async def _generate_stream(self, job: Job) -> AsyncIterator[Delta | Final]:
        eng = self.engine
        reply = ReplyStream(eng.tokenizer, thinking=self.pool == "slow", stops=job.stop, skip_ids=self.skip_ids,
                            open_tag=eng.prompts.open_think.strip(), close_tag=eng.prompts.close_think.strip())
        req = await self._off_loop(self._request, job, reply)
        tokens, result = req.already, None
        if req.max_new_tokens > 0 and not reply.stopped:
            stream = eng.stream(req, job.predicted_tokens)
            try:
                async for ids, result in stream:
                    tokens += len(ids)
                    reasoning, content = await self._off_loop(reply.push, ids, result is not None)
                    if reasoning or content or ids:
                        yield Delta(reasoning, content, tuple(ids))
                    if reply.stopped:
                        break
            finally:
                await stream.aclose()
        add(self.metrics.tokens, tokens - req.already, self.metrics.tags)
        if result is not None:
            finish = "stop" if result.finished else "length"
            start, end = self.pool, result.end_mode
            switched_at = None if result.switched_at is None else req.already + result.switched_at
            capped = result.thinking_capped
            exited_at = None if result.exited_at is None else req.already + result.exited_at
            probe_tokens = result.probe_tokens
            confidence = await self._off_loop(kv_confidence, eng.probe.confidence, result.end_mode, result)
        else:  # a stop string ended the reply early (or a resumed reply had nothing left to generate)
            finish = "stop" if reply.stopped or req.max_new_tokens > 0 or job.resume[-1][-1:] == (eng.eos_id,) else "length"
            start, end, switched_at, confidence, capped = self.pool, self.pool, None, None, False
            exited_at, probe_tokens = None, 0
        yield Final(finish_reason="stop" if reply.stopped else finish, prompt_tokens=len(job.prompt_ids) + len(eng.prefix_ids[self.pool]),
                    completion_tokens=tokens, reasoning_tokens=reply.reasoning_tokens, start_mode=start, end_mode=end,
                    switched_at=switched_at, confidence=None if confidence is None else round(confidence, 4), replica=self.replica,
                    resumed=bool(job.resume), thinking_capped=capped, exited_at=exited_at, probe_tokens=probe_tokens)

    async def admin_generate(self, req: GenRequest) -> dict:
        """``/admin/v1/generate``: one reply of a token-level request in this pool's mode, with what
        calibration needs from it (``kvswitch calibrate --url``): token ids, recorded decode features
        and every KV-CoE variant's score. A failure ends with ``GenerationError``, as a reply does."""
        self.reporter.ensure_started()
        result = None
        try:
            async with aclosing(self.engine.stream(req)) as stream:
                async for _, result in stream:
                    pass
        except Exception as exc:  # noqa: BLE001 — clients get the request id, the log gets the details
            logger.exception("admin generation failed for request %s", req.request_id or "?")
            raise GenerationError(req.request_id) from exc
        add(self.metrics.tokens, result.tokens, self.metrics.tags)
        scores = await self._off_loop(result_variant_scores, result)
        return {"text": result.text, "reply": result.reply, "tokens": result.tokens, "finished": result.finished,
                "start_mode": result.start_mode, "end_mode": result.end_mode, "switched_at": result.switched_at,
                "thinking_capped": result.thinking_capped, "token_ids": list(result.token_ids),
                "recorded": [[int(t), pack_f32(f)] for t, f in result.recorded], "coe_scores": finite_or_none(scores),
                "replica": self.replica}

    async def generate(self, job: Job) -> Reply:
        """The whole reply at once."""
        reasoning, content, final = [], [], None
        async for item in self.generate_stream(job):
            if isinstance(item, Final):
                final = item
            else:
                reasoning.append(item.reasoning)
                content.append(item.content)
        return Reply("".join(reasoning), "".join(content), final)
