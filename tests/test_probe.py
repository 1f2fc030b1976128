"""Labels, the probe checkpoint (model binding, refusal of a mismatch), training, calibration."""

import json

import pytest
import torch
from transformers import AutoConfig

from serve_app.cli import main
from serve_app.core.probe import LabelConfig, Probe, ProbeMismatchError, difficulty_label, model_fingerprint
from serve_app.core.task import TaskConfig, generate_problems, write_jsonl
from serve_app.engines.hf import HFEngine
from serve_app.offline.calibrate import CalibrateConfig, calibrate, split_questions
from serve_app.offline.probe_train import TrainProbeConfig, random_features, train_regressor


def test_difficulty_labels():
    cfg = LabelConfig(short_tokens=10)
    assert difficulty_label(True, 9, True, cfg) == 0  # fast right and short
    assert difficulty_label(True, 10, False, cfg) == 25  # fast right but long
    assert difficulty_label(False, 3, True, cfg) == 75  # only slow right
    assert difficulty_label(False, 3, False, cfg) == 100  # both wrong
    assert LabelConfig().short_tokens == 128  # the paper's default for real reasoning models


def test_fingerprint_ignores_bookkeeping_but_not_architecture(model_dir):
    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    base = model_fingerprint(cfg)
    d = cfg.to_dict()
    assert model_fingerprint({**d, "transformers_version": "0.0", "dtype": "bfloat16"}) == base
    assert model_fingerprint({**d, "num_hidden_layers": d["num_hidden_layers"] + 1}) != base


def test_train_regressor_learns_a_signal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    y = 50 + 20 * x[:, 0]  # difficulty carried by one of six coordinates
    reg, info = train_regressor(x[:300], y[:300], x[300:350], y[300:350], TrainProbeConfig(epochs=100, patience=20, batch_size=32))
    with torch.no_grad():
        mse = float(((reg(x[350:]) - y[350:]) ** 2).mean())
    assert mse < 0.1 * float(y.var())  # a constant predictor scores 1.0
    assert info["epochs"] >= 1


def test_split_is_disjoint_by_question():
    qs = ["a", "b", "a", "c", "d", "b", "e", "f"]
    train, val = split_questions(qs, 0.25, seed=0)
    assert sorted(train + val) == list(range(len(qs)))
    assert not {qs[i] for i in train} & {qs[i] for i in val}


def test_random_features_carry_no_information_but_are_stable():
    a = random_features(["x", "y", "x"], 16, seed=1)
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], random_features(["x"], 16, seed=2)[0])


# ------------------------------------------------------------------ the shipped, calibrated probe


def test_shipped_probe_matches_the_shipped_model(model_dir, shipped):
    probe = Probe.load(model_dir / "probe.pt", shipped[0].config)
    assert {"kv", "kv-decode", "hidden", "minilm", "random"} <= set(probe.heads)
    assert probe.data["model_fingerprint"] == model_fingerprint(shipped[0].config)
    assert probe.labels.short_tokens >= 1 and probe.data["label_rule"]
    assert {"tau", "delta", "every"} <= set(probe.thresholds)
    for kind in ("kv", "hidden", "minilm", "random", "kv-decode"):
        assert 0.0 <= probe.data["heads"][kind]["metrics"]["val_auroc"] <= 1.0
    assert set(probe.confidence) == {"fast", "slow"}


def test_shipped_probe_separates_easy_from_hard(model_dir, shipped):
    probe = Probe.load(model_dir / "probe.pt", shipped[0].config)
    engine = HFEngine(*shipped)
    easy = ["What is 4 + 5?", "What is 70 - 3?", "What is 12 + 12?"]
    hard = ["What is 4 + 5 - 6 + 7?", "What is 70 - 3 + 9 - 1 + 2?", "What is 12 + 12 - 40 + 8 - 9 + 1?"]
    feats = engine.prompt_features([engine.encode_prompt(q) for q in easy + hard], probe.pooling)
    d = probe.prompt_difficulty(feats["kv"]).tolist()
    tau = probe.thresholds["tau"]
    assert all(x <= tau for x in d[:3]) and all(x > tau for x in d[3:]), d


def test_mismatched_probe_is_refused(model_dir, shipped, tmp_path):
    probe = Probe.load(model_dir / "probe.pt")
    other = shipped[0].config.to_dict()
    other["num_hidden_layers"] += 2
    with pytest.raises(ProbeMismatchError, match="recalibrate"):
        probe.check_model(other)
    probe.save(tmp_path / "p.pt")
    with pytest.raises(ProbeMismatchError):
        Probe.load(tmp_path / "p.pt", other)
    with pytest.raises(FileNotFoundError, match="kvswitch calibrate"):
        Probe.load(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a kvswitch probe"):
        Probe.load(tmp_path / "bad.pt")


def test_calibrate_end_to_end_on_a_small_set(model_dir, tmp_path):
    """The real pipeline, shrunk: both modes, labels, every head, decode head, confidence, checkpoint."""
    data = tmp_path / "cal.jsonl"
    write_jsonl(generate_problems(40, seed=424242, config=TaskConfig(min_operators=1, max_operators=3)), data)
    cfg = CalibrateConfig(
        model=str(model_dir), dataset=str(data), out=str(tmp_path / "probe.pt"), features=["kv", "hidden", "random"],
        decode_points_per_question=2, train=TrainProbeConfig(epochs=20, patience=5), max_new_tokens=400,
    )
    report = calibrate(cfg)
    assert report["n_train"] + report["n_val"] == 40
    assert set(report["features"]) == {"kv", "hidden", "random", "kv-decode"}
    probe = Probe.load(cfg.out, AutoConfig.from_pretrained(model_dir, local_files_only=True))
    assert probe.labels.short_tokens >= 4 and "median slow tokens" in probe.data["label_rule"]
    assert probe.data["calibration"]["dataset"] == str(data)
    assert probe.data["calibration"]["grader"] == "number" == probe.grader  # eval and serving default to it
    val_q = set(probe.data["calibration"]["val_questions"])
    assert 0 < len(val_q) < 40
    # eval's length-oneshot peer: a prompt-length threshold fitted on the training split, used when no L is given
    assert isinstance(probe.data["length_threshold"], int)
    from serve_app.offline.peers import length_threshold

    assert length_threshold("length-oneshot", probe) == probe.data["length_threshold"] and length_threshold("length-oneshot:7", probe) == 7


def test_calibrate_cli_writes_probe_and_report(model_dir, tmp_path, capsys):
    data = tmp_path / "cal.jsonl"
    write_jsonl(generate_problems(24, seed=434343, config=TaskConfig(min_operators=1, max_operators=2)), data)
    rc = main(["calibrate", "--model", str(model_dir), "--dataset", str(data), "--out", str(tmp_path / "p.pt"),
               "--report", str(tmp_path / "r.json"), "--features", "kv,random", "--last-tokens", "8", "--token", "mean"])
    assert rc == 0
    probe = Probe.load(tmp_path / "p.pt")
    assert probe.pooling.last_tokens == 8 and probe.pooling.token == "mean"
    assert json.loads((tmp_path / "r.json").read_text())["n_questions"] == 24
    assert "val AUROC" in capsys.readouterr().out
