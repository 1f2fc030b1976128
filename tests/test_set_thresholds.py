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
