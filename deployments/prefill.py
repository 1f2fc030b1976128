"""PrefillPool: the prompt's prefill → KV probe feature, difficulty and KV embedding.

The pool's ``Engine`` computes the features: on ``engine: hf`` concurrent calls share one batched
transformers prefill (``@serve.batch``); on ``engine: vllm`` each prompt is one vLLM request whose
features come from vLLM's own paged cache (``serve_app.engines.vllm_connector``), batched by vLLM."""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from deployments.reporting import LoadReporter
from serve_app.config import AppConfig
from serve_app.core.wire import pack_f32
from serve_app.engines.load import make_engine


@serve.deployment
class PrefillPool:
    def __init__(self, cfg: AppConfig, board=None):
        self.engine = make_engine(cfg, "prefill")
        self.running = 0
        replica = serve.get_replica_context().replica_id.unique_id
        self.reporter = LoadReporter(board, "prefill", replica, lambda: {"running": self.running}, cfg.load_view_period_s,
                                     cfg.load_view_stale_s / 3)
        self.reporter.ensure_started()
        self.probe = self.engine.probe
        self._score_batch.set_max_batch_size(cfg.prefill.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(cfg.prefill.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _score_batch(self, prompts: list[list[int]]) -> list[float]:
        feats = await self.engine.features(prompts)
        scores = await asyncio.to_thread(self.probe.prompt_difficulty, torch.stack([f["kv"] for f in feats]))  # off the event loop
        return scores.tolist()

    async def score(self, prompt_ids: list[int]) -> float:
        """Difficulty (0–100) of one prompt; concurrent calls share one batched prefill."""
        self.reporter.ensure_started()
        self.running += 1
        try:
            return await self._score_batch(prompt_ids)
        finally:
            self.running -= 1

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """KV embeddings (L2-normalised) of the given prompts, one prefill for all."""
        self.reporter.ensure_started()
        self.running += 1
        try:
            return [f["embedding"].tolist() for f in await self.engine.features(prompts, embedding=True)]
        finally:
            self.running -= 1

    async def features(self, prompts: list[list[int]]) -> list[str]:
        """``/admin/v1/features``: the probe feature (``kv``, pooled with the served probe's pooling)
        of each prompt, packed (``serve_app.core.wire``); one prefill for all."""
        self.reporter.ensure_started()
        self.running += 1
        try:
            return [pack_f32(f["kv"]) for f in await self.engine.features(prompts)]
        finally:
            self.running -= 1
