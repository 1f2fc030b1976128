"""PrefillPool: the prompt's prefill → KV probe feature, difficulty and KV embedding."""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from serve_app.config import AppConfig
from serve_app.service import load_runtime


@serve.deployment
class PrefillPool:
    def __init__(self, cfg: AppConfig):
        self.rt = load_runtime(cfg)
        self._score_batch.set_max_batch_size(cfg.prefill.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(cfg.prefill.batch_wait_timeout_s)

    def _features(self, prompts: list[list[int]], embed: bool) -> tuple[list[float], list[list[float]] | None]:
        with torch.inference_mode():
            feats = self.rt.engine.prompt_features(prompts, self.rt.probe.pooling, embedding=embed)
            d = self.rt.probe.prompt_difficulty(feats["kv"]).tolist()
        return d, feats["embedding"].tolist() if embed else None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _score_batch(self, prompts: list[list[int]]) -> list[float]:
        return (await asyncio.to_thread(self._features, prompts, False))[0]

    async def score(self, prompt_ids: list[int]) -> float:
        """Difficulty (0–100) of one prompt; concurrent calls share one batched prefill."""
        return await self._score_batch(prompt_ids)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """KV embeddings (L2-normalised) of the given prompts, one prefill for all."""
        return (await asyncio.to_thread(self._features, prompts, True))[1]
