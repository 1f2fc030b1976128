"""The measured variants of ``kvswitch bench-overhead``: one prefill with and without KV pooling
and hidden states, on one left-padded batch."""

from __future__ import annotations

import torch

from serve_app.core.kv_features import PoolingConfig, cache_kv, kv_embedding, pool_hidden, pool_kv

PREFILL = "prefill"
KV_POOL = "prefill+kv_pool"
"""The probe feature: what routing adds to every request's prefill."""
KV_EMBED = "prefill+kv_pool+embedding"
"""The probe feature and the KV sentence embedding (what /v1/embeddings adds)."""
HIDDEN = "prefill+hidden_states"
VARIANTS = (PREFILL, KV_POOL, KV_EMBED, HIDDEN)


def build_batch(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` (mask cumsum − 1, ≥ 0)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc["attention_mask"]
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": position_ids}


def _forward(model, batch: dict[str, torch.Tensor], logits_to_keep: int, hidden: bool):
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=True,
        output_hidden_states=hidden,
        logits_to_keep=logits_to_keep,
    )


def make_variants(model, batch: dict[str, torch.Tensor], pooling: PoolingConfig, logits_to_keep: int):
    """Variant name → zero-argument callable returning everything that variant keeps."""
    mask = batch["attention_mask"]

    def prefill():
        out = _forward(model, batch, logits_to_keep, hidden=False)
        return {"out": out}

    def prefill_kv_pool():
        out = _forward(model, batch, logits_to_keep, hidden=False)
        keys, values = cache_kv(out.past_key_values)
        return {"out": out, "feature": pool_kv(keys, values, mask, pooling)}

    def prefill_kv_embed():
        out = _forward(model, batch, logits_to_keep, hidden=False)
        keys, values = cache_kv(out.past_key_values)
        return {"out": out, "feature": pool_kv(keys, values, mask, pooling), "embedding": kv_embedding(keys, values, mask)}

    def prefill_hidden():
        out = _forward(model, batch, logits_to_keep, hidden=True)
        return {"out": out, "feature": pool_hidden(out.hidden_states[1:], mask, pooling)}

    return {PREFILL: prefill, KV_POOL: prefill_kv_pool, KV_EMBED: prefill_kv_embed, HIDDEN: prefill_hidden}


# --------------------------------------------------------------------------- memory accounting
