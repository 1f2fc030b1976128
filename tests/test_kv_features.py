"""KV pooling formulas on hand-computed tensors, and padding invariance through the real model."""

import pytest
import torch
from transformers import DynamicCache

from serve_app.core.kv_features import PoolingConfig, cache_kv, kv_embedding, last_real_weights, pool_hidden, pool_kv, token_kv_vectors
from serve_app.engines.hf import HFEngine


def _kv():
    """Two layers, batch 1, 2 heads, 3 positions, head_dim 2; values = keys + 100."""
    k0 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]]])
    k1 = 10 * k0
    return [k0, k1], [k0 + 100, k1 + 100]


def test_last_real_weights_rank_from_the_end_for_any_padding():
    left = torch.tensor([[0, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0]])
    assert last_real_weights(left, 2, "sum").tolist() == [[0, 0, 1, 1]]
    assert last_real_weights(right, 2, "sum").tolist() == [[0, 1, 1, 0]]
    assert last_real_weights(right, 2, "mean").tolist() == [[0, 0.5, 0.5, 0]]
    assert last_real_weights(left, 2, "last").tolist() == [[0, 0, 0, 1]]
    assert last_real_weights(right, None, "mean")[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert last_real_weights(torch.tensor([[1, 1]]), 5, "sum").tolist() == [[1, 1]]  # S longer than the prompt


def test_pool_kv_sum_flatten_mean_layers_by_hand():
    keys, values = _kv()
    mask = torch.ones(1, 3)
    cfg = PoolingConfig(last_tokens=2, last_layers=2, token="sum", heads="flatten", layers="mean", part="k")
    # layer 0 keys over positions 1..2: head0 [3+5, 4+6] = [8, 10], head1 [0, 5]; layer 1 = 10x
    expected = torch.tensor([8.0, 10.0, 0.0, 5.0]) * (1 + 10) / 2
    assert torch.allclose(pool_kv(keys, values, mask, cfg)[0], expected)
    assert cfg.dim(kv_heads=2, head_dim=2) == 4


def test_pool_kv_other_settings_by_hand():
    keys, values = _kv()
    mask = torch.ones(1, 3)
    # last token only, mean over heads, last layer only, values
    cfg = PoolingConfig(last_tokens=3, last_layers=1, token="last", heads="mean", part="v")
    v_last = torch.tensor([[50.0, 60.0], [0.0, 30.0]]) + 100  # layer 1 values at position 2, per head
    assert torch.allclose(pool_kv(keys, values, mask, cfg)[0], v_last.mean(0))
    # mean over tokens, layers summed, K and V concatenated, L2
    cfg = PoolingConfig(last_tokens=3, last_layers=2, token="mean", heads="mean", layers="sum", part="kv", l2=True)
    # layer 0 keys: token means head0 [3, 4], head1 [0, 2] -> head mean [1.5, 3]; layer 1 is 10x; layers summed
    k = torch.tensor([1.5, 3.0]) * 11
    v = (torch.tensor([1.5, 3.0]) + 100) + (torch.tensor([15.0, 30.0]) + 100)
    raw = torch.cat([k, v])
    got = pool_kv(keys, values, mask, cfg)[0]
    assert torch.allclose(got, raw / raw.norm())
    assert cfg.dim(kv_heads=2, head_dim=2) == 4


def test_pooling_ignores_padding_positions():
    keys, values = _kv()
    cfg = PoolingConfig(last_tokens=2, last_layers=2, token="sum")
    unpadded = pool_kv([k[:, :, 1:] for k in keys], [v[:, :, 1:] for v in values], torch.ones(1, 2), cfg)
    # position 0 becomes padding: it must not count, whatever its value
    masked = pool_kv(keys, values, torch.tensor([[0, 1, 1]]), PoolingConfig(last_tokens=5, last_layers=2, token="sum"))
    assert torch.allclose(unpadded, masked)


def test_pool_kv_rejects_bad_shapes():
    keys, values = _kv()
    with pytest.raises(ValueError, match="last 3 layers"):
        pool_kv(keys, values, torch.ones(1, 3), PoolingConfig(last_layers=3))
    with pytest.raises(ValueError, match="does not match"):
        pool_kv(keys, values, torch.ones(1, 4), PoolingConfig(last_layers=1))
    with pytest.raises(ValueError, match="non-empty"):
        pool_kv([], [], torch.ones(1, 3), PoolingConfig())
    with pytest.raises(Exception):
        PoolingConfig(token="max")  # one pydantic model validates every setting


def test_kv_embedding_by_hand():
    keys, values = _kv()
    emb = kv_embedding(keys, values, torch.tensor([[0, 1, 1]]))
    k = torch.tensor([(3 + 5 + 0 + 0) / 4, (4 + 6 + 2 + 3) / 4]) * 11 / 2  # tokens 1..2, heads, 2 layers
    v = torch.tensor([(3 + 5 + 0 + 0) / 4 + 100, (4 + 6 + 2 + 3) / 4 + 100]) / 2 + torch.tensor(
        [(30 + 50 + 0 + 0) / 4 + 100, (40 + 60 + 20 + 30) / 4 + 100]) / 2
    raw = torch.cat([k, v])
    assert emb.shape == (1, 4)
    assert torch.allclose(emb[0], raw / raw.norm())


def test_pool_hidden_treats_a_hidden_state_as_one_head():
    h = [torch.arange(12.0).view(1, 3, 4), 2 * torch.arange(12.0).view(1, 3, 4)]
    cfg = PoolingConfig(last_tokens=1, last_layers=1, token="sum")
    assert torch.allclose(pool_hidden(h, torch.ones(1, 3), cfg)[0], torch.tensor([16.0, 18.0, 20.0, 22.0]))


def test_token_kv_vectors_gather_one_position_per_row():
    keys, values = _kv()
    vec = token_kv_vectors(keys, values, torch.tensor([1]))
    k = torch.tensor([3.0, 4.0, 0.0, 2.0]) * 11 / 2
    assert torch.allclose(vec[0], torch.cat([k, k + 100]))


# ----------------------------------------------------------------- the real model, real cache


QUESTIONS = ["What is 2 + 3?", "What is 41 - 17 + 8 - 60 + 5?", "What is 99 - 1 + 2?"]


@pytest.fixture(scope="module")
def engine(shipped):
    return HFEngine(*shipped)


def _right_padded_prefill(engine, prompts, hidden=False):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), engine.pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    with torch.inference_mode():
        out = engine.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           past_key_values=DynamicCache(config=engine.model.config), use_cache=True, output_hidden_states=hidden)
    return out.past_key_values, mask, out


@pytest.mark.parametrize("cfg", [PoolingConfig(), PoolingConfig(last_tokens=8, token="mean", heads="mean", part="k", l2=True),
                                 PoolingConfig(token="last", last_layers=2, layers="sum")])
def test_left_right_and_unpadded_batches_give_the_same_features(engine, cfg):
    prompts = [engine.encode_prompt(q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    single = [engine.prompt_features([p], cfg, hidden=True) for p in prompts]
    left = engine.prompt_features(prompts, cfg, hidden=True)  # the engine left-pads
    cache, mask, out = _right_padded_prefill(engine, prompts, hidden=True)
    keys, values = cache_kv(cache)
    right = {"kv": pool_kv(keys, values, mask, cfg), "embedding": kv_embedding(keys, values, mask),
             "hidden": pool_hidden(out.hidden_states[1:], mask, cfg)}
    for name in ("kv", "embedding", "hidden"):
        one = torch.cat([s[name] for s in single])
        scale = one.abs().max()
        assert torch.allclose(left[name], one, atol=1e-4 * scale), name
        assert torch.allclose(right[name], one, atol=1e-4 * scale), name


def test_shipped_model_feature_dimensions(engine):
    cfg = PoolingConfig()
    c = engine.model.config
    feats = engine.prompt_features([engine.encode_prompt(QUESTIONS[0])], cfg, hidden=True)
    assert feats["kv"].shape == (1, cfg.dim(c.num_key_value_heads, c.head_dim))
    assert feats["embedding"].shape == (1, 2 * c.head_dim)
    assert feats["hidden"].shape == (1, c.hidden_size)
    assert float(feats["embedding"].norm()) == pytest.approx(1.0, abs=1e-5)
