"""Generator: one class, deployed twice from config as the ``fast`` and ``slow`` pools.

The pool's ``Engine`` (``serve_app.engines.load.make_engine``: continuous batching over the HF
engine, or vLLM) decodes concurrent requests together; online switching happens inside it.
Replicas publish their load through ``record_routing_stats`` for the pool's request router."""

from __future__ import annotations

from typing import AsyncIterator

from ray import serve

from deployments.metrics import GeneratorMetrics, add
from serve_app.config import AppConfig
from serve_app.core.confidence import kv_confidence
from serve_app.engines.base import GenRequest
from serve_app.engines.load import make_engine
from serve_app.engines.reply import ReplyStream
from serve_app.serving.messages import Delta, Final, Job, Reply


@serve.deployment
class Generator:
    def __init__(self, cfg: AppConfig, pool: str):
        self.pool = pool
        self.engine = make_engine(cfg, pool)
        self.online_enabled = cfg.online.enabled
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = GeneratorMetrics(pool)
        self.skip_ids = {self.engine.eos_id, self.engine.pad_id}

    def record_routing_stats(self) -> dict:
        """Polled by the pool's request router (``PredictedTokensRouter``)."""
        stats = self.engine.stats().model_dump()
        self.metrics.observe(stats)
        return stats

    async def generate_stream(self, job: Job) -> AsyncIterator[Delta | Final]:
        """Yield ``Delta`` text as the reply decodes, then one ``Final``."""
        eng = self.engine
        req = GenRequest(prompt_ids=job.prompt_ids, mode=self.pool, online=job.online and self.online_enabled,
                         max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p, seed=job.seed)
        reply = ReplyStream(eng.tokenizer, thinking=self.pool == "slow", stops=job.stop, skip_ids=self.skip_ids,
                            open_tag=eng.prompts.open_think.strip(), close_tag=eng.prompts.close_think.strip())
        tokens, result = 0, None
        stream = eng.stream(req, job.predicted_tokens)
        try:
            async for ids, result in stream:
                tokens += len(ids)
                reasoning, content = reply.push(ids, final=result is not None)
                if reasoning or content:
                    yield Delta(reasoning, content)
                if reply.stopped:
                    break
        finally:
            await stream.aclose()
        add(self.metrics.tokens, tokens, self.metrics.tags)
        if result is not None:
            finish = "stop" if result.finished else "length"
            start, end, switched_at = result.start_mode, result.end_mode, result.switched_at
            confidence = kv_confidence(eng.probe.confidence, result.end_mode, result.kv_trajectory)
        else:  # a stop string ended the reply early
            finish, start, end, switched_at, confidence = "stop", self.pool, self.pool, None, None
        yield Final(finish_reason="stop" if reply.stopped else finish, prompt_tokens=len(req.prompt_ids) + len(eng.prefix_ids[self.pool]),
                    completion_tokens=tokens, reasoning_tokens=reply.reasoning_tokens, start_mode=start, end_mode=end,
                    switched_at=switched_at, confidence=None if confidence is None else round(confidence, 4), replica=self.replica)

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
