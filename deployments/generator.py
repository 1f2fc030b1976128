"""Generator: one class, deployed twice from config as the ``fast`` and ``slow`` pools.

Concurrent requests share one continuously batched decode loop (``ContinuousBatcher``); online
switching happens inside it, on the live KV cache. Replicas publish their load through
``record_routing_stats`` for the pool's request router."""

from __future__ import annotations

from typing import AsyncIterator

from ray import serve

from serve_app.coe import kv_confidence
from serve_app.config import AppConfig
from serve_app.engine import GenRequest
from serve_app.service import ContinuousBatcher, ReplyStream, load_runtime, load_vllm_engine

from deployments.metrics import GeneratorMetrics, add


@serve.deployment
class Generator:
    def __init__(self, cfg: AppConfig, pool: str):
        self.pool = pool
        pc = cfg.pool(pool)
        if pc.engine == "vllm":  # vLLM batches and streams itself; no KV-CoE trajectory (confidence is null)
            self.batcher = self.engine = load_vllm_engine(cfg, pc.vllm)
            self.probe, self.online_enabled = self.engine.probe, cfg.online.enabled
        else:
            rt = load_runtime(cfg)
            self.batcher, self.engine = ContinuousBatcher(rt, pc.max_batch_size), rt.engine
            self.probe, self.online_enabled = rt.probe, rt.online_enabled
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = GeneratorMetrics(pool)
        self.skip_ids = {self.engine.eos_id, self.engine.pad_id}

    def record_routing_stats(self) -> dict:
        """Polled by the pool's request router (``PredictedTokensRouter``)."""
        stats = self.batcher.stats()
        self.metrics.observe(stats)
        return stats

    async def generate_stream(self, job: dict) -> AsyncIterator[dict]:
        """Yield ``{"reasoning", "content"}`` deltas, then one final ``{"done": True, ...}``."""
        eng = self.engine
        req = GenRequest(
            prompt_ids=job["prompt_ids"],
            mode=self.pool,
            online=bool(job.get("online")) and self.online_enabled,
            max_new_tokens=job["max_tokens"],
            temperature=job.get("temperature", 0.0),
            top_p=job.get("top_p", 1.0),
            seed=job.get("seed"),
        )
        reply = ReplyStream(eng.tokenizer, thinking=self.pool == "slow", stops=job.get("stop") or [], skip_ids=self.skip_ids,
                            open_tag=eng.prompts.open_think.strip(), close_tag=eng.prompts.close_think.strip())
        tokens, result = 0, None
        stream = self.batcher.stream(req, job.get("predicted_tokens", 0.0))
        try:
            async for ids, result in stream:
                tokens += len(ids)
                reasoning, content = reply.push(ids, final=result is not None)
                if reasoning or content:
                    yield {"reasoning": reasoning, "content": content}
                if reply.stopped:
                    break
        finally:
            await stream.aclose()
        add(self.metrics.tokens, tokens, self.metrics.tags)
        if result is not None:
            finish = "stop" if result.finished else "length"
            start, end, switched_at = result.start_mode, result.end_mode, result.switched_at
            confidence = kv_confidence(self.probe.confidence, result.end_mode, result.kv_trajectory)
        else:  # a stop string ended the reply early
            finish, start, end, switched_at, confidence = "stop", self.pool, self.pool, None, None
        yield {
            "done": True,
            "finish_reason": "stop" if reply.stopped else finish,
            "prompt_tokens": len(req.prompt_ids) + len(eng.prefix_ids[self.pool]),
            "completion_tokens": tokens,
            "reasoning_tokens": reply.reasoning_tokens,
            "start_mode": start,
            "end_mode": end,
            "switched_at": switched_at,
            "confidence": None if confidence is None else round(confidence, 4),
            "replica": self.replica,
        }

    async def generate(self, job: dict) -> dict:
        """The whole reply at once: ``{"reasoning", "content", **final}``."""
        reasoning, content, final = [], [], {}
        async for item in self.generate_stream(job):
            if item.get("done"):
                final = item
            else:
                reasoning.append(item["reasoning"])
                content.append(item["content"])
        return {"reasoning": "".join(reasoning), "content": "".join(content), **final}
