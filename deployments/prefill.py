"""PrefillPool: the prompt's prefill → KV probe feature, difficulty and KV embedding.

On ``engine: hf`` concurrent calls share one batched transformers prefill (``@serve.batch``); on
``engine: vllm`` each prompt is one vLLM request whose features come from vLLM's own paged cache
(``serve_app.vllm_connector``) and vLLM batches them itself."""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from serve_app.config import AppConfig
from serve_app.service import load_runtime, load_vllm_engine


@serve.deployment
class PrefillPool:
    def __init__(self, cfg: AppConfig):
        self.vllm = load_vllm_engine(cfg, cfg.prefill.vllm) if cfg.prefill.engine == "vllm" else None
        self.rt = None if self.vllm else load_runtime(cfg)
        self.probe = self.vllm.probe if self.vllm else self.rt.probe
        self._score_batch.set_max_batch_size(cfg.prefill.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(cfg.prefill.batch_wait_timeout_s)

    def _features(self, prompts: list[list[int]], embed: bool) -> tuple[list[float], list[list[float]] | None]:
        with torch.inference_mode():
            feats = self.rt.engine.prompt_features(prompts, self.probe.pooling, embedding=embed)
            d = self.probe.prompt_difficulty(feats["kv"]).tolist()
        return d, feats["embedding"].tolist() if embed else None

    async def _vllm_features(self, prompts: list[list[int]], embed: bool) -> tuple[list[float], list[list[float]] | None]:
        feats = await asyncio.gather(*(self.vllm.features(p) for p in prompts))
        d = self.probe.prompt_difficulty(torch.stack([f["kv"] for f in feats])).tolist()
        return d, [f["embedding"].tolist() for f in feats] if embed else None

    async def _run(self, prompts: list[list[int]], embed: bool):
        if self.vllm is not None:
            return await self._vllm_features(prompts, embed)
        return await asyncio.to_thread(self._features, prompts, embed)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _score_batch(self, prompts: list[list[int]]) -> list[float]:
        return (await self._run(prompts, False))[0]

    async def score(self, prompt_ids: list[int]) -> float:
        """Difficulty (0–100) of one prompt; concurrent calls share one batched prefill."""
        return await self._score_batch(prompt_ids)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """KV embeddings (L2-normalised) of the given prompts, one prefill for all."""
        return (await self._run(prompts, True))[1]
