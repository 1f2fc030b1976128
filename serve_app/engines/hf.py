"""The HF-transformers engine: one batched decode loop for every routing policy.

One prefill of the shared prompt (up to the assistant turn, *before* the think prefix) gives the KV
cache that both the routing feature and the generation use. The mode prefix and any mid-generation
switch are fed as *forced tokens*, one per decode step, into the same live cache — never a second
prefill. Every row carries its own mode, forced-token queue and switch point; finished rows leave
the batch. Token accounting (the prefix is prompt; sampled and switch tokens are generated):
docs/method.md §5.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from serve_app.core.kv_features import PoolingConfig, cache_kv, kv_embedding, pool_hidden, pool_kv
from serve_app.core.prompts import ModePrompts, ThinkTags, encode_messages
from serve_app.core.quant import KVQuantConfig, quantize_cache
from serve_app.engines.base import SAMPLING_EPS, GenRequest, GenResult, TokenSetup
from serve_app.engines.decode import DecodeBatch, Row, position_seed

__all__ = ["DecodeBatch", "HFEngine", "Row", "position_seed"]


class HFEngine(TokenSetup):
    """Batched greedy / sampled decoding with per-row modes and online switching on one live cache."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: ModePrompts | ThinkTags | None = None):
        super().__init__(tokenizer, prompts)
        self.model = model

    def encode_prompt(self, messages: list[dict] | str) -> list[int]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return encode_messages(self.tokenizer, messages, self.prompts)

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[Sequence[int]], hidden: bool = False):
        """Left-padded prefill. Returns (cache, attention_mask, next_positions, outputs)."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=hidden,
        )
        return out.past_key_values, mask, mask.sum(-1), out

    def prompt_features(
        self, prompt_ids: Sequence[Sequence[int]], pooling: PoolingConfig, hidden: bool = False, kv_quant: KVQuantConfig | None = None,
        embedding: bool = True,
    ) -> dict:
        """Probe feature, KV embedding (unless ``embedding=False``) and hidden-state feature (with
        ``hidden``) of prompts; no generation. ``kv_quant``: features of the (simulated) quantized cache."""
        cache, mask, _, out = self.prefill(prompt_ids, hidden=hidden)
        if kv_quant is not None:
            quantize_cache(cache, kv_quant, mask)
        keys, values = cache_kv(cache)
        feats = {"kv": pool_kv(keys, values, mask, pooling)}
        if embedding:
            feats["embedding"] = kv_embedding(keys, values, mask)
        if hidden:
            feats["hidden"] = pool_hidden(out.hidden_states[1:], mask, pooling)
        return feats

    def _sample(self, row: Row, logits: torch.Tensor) -> int:
        """Temperature / top-p sampling of one row (greedy rows are picked batch-wide)."""
        # a vanishing temperature (1e-267 is valid JSON) must not overflow into inf / NaN probabilities
        if row.req.seed is not None:  # the draw for token t depends on (seed, t) only: a resumed reply samples on as before
            row.generator.manual_seed(position_seed(row.req.seed, row.req.already + row.generated))
        probs = torch.softmax(logits.float() / max(row.req.temperature, SAMPLING_EPS), -1)
        if row.req.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < row.req.top_p
            keep[0] = True  # the most likely token always stays (a top_p of 1e-323 is 0 in float32)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _result(self, row: Row) -> GenResult:
        text = self.tokenizer.decode(row.out_ids)
        start_mode = row.start_mode or (row.mode if row.switches == 0 else ("slow" if row.mode == "fast" else "fast"))
        prefix = self.prompts.fast_prefix if start_mode == "fast" else self.prompts.slow_prefix
        hidden_traj = None
        if row.hidden_sum is not None and row.hidden_n:
            hidden_traj = row.hidden_sum / row.hidden_n
        return GenResult(
            text=text,
            reply=prefix + text,
            tokens=row.generated + row.appended,
            finished=row.finished,
            start_mode=start_mode,
            end_mode=row.mode,
            difficulty=row.difficulty,
            switched_at=row.switched_at,
            thinking_capped=row.capped,
            exited_at=row.exited_at,
            probe_tokens=row.probe_tokens,
            probe_answers=list(row.probe_answers),
            checks=row.checks,
            prompt_feature=row.feature,
            embedding=row.embedding,
            hidden_feature=row.hidden_feature,
            kv_trajectory=torch.stack(row.traj),
            kv_thought=list(row.traj_thought),
            kv_layer_sums=row.layer_sums,
            kv_counts=tuple(row.layer_counts),
            hidden_trajectory=hidden_traj,
            token_max_probs=row.max_probs,
            token_logprobs=row.logprobs,
            token_entropies=row.entropies,
            token_ids=row.out_ids,
            recorded=row.recorded,
        )

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenRequest], **batch_options) -> list[GenResult]:
        """Generate every request in one batch: one ``DecodeBatch`` (``batch_options`` are its
        keyword arguments: probe, online, prompt_feature, collect_hidden, keep_features, record,
        kv_quant), one ``add``, then ``step`` until every row has finished. Rows with
        ``mode=None`` or ``online=True`` need a probe."""
        if not requests:
            return []
        batch = DecodeBatch(self, **batch_options)
        rows = batch.add(requests)
        while batch.rows:
            batch.step()
        for row in rows:
            if row.error is not None:
                raise row.error
        return [row.result for row in rows]  # type: ignore[misc]
