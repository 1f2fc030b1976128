"""``kvswitch set-thresholds``: dev-chosen τ / δ go into a copy of the shipped probe, with their source;
nothing else in the checkpoint changes, and inconsistent sweeps are refused."""

import json
import shutil

import pytest
import torch

from serve_app.cli import main
from serve_app.core.probe import Probe
from serve_app.offline.thresholds_cli import dev_thresholds


def _sweep(path, family, knob, online_tau=50.0):
    report = {"online": {"tau": online_tau, "delta": 45.0}, "sweep": {"matched": {"best": {family: {"knob": knob, "accuracy": 0.99}}}}}
    path.write_text(json.dumps(report))
    return path


@pytest.fixture
def probe_copy(model_dir, tmp_path):
    path = tmp_path / "probe.pt"
    shutil.copy(model_dir / "probe.pt", path)
    return path


def test_thresholds_from_dev_sweeps_land_in_the_probe(probe_copy, tmp_path, capsys):
    before = Probe.load(probe_copy)
    tau = _sweep(tmp_path / "tau.json", "kv-oneshot", 30)
    delta = _sweep(tmp_path / "delta.json", "kv-online", 5, online_tau=30.0)
    assert main(["set-thresholds", "--probe", str(probe_copy), "--from", str(tau), str(delta)]) == 0
    after = Probe.load(probe_copy)
    assert (after.thresholds["tau"], after.thresholds["delta"]) == (30.0, 5.0)
    assert after.thresholds["every"] == before.thresholds["every"] and after.thresholds["confirm"] == before.thresholds["confirm"]
    src = after.data["thresholds_source"]
    assert src["from"] == [str(tau), str(delta)] and src["previous"] == before.thresholds and src["set"] == {"tau": 30.0, "delta": 5.0}
    for kind in before.heads:  # the heads are untouched
        x = torch.randn(3, before.heads[kind].in_dim)
        assert torch.equal(before.predict(kind, x), after.predict(kind, x))
    assert after.online_config().tau == 30.0  # what eval and serving now default to
    assert "wrote" in capsys.readouterr().out


def test_explicit_values_override_and_out_leaves_the_source_alone(probe_copy, tmp_path, capsys):
    original = probe_copy.read_bytes()
    out = tmp_path / "other.pt"
    tau = _sweep(tmp_path / "tau.json", "kv-oneshot", 30)
    assert main(["set-thresholds", "--probe", str(probe_copy), "--from", str(tau), "--tau", "20", "--delta", "45", "--out", str(out)]) == 0
    assert probe_copy.read_bytes() == original
    assert Probe.load(out).thresholds["tau"] == 20.0
    assert "slow -> fast never fires" in capsys.readouterr().err  # 20 - 45 < 0


def test_a_delta_swept_at_another_tau_is_refused(tmp_path):
    tau = _sweep(tmp_path / "tau.json", "kv-oneshot", 30)
    delta = _sweep(tmp_path / "delta.json", "kv-online", 5, online_tau=50.0)
    with pytest.raises(ValueError, match="δ sweep ran at τ 50"):
        dev_thresholds([tau, delta])
    (tmp_path / "plain.json").write_text(json.dumps({"policies": {}}))
    with pytest.raises(ValueError, match="holds no sweep"):
        dev_thresholds([tmp_path / "plain.json"])
    with pytest.raises(SystemExit, match="nothing to set"):
        main(["set-thresholds", "--probe", str(tmp_path / "p.pt")])


def _eval_report(path, difficulty, slow_tokens, fast_tokens, policies=("fast", "slow", "kv-oneshot")):
    questions = [f"What is {i} + 1?" for i in range(len(difficulty))]
    rec = {"fast": [{"question": q, "tokens": t} for q, t in zip(questions, fast_tokens)],
           "slow": [{"question": q, "tokens": t} for q, t in zip(questions, slow_tokens)],
           "kv-oneshot": [{"question": q, "tokens": 3, "difficulty": d} for q, d in zip(questions, difficulty)]}
    path.write_text(json.dumps({"policies": {p: {"records": rec[p]} for p in policies}}))
    return path


def test_a_token_map_fitted_on_a_dev_eval_lands_in_the_probe_and_in_the_served_policy(probe_copy, tmp_path, capsys):
    from serve_app.app import with_token_map
    from serve_app.config import AppConfig

    before = Probe.load(probe_copy)
    report = _eval_report(tmp_path / "dev.json", [0, 25, 75, 100], [200, 300, 500, 600], [3, 5, 4, 4])
    assert main(["set-thresholds", "--probe", str(probe_copy), "--token-map-from", str(report)]) == 0
    after = Probe.load(probe_copy)
    assert after.token_map == pytest.approx({"fast_tokens": 4.0, "slow_tokens_min": 200.0, "slow_tokens_max": 600.0})
    assert after.thresholds == before.thresholds and after.data.get("thresholds_source") == before.data.get("thresholds_source")
    assert after.data["token_map"]["questions"] == 4 and after.data["token_map"]["from"] == str(report)
    assert "slow 200 at difficulty 0 to 600 at 100" in capsys.readouterr().out
    served = with_token_map(AppConfig(probe=str(probe_copy)), after).policy  # nothing set: the probe's map
    assert (served.fast_tokens, served.slow_tokens_min, served.slow_tokens_max) == pytest.approx((4.0, 200.0, 600.0))
    own = with_token_map(AppConfig(probe=str(probe_copy), policy={"slow_tokens_max": 900}), after).policy
    assert own.slow_tokens_max == 900 and own.slow_tokens_min == pytest.approx(200.0)  # what the config sets wins
    with pytest.raises(ValueError, match="slow_tokens_max"):
        with_token_map(AppConfig(probe=str(probe_copy), policy={"slow_tokens_min": 700}), after)


def test_a_token_map_needs_fast_slow_and_a_difficulty_policy(tmp_path):
    from serve_app.offline.thresholds_cli import dev_token_map

    report = _eval_report(tmp_path / "dev.json", [0, 100], [200, 600], [3, 3], policies=("fast", "slow"))
    with pytest.raises(ValueError, match="missing one of kv-oneshot"):
        dev_token_map(report)


def test_the_default_deployment_predicts_load_with_the_shipped_probes_token_map(model_dir):
    from serve_app.app import _with_probe
    from serve_app.config import AppConfig

    fitted = Probe.load(model_dir / "probe.pt").token_map
    assert fitted is not None and fitted["slow_tokens_max"] > fitted["slow_tokens_min"] > 0  # fitted on dev-mix70 (README)
    policy = _with_probe(AppConfig(model=str(model_dir), probe=str(model_dir / "probe.pt")))[0].policy
    assert {k: getattr(policy, k) for k in fitted} == pytest.approx(fitted)
