"""Simulated KV quantization: the quantizers' error bounds, the precision map, and the engine
quantizing only the cache columns it has just written."""

import json

import pytest
import torch

from serve_app.cli import main
from serve_app.core.kv_features import PoolingConfig, cache_kv, pool_kv
from serve_app.core.quant import (
    FULL_PRECISION,
    GRANULARITIES,
    KVQuantConfig,
    absmax_scale,
    parse_kv_bits,
    parse_kv_quant,
    qmax,
    quantize,
    quantize_cache,
)
from serve_app.core.task import TaskConfig, generate_problems, write_jsonl
from serve_app.engines.base import GenRequest
from serve_app.engines.hf import DecodeBatch, HFEngine


def _known(seed: int = 0) -> torch.Tensor:
    """[batch 2, heads 2, tokens 6, channels 8] with a few large outliers, like real keys."""
    t = torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(seed))
    t[0, 1, 2, 3] = 9.0
    t[1, 0, 5, 0] = -7.5
    return t


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_error_is_at_most_half_a_step_of_its_group(granularity, bits):
    t = _known()
    q = quantize(t, bits, granularity)
    scale = absmax_scale(t, bits, granularity)
    assert q.dtype == t.dtype and q.shape == t.shape
    assert torch.all((q - t).abs() <= scale / 2 + 1e-6)
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the grid
    assert levels.abs().max() <= qmax(bits) + 1e-4


def test_a_hand_worked_int4_row():
    t = torch.tensor([1.0, 0.55, -0.3, 0.7, 0.0, -1.0, 0.1, 0.2]).view(1, 1, 1, 8)
    step = 1.0 / 7  # absmax 1, int4 levels -7..7
    expected = torch.tensor([7, 4, -2, 5, 0, -7, 1, 1]) * step  # 0.55 * 7 = 3.85 -> 4, 0.2 * 7 = 1.4 -> 1
    assert torch.allclose(quantize(t, 4, "per-token").flatten(), expected, atol=1e-7)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_values_on_the_grid_come_back_exactly(granularity, bits):
    q, step = qmax(bits), 0.25
    levels = torch.randint(-q, q + 1, (2, 2, 5, 4), generator=torch.Generator().manual_seed(1))
    levels[..., 0, :] = q  # every group reaches absmax = q * step, whatever the granularity
    levels[..., :, 0] = -q
    t = levels.float() * step
    assert torch.equal(quantize(t, bits, granularity), t)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zeros_stay_zero_and_an_all_zero_group_gives_no_nan(granularity):
    t = _known()
    t[:, :, :, 2] = 0.0  # a zero channel
    t[:, :, 4, :] = 0.0  # a zero token
    t[1] = 0.0  # a whole zero row
    q = quantize(t, 4, granularity)
    assert torch.isfinite(q).all()
    assert torch.all(q[t == 0] == 0)


def test_more_bits_less_error():
    t = _known(3)
    for granularity in GRANULARITIES:
        err = {b: (quantize(t, b, granularity) - t).abs().mean() for b in (8, 4, 2)}
        assert err[8] < err[4] < err[2], granularity


def test_finer_groups_do_not_let_one_outlier_swamp_the_rest():
    t = _known()
    err = {g: (quantize(t, 4, g) - t).abs().mean() for g in GRANULARITIES}
    assert err["per-token"] < err["per-tensor"] and err["per-channel"] < err["per-tensor"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_batch_rows_never_share_a_scale(granularity):
    a, b = _known(4)[:1], 100 * _known(5)[:1]
    joint = quantize(torch.cat([a, b]), 4, granularity)
    assert torch.equal(joint[:1], quantize(a, 4, granularity))


def test_full_precision_is_identity_and_bad_widths_are_refused():
    t = _known()
    assert torch.equal(quantize(t, FULL_PRECISION, "per-token"), t)
    for bits in (0, 1, 9, 32):
        with pytest.raises(ValueError, match="bits"):
            quantize(t, bits, "per-token")
    with pytest.raises(ValueError, match="granularity"):
        quantize(t, 4, "per-row")
    with pytest.raises(ValueError, match="cache tensor"):
        quantize(t[0], 4, "per-token")


# ------------------------------------------------------------------------------ precision map


def test_inline_specs_and_the_layer_map():
    assert parse_kv_quant("fp") is None
    assert parse_kv_bits("k8v4") == (8, 4)
    cfg = parse_kv_quant("K4V2@0-1=K8V4;3=k8v8")
    assert (cfg.key_bits, cfg.value_bits, cfg.granularity) == (4, 2, "per-token")
    assert cfg.layers == {0: "K8V4", 1: "K8V4", 3: "K8V8"}
    assert [cfg.bits(i) for i in range(4)] == [(8, 4), (8, 4), (4, 2), (8, 8)]
    assert parse_kv_quant(cfg.name) == cfg
    assert parse_kv_quant("K16V4/per-channel").bits(0) == (16, 4)


@pytest.mark.parametrize("spec", ["K9V4", "K8", "8/4", "K8V4/per-row", "K8V4@0=K1V4", "K8V4@x=K8V8", "K8V4@2-1=K8V8", "K8V4@0"])
def test_malformed_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_kv_quant(spec)


def test_layer_map_from_a_config_file(tmp_path):
    (tmp_path / "q.yaml").write_text("key_bits: 4\nvalue_bits: 2\ngranularity: per-channel\nlayers:\n  0: K8V4\n  1: K8V4\n")
    (tmp_path / "q.json").write_text(json.dumps({"key_bits": 4, "value_bits": 2, "granularity": "per-channel", "layers": {"0": "K8V4", "1": "K8V4"}}))
    assert parse_kv_quant(str(tmp_path / "q.yaml")) == parse_kv_quant(str(tmp_path / "q.json")) == parse_kv_quant("K4V2/per-channel@0-1=K8V4")
    with pytest.raises(FileNotFoundError):
        parse_kv_quant(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match=">= 0"):
        KVQuantConfig(layers={-1: "K8V8"})


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _Cache:
    def __init__(self, n_layers: int, seed: int = 0):
        self.layers = [_Layer(_known(seed + 2 * i), _known(seed + 2 * i + 1)) for i in range(n_layers)]


def test_quantize_cache_applies_each_layers_bits_and_checks_the_map():
    cache, ref = _Cache(2), _Cache(2)
    quantize_cache(cache, parse_kv_quant("K4V4@1=K16V2"))
    assert torch.equal(cache.layers[0].keys, quantize(ref.layers[0].keys, 4, "per-token"))
    assert torch.equal(cache.layers[0].values, quantize(ref.layers[0].values, 4, "per-token"))
    assert torch.equal(cache.layers[1].keys, ref.layers[1].keys)  # K16: untouched
    assert torch.equal(cache.layers[1].values, quantize(ref.layers[1].values, 2, "per-token"))
    with pytest.raises(ValueError, match="layers \\[5\\]"):
        quantize_cache(_Cache(2), parse_kv_quant("K4V4@5=K8V8"))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_padding_is_left_alone_and_kept_out_of_the_scales(granularity):
    cache, ref = _Cache(1), _Cache(1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # row 0 left-padded by two positions holding huge junk
    cache.layers[0].keys[0, :, :2] = 1e6
    quantize_cache(cache, KVQuantConfig(key_bits=4, value_bits=16, granularity=granularity), mask)
    keys = cache.layers[0].keys
    assert torch.all(keys[0, :, :2] == 1e6)
    assert torch.equal(keys[0:1, :, 2:], quantize(ref.layers[0].keys[0:1, :, 2:], 4, granularity))


# ------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def engine(shipped):
    return HFEngine(*shipped)


def test_engine_quantizes_only_the_columns_it_just_wrote(engine):
    """Per-channel scales grow as values arrive (running absmax), yet no stored column is ever
    re-quantized; zero columns from a left-padded merge stay zero; each new column is on its grid."""
    quant = parse_kv_quant("K4V4/per-channel")
    batch = DecodeBatch(engine, kv_quant=quant)
    batch.add([GenRequest(engine.encode_prompt("What is 41 - 17 + 8 - 60 + 5 + 12?"), mode="slow", max_new_tokens=40)])
    batch.add([GenRequest(engine.encode_prompt("What is 2 + 3?"), mode="slow", max_new_tokens=40)])  # left-padded merge
    assert (batch.mask[1] == 0).any()
    for _ in range(6):
        zero_cols = batch.mask[1] == 0
        before = [(layer.keys.clone(), layer.values.clone()) for layer in batch.cache.layers]
        width = batch.mask.shape[1]
        batch.step()
        for i, ((k0, v0), layer) in enumerate(zip(before, batch.cache.layers)):
            assert torch.equal(layer.keys[:, :, :width], k0) and torch.equal(layer.values[:, :, :width], v0)
            for t in (layer.keys, layer.values):
                assert torch.all(t[1, :, :width][:, zero_cols] == 0)
                levels = t[:, :, width:] / absmax_scale(t, 4, "per-channel", batch.mask)
                assert torch.allclose(levels, levels.round(), atol=1e-3), f"layer {i}: new column off the grid"


def test_engine_quantizes_the_prefill_before_pooling(engine):
    """Features come from the quantized prefill cache: equal to quantizing the fp cache, and
    different from full precision."""
    ids = [engine.encode_prompt(q) for q in ("What is 2 + 3?", "What is 41 - 17 + 8?")]
    quant = parse_kv_quant("K2V2/per-tensor")
    cache, mask, _, _ = engine.prefill(ids)
    quantize_cache(cache, quant, mask)
    got = engine.prompt_features(ids, PoolingConfig(), kv_quant=quant)
    fp = engine.prompt_features(ids, PoolingConfig())
    assert torch.allclose(got["kv"], pool_kv(*cache_kv(cache), mask, PoolingConfig()))
    assert not torch.allclose(got["kv"], fp["kv"], atol=1e-3)


def test_eval_kv_quant_reaches_generation(model_dir, tmp_path):
    """int2 per-tensor KV breaks the fast replies that full precision gets right; the report names it."""
    data = tmp_path / "one-op.jsonl"
    write_jsonl(generate_problems(6, seed=626262, config=TaskConfig(min_operators=1, max_operators=1)), data)
    reports = {}
    for spec in ("fp", "K2V2/per-tensor"):
        out = tmp_path / f"{spec.replace('/', '-')}.json"
        assert main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "fast", "--kv-quant", spec, "--out", str(out)]) == 0
        reports[spec] = json.loads(out.read_text())
    assert reports["fp"]["kv_quant"] is None and reports["K2V2/per-tensor"]["kv_quant"] == "K2V2/per-tensor"
    assert reports["K2V2/per-tensor"]["command"].startswith("kvswitch eval ")
    assert reports["fp"]["policies"]["fast"]["accuracy"] == 1.0
    assert reports["K2V2/per-tensor"]["policies"]["fast"]["accuracy"] < 0.5


def test_quant_report_table_and_key_value_sensitivity(model_dir, tmp_path):
    data = tmp_path / "mix.jsonl"
    write_jsonl(generate_problems(6, seed=646464, config=TaskConfig(min_operators=1, max_operators=2)), data)
    out = tmp_path / "q.json"
    assert main(["quant-report", "--model", str(model_dir), "--dataset", str(data), "--settings", "K4V16,K16V4", "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("kvswitch quant-report ")
    assert [e["setting"] for e in report["settings"]] == ["fp", "K4V16/per-token", "K16V4/per-token"]  # fp first, always
    for e in report["settings"]:
        (cell,) = e["probes"].values()
        assert {"probe_auroc", "kv_coe_auroc_fast", "kv_coe_auroc_routed"} <= set(cell)
        assert 0 <= cell["routed"]["accuracy"] <= 1 and cell["routed"]["mean_tokens"] > 0
    (sens,) = report["sensitivity"]
    assert sens["bits"] == 4 and set(sens["keys_only_drop"]) == {"probe_auroc", "routed_accuracy", "kv_coe_auroc_fast"}
