"""``kvswitch eval`` with every policy, the CoE table, and the report's invariants."""

import json

import pytest

from serve_app.cli import main
from serve_app.core.task import TaskConfig, generate_problems, write_jsonl
from serve_app.offline.evaluate import POLICIES, EvalConfig, oracle_efficiency


@pytest.fixture(scope="module")
def report(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data = tmp / "mix.jsonl"
    write_jsonl(generate_problems(16, seed=515151, config=TaskConfig(min_operators=1, max_operators=3)), data)
    out = tmp / "r.json"
    rc = main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", ",".join(POLICIES),
               "--coe", "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())  # strict JSON: NaN would not parse back as a float here


def test_every_policy_is_reported(report):
    assert list(report["policies"]) == list(POLICIES)
    for name, pol in report["policies"].items():
        assert pol["n"] == 16 and len(pol["records"]) == 16
        assert {"accuracy", "mean_tokens", "by_operators", "token_reduction_vs_slow", "fast_fraction"} <= pol.keys(), name
        if name != "slow":
            assert "oracle_efficiency" in pol
    assert report["policies"]["oracle"]["oracle_efficiency"] == pytest.approx(1.0)
    assert report["policies"]["slow"]["token_reduction_vs_slow"] == pytest.approx(1.0)
    assert set(report["policies"]["kv-online"]["switches"]) == {"total", "slow_to_fast", "fast_to_slow"}


def test_oracle_and_random_are_built_from_the_same_replies(report):
    pols = report["policies"]
    fast, slow, oracle = pols["fast"]["records"], pols["slow"]["records"], pols["oracle"]["records"]
    for f, s, o in zip(fast, slow, oracle):
        assert o["correct"] == (f["correct"] or s["correct"])
        assert o["tokens"] == (f["tokens"] if f["correct"] else s["tokens"])
    assert pols["oracle"]["accuracy"] >= max(pols["fast"]["accuracy"], pols["slow"]["accuracy"])
    assert pols["random"]["fast_fraction"] == pytest.approx(pols["kv-oneshot"]["fast_fraction"])


def test_probe_auroc_per_feature_kind_and_routes(report):
    assert set(report["probe_auroc"]) == {"kv", "hidden", "minilm", "random"}
    kv = report["policies"]["kv-oneshot"]
    assert kv["feature"] == "kv" and kv["probe_auroc"] == report["probe_auroc"]
    tau = report["online"]["tau"]
    for name in ("kv-oneshot", "hidden-oneshot", "minilm-oneshot"):
        records = report["policies"][name]["records"]
        for r in records:
            assert r["route"] == ("slow" if r["difficulty"] > tau else "fast"), name
        # each policy is routed by its own head: one-operator questions (fast is right) go fast
        assert all(r["route"] == "fast" for r in records if r["operators"] == 1), name
    assert any(r["operators"] == 1 for r in kv["records"])


def test_coe_table_for_both_modes(report):
    for mode in ("fast", "slow"):
        table = report["coe"][mode]["table"]
        # every KV-CoE variant (token and layer axis, K / V / [K; V], all / thought / answer tokens) beside the baselines
        assert {"kv_token_kv_all_r", "kv_layer_kv_all_r", "kv_layer_k_answer_c", "kv_token_v_all_c", "hidden_coe_r", "hidden_coe_c",
                "maxprob", "perplexity", "entropy"} <= set(table)
        assert all({"auroc", "aupr", "fpr95"} <= set(row) for row in table.values())
        # with the direction learned when the probe was fitted, never on this set
        for name, row in table.items():
            if "sign" in row:
                assert row["sign"] in (1, -1)
                if row["auroc"] is None:  # one class in this mode (NaN is written as null)
                    assert row["auroc_directed"] is None
                else:
                    assert row["auroc_directed"] == pytest.approx(row["auroc"] if row["sign"] == 1 else 1 - row["auroc"])
        assert any("sign" in row for row in table.values())
        scores = report["coe"][mode]["scores"]
        assert len(scores["kv_layer_kv_all_r"]) == report["coe"][mode]["n"]
    conf = [r["confidence"] for r in report["policies"]["slow"]["records"]]
    assert all(0.0 <= c <= 1.0 for c in conf)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        EvalConfig(model="m", dataset="d", policies=["kv-oneshot", "always"])


def test_oracle_efficiency_formula():
    assert oracle_efficiency(t_slow=100, t_policy=40, t_oracle=30) == pytest.approx(60 / 70)
    assert oracle_efficiency(100, 100, 30) == 0.0
    assert oracle_efficiency(100, 20, 30) == pytest.approx(80 / 70)  # online switching can beat the mode oracle
    assert oracle_efficiency(100, 50, 100) is None


def test_batches_respect_rows_and_positions():
    from serve_app.offline.common import batches

    lengths = [50, 10, 30, 20, 500, 40]
    assert batches(lengths, batch_size=4) == [[1, 3, 2, 5], [0, 4]]
    groups = batches(lengths, batch_size=4, max_batch_tokens=90)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(len(g) * max(lengths[i] for i in g) <= 90 or len(g) == 1 for g in groups)
    assert [4] in groups  # longer than the bound: alone


def test_a_batch_memory_bound_changes_batches_not_replies(tmp_path, model_dir):
    """--max-batch-tokens splits the HF engine's batches by padded positions; the greedy replies,
    grades and token counts stay those of the row-count batches."""
    data = tmp_path / "q.jsonl"
    write_jsonl(generate_problems(12, seed=31, config=TaskConfig(max_operators=3)), data)
    reports = []
    for extra in ([], ["--max-batch-tokens", "1200"]):
        out = tmp_path / f"r{len(extra)}.json"
        assert main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "fast,slow", "--batch-size", "12", *extra,
                     "--out", str(out)]) == 0
        reports.append(json.loads(out.read_text())["policies"])
    for policy in ("fast", "slow"):
        assert [(r["output"], r["tokens"]) for r in reports[0][policy]["records"]] == [(r["output"], r["tokens"]) for r in reports[1][policy]["records"]]
    with pytest.raises(SystemExit, match="vLLM bounds its own cache"):
        main(["eval", "--dataset", str(data), "--engine", "vllm", "--max-batch-tokens", "100"])
