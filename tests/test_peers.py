"""The peer policies (issue 21): the rules on hand-checkable cases, the HF engine's side branches
on the shipped model, and ``kvswitch eval`` running them."""

import json

import pytest

from serve_app.core.early_exit import EarlyExit, answers_agree, confident, parse_exit, probe_due, should_exit, split_policies
from serve_app.core.policy import fit_length_threshold, length_route
from serve_app.core.task import TaskConfig, generate_problems
from serve_app.offline import peers
from serve_app.offline.sweep import chosen_table, with_dev_knobs


def test_policy_names_parse_with_defaults_and_clear_errors():
    assert parse_exit("dynasor") == EarlyExit("dynasor", every=32, window=3)
    assert parse_exit("dynasor:16") == EarlyExit("dynasor", every=16)
    assert parse_exit("dynasor:16,2").window == 2 and parse_exit("deer:0.9").threshold == 0.9
    assert parse_exit("deer").label == "deer:0.95" and parse_exit("dynasor:8,4").label == "dynasor:8,4"
    for bad in ("dynasor:x", "dynasor:0", "dynasor:1,2,3", "deer:1.5", "deer:0", "deer:a,b", "budget:5"):
        with pytest.raises(ValueError):
            parse_exit(bad)
    assert peers.check("budget:64") == "budget:64" and peers.check("length-oneshot") and peers.check("length-oneshot:30")
    for bad in ("budget", "budget:0", "budget:x", "length-oneshot:x", "dynasor:-1"):
        with pytest.raises(ValueError):
            peers.check(bad)
    assert split_policies("slow,dynasor:16,3,deer:0.9,budget:64,length-oneshot") == ["slow", "dynasor:16,3", "deer:0.9", "budget:64",
                                                                                       "length-oneshot"]


def test_budget_caps_the_thought_and_respects_a_tighter_global_cap():
    assert peers.request_options("budget:64", None) == {"mode": "slow", "max_thinking_tokens": 64}
    assert peers.request_options("budget:64", 40)["max_thinking_tokens"] == 40
    assert peers.request_options("dynasor:8,2", None)["early_exit"] == EarlyExit("dynasor", every=8, window=2)


def test_dynasor_probes_every_k_thinking_tokens_and_exits_on_a_full_window():
    rule = EarlyExit("dynasor", every=16, window=3)
    assert [t for t in range(1, 70) if probe_due(rule, t, ends_line=False)] == [16, 32, 48, 64]
    assert not probe_due(rule, 0, ends_line=True)
    assert not answers_agree(["7", "7"], 3)  # not yet three answers
    assert answers_agree(["5", "7", "7", "7"], 3)
    assert not answers_agree(["7", "8", "7"], 3)
    assert not answers_agree([None, None, None], 3)  # unfinished answers never agree
    assert should_exit(rule, ["1", "7", "7", "7"], []) and not should_exit(rule, ["7", "7", "1"], [])


def test_deer_probes_at_line_ends_and_exits_above_the_threshold():
    rule = EarlyExit("deer", threshold=0.9)
    assert probe_due(rule, 5, ends_line=True) and not probe_due(rule, 5, ends_line=False)
    assert confident([0.95, 0.9, 0.92], 0.9)  # mean 0.9233
    assert not confident([0.99, 0.8], 0.9)  # mean 0.895
    assert not confident([], 0.5)
    assert should_exit(rule, ["12"], [0.99]) and not should_exit(rule, [None], [0.99]) and not should_exit(rule, ["12"], [0.5])


def test_the_length_rule_and_its_fit():
    assert length_route(30, 30) == "fast" and length_route(31, 30) == "slow"
    # short prompts are fast enough, long ones are not: the best cut lies between 20 and 30
    assert fit_length_threshold([10, 20, 30, 40], [True, True, False, False]) == 20
    assert fit_length_threshold([10, 20, 30, 40], [False, False, False, False]) == 9  # everything slow
    assert fit_length_threshold([10, 20, 30], [True, True, True]) == 30
    assert fit_length_threshold([10, 20, 30, 40], [True, False, True, False]) == 10  # ties: the smallest
    with pytest.raises(ValueError):
        fit_length_threshold([], [])


@pytest.fixture(scope="module")
def engine(shipped):
    from serve_app.engines.hf import HFEngine

    return HFEngine(*shipped)


@pytest.fixture(scope="module")
def prompts(engine):
    problems = generate_problems(5, seed=2112, config=TaskConfig(min_operators=2, max_operators=4))
    return [engine.encode_prompt(p.question) for p in problems], problems


def _slow(prompts, **kw):
    from serve_app.engines.base import GenRequest

    return [GenRequest(p, mode="slow", max_new_tokens=768, **kw) for p in prompts]


def test_side_branches_leave_the_reply_untouched_and_answer_like_a_real_close(engine, prompts):
    """A rule that never fires probes every 16 thinking tokens: the replies are token for token the
    plain slow ones, every probe is counted apart, and the answer probed after 16 thinking tokens is
    what the main branch writes when a 16-token thinking budget closes the thought there: the same
    answer, or, where that close is not followed by an answer and EOS within the probe's
    ``max_answer_tokens`` (v2 stage 9 sometimes goes on working after a close in mid-line), no answer."""
    ids, problems = prompts
    rule = EarlyExit("dynasor", every=16, window=10_000)
    plain = engine.generate(_slow(ids))
    probed = engine.generate(_slow(ids, early_exit=rule))
    budget = engine.generate(_slow(ids, max_thinking_tokens=16))
    answered = 0
    for a, b, c, p in zip(plain, probed, budget, problems):
        assert b.token_ids == a.token_ids and b.tokens == a.tokens and b.exited_at is None
        think = a.text.index("</think>")
        assert len(b.probe_answers) == len(engine.tokenizer.encode(a.text[:think], add_special_tokens=False)) // 16
        assert b.probe_tokens >= len(b.probe_answers) * (len(engine.switch_ids["fast"]) + 1)
        close = engine.tokenizer.decode(engine.switch_ids["fast"])  # "</think>\n\n", forced by the budget
        after = c.text[c.text.index(close) + len(close):]  # what the main branch wrote after it
        if after.count("<|im_end|>") and len(engine.tokenizer.encode(after.split("<|im_end|>")[0], add_special_tokens=False)) < rule.max_answer_tokens:
            assert b.probe_answers[0] == after.split("<|im_end|>")[0].strip()
            answered += 1
        else:
            assert b.probe_answers[0] is None
        assert b.probe_answers[-1] == str(p.answer)  # at the end of the thought the probe reads the answer
    assert answered >= 2  # most closes after 16 tokens are answered at once


def test_early_exits_close_the_thought_where_their_rule_fires(engine, prompts):
    ids, _ = prompts
    for rule in (EarlyExit("dynasor", every=16, window=2), EarlyExit("deer", threshold=0.9)):
        for r in engine.generate(_slow(ids, early_exit=rule)):
            assert r.exited_at is not None and r.end_mode == "fast" and r.finished
            assert r.text.count("</think>") == 1 and r.text.endswith("<|im_end|>")
            assert should_exit(rule, r.probe_answers[:len(r.probe_answers)], [1.0])
            if rule.kind == "dynasor":
                assert r.exited_at % 16 == 0 and r.probe_answers[-1] == r.probe_answers[-2]
            else:
                assert r.text[:r.text.index("</think>")].endswith("\n")  # at a step boundary


def test_budget_cut_position(engine, prompts):
    ids, _ = prompts
    for r in engine.generate(_slow(ids, max_thinking_tokens=24)):
        thought = r.text[:r.text.index("</think>")]
        assert len(engine.tokenizer.encode(thought, add_special_tokens=False)) == 24 and r.thinking_capped


def test_vllm_refuses_early_exit_with_a_clear_error():
    from serve_app.engines.base import GenRequest
    from serve_app.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine.__new__(VLLMEngine)
    with pytest.raises(ValueError, match="side branches"):
        agen = eng.stream(GenRequest([1], mode="slow", early_exit=EarlyExit("deer")))
        import asyncio

        asyncio.run(agen.__anext__())


def test_eval_runs_the_peers_and_reports_probe_tokens(tmp_path, model_dir):
    from serve_app.cli import main
    from serve_app.core.task import write_jsonl

    data = tmp_path / "q.jsonl"
    write_jsonl(generate_problems(8, seed=77, config=TaskConfig(max_operators=3)), data)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "fast,slow,budget:24,dynasor:16,2,deer:0.9,length-oneshot:30",
                 "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    pol = rep["policies"]
    assert set(pol) == {"fast", "slow", "budget:24", "dynasor:16,2", "deer:0.9", "length-oneshot:30"}
    assert all(r["end_mode"] == "fast" for r in pol["budget:24"]["records"] if r["tokens"] > 30)
    for name in ("dynasor:16,2", "deer:0.9"):
        e = pol[name]
        assert e["mean_tokens_with_probes"] == pytest.approx(e["mean_tokens"] + e["mean_probe_tokens"]) and e["mean_probe_tokens"] > 0
        assert e["exits"] == sum(r["exited_at"] is not None for r in e["records"])
    lengths = {r["question"]: r for r in pol["length-oneshot:30"]["records"]}
    assert rep["thresholds"] == {"length-oneshot:30": 30}
    assert {r["route"] for r in lengths.values()} <= {"fast", "slow"}
    with pytest.raises(ValueError, match="side branches"):
        main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "slow,deer", "--engine", "vllm"])
    # a bare length-oneshot takes the L the probe's calibration fitted; a probe calibrated before L was
    # fitted (no length_threshold) is refused with a clear message
    import torch

    old = torch.load(model_dir / "probe.pt", weights_only=False)
    assert main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "length-oneshot", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["thresholds"] == {"length-oneshot": int(old["length_threshold"])}
    del old["length_threshold"]
    torch.save(old, tmp_path / "old-probe.pt")
    with pytest.raises(ValueError, match="length-oneshot:L"):
        main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "length-oneshot", "--probe", str(tmp_path / "old-probe.pt")])


def test_sweep_grids_table_and_deciles():
    from serve_app.offline.sweep import DEFAULT_GRIDS, deciles, format_matched, matched_table, parse_grids

    assert parse_grids(None) == DEFAULT_GRIDS and parse_grids("default") == DEFAULT_GRIDS
    g = parse_grids("budget=16,48;deer=0.9;dynasor=8/2")
    assert g["budget"] == [16, 48] and g["deer"] == [0.9] and g["dynasor"] == ["8/2"] and g["kv-oneshot"] == DEFAULT_GRIDS["kv-oneshot"]
    for bad in ("nope=1", "budget=", "budget=x"):
        with pytest.raises(ValueError):
            parse_grids(bad)
    assert deciles(list(range(10, 111))) == [9, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110]
    curves = {"kv-online": [{"knob": 45, "accuracy": 0.97, "mean_tokens": 100.0}, {"knob": 5, "accuracy": 0.99, "mean_tokens": 200.0}],
              "budget": [{"knob": 64, "accuracy": 0.985, "mean_tokens": 150.0}, {"knob": 16, "accuracy": 0.5, "mean_tokens": 20.0}],
              "deer": [{"knob": 0.9, "accuracy": 0.6, "mean_tokens": 30.0}],
              "dynasor": [{"knob": "16/2", "accuracy": 0.99, "mean_tokens": 90.0, "mean_tokens_with_probes": 190.0},
                          {"knob": "32/3", "accuracy": 0.985, "mean_tokens": 120.0, "mean_tokens_with_probes": 160.0}]}
    t = matched_table(curves, slow_accuracy=0.99)  # target 0.98
    assert t["target_accuracy"] == pytest.approx(0.98)
    assert t["best"]["kv-online"]["knob"] == 5 and t["best"]["budget"]["knob"] == 64 and t["best"]["deer"] is None
    assert t["best"]["budget"]["tokens_vs_kv_online"] == pytest.approx(0.75)
    # probe tokens count: 32/3 costs 160 with its side branches, 16/2 190, though 16/2's reply is shorter
    assert t["best"]["dynasor"]["knob"] == "32/3" and t["best"]["dynasor"]["tokens_with_probes_vs_kv_online"] == pytest.approx(0.8)
    assert t["best"]["dynasor"]["tokens_vs_kv_online"] == pytest.approx(0.6)
    assert "32/3" in format_matched({"matched": t}) and "0.80x" in format_matched({"matched": t})


def test_eval_sweep_writes_curves_table_and_frontier(tmp_path, model_dir):
    from serve_app.cli import main
    from serve_app.core.task import write_jsonl

    data = tmp_path / "q.jsonl"
    write_jsonl(generate_problems(8, seed=78, config=TaskConfig(max_operators=3)), data)
    out = tmp_path / "s.json"
    assert main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "slow,kv-oneshot,budget:24,deer,length-oneshot:30",
                 "--sweep", "budget=16,48;deer=0.9;kv-oneshot=0,100", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    sweep = rep["sweep"]
    assert set(sweep["curves"]) == {"kv-oneshot", "budget", "deer", "length-oneshot"}
    assert [p["knob"] for p in sweep["curves"]["budget"]] == [16, 48]
    fast, slow = sweep["anchors"]["fast"], sweep["anchors"]["slow"]
    assert sweep["curves"]["kv-oneshot"][1]["accuracy"] == fast["accuracy"]  # every difficulty is <= 100: all fast
    assert sweep["curves"]["length-oneshot"][0]["accuracy"] == slow["accuracy"]  # below the shortest prompt: all slow
    assert sweep["curves"]["deer"][0]["mean_tokens_with_probes"] > sweep["curves"]["deer"][0]["mean_tokens"]
    assert sweep["matched"]["target_accuracy"] == pytest.approx(slow["accuracy"] - 0.01)
    assert (tmp_path / "s-frontier.png").stat().st_size > 0 and (tmp_path / "s.png").is_file()
    for png in ("s.png", "s-frontier.png"):
        (tmp_path / png).unlink()
    assert main(["plot-eval", str(out)]) == 0  # redrawn from the JSON alone
    assert (tmp_path / "s-frontier.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0


def test_knobs_chosen_on_a_dev_sweep_replace_bare_family_names(tmp_path, model_dir):
    from serve_app.cli import main
    from serve_app.core.task import write_jsonl

    dev = tmp_path / "dev.json"
    best = {"kv-oneshot": {"knob": 40}, "kv-online": {"knob": 45}, "dynasor": {"knob": "16/2"}, "deer": None}
    dev.write_text(json.dumps({"dataset": "dev.jsonl", "sweep": {"matched": {"best": best}}}))
    policies, knobs = with_dev_knobs(["slow", "kv-oneshot", "kv-online", "dynasor", "deer", "budget:8"], dev)
    assert policies == ["slow", "kv-oneshot:40", "kv-online:45", "dynasor:16,2", "deer", "budget:8"]  # deer never matched: as named
    assert knobs["chosen"] == {"kv-oneshot": "kv-oneshot:40", "kv-online": "kv-online:45", "dynasor": "dynasor:16,2"}
    # a report with curves: the points are recomputed from them, probe tokens counted
    curves = {"kv-online": [{"knob": 25, "accuracy": 0.99, "mean_tokens": 100.0}],
              "dynasor": [{"knob": "16/2", "accuracy": 0.99, "mean_tokens": 50.0, "mean_tokens_with_probes": 150.0},
                          {"knob": "32/3", "accuracy": 0.99, "mean_tokens": 60.0, "mean_tokens_with_probes": 90.0}]}
    stale = {"kv-online": {"knob": 45}, "dynasor": {"knob": "16/2"}}
    dev2 = tmp_path / "dev2.json"
    dev2.write_text(json.dumps({"sweep": {"curves": curves, "anchors": {"slow": {"accuracy": 0.99}}, "matched": {"best": stale}}}))
    assert with_dev_knobs(["kv-online", "dynasor"], dev2)[0] == ["kv-online:25", "dynasor:32,3"]
    for bad in ("kv-oneshot:x", "kv-online:-1"):
        with pytest.raises(ValueError):
            peers.check(bad)
    data = tmp_path / "q.jsonl"
    write_jsonl(generate_problems(8, seed=79, config=TaskConfig(max_operators=3)), data)
    out = tmp_path / "k.json"
    assert main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "fast,slow,kv-oneshot,kv-online", "--knobs-from", str(dev),
                 "--sweep", "kv-oneshot=0,100;kv-online=45", "--out", str(out)]) == 0
    assert (tmp_path / "k-frontier.png").stat().st_size > 0  # the test set's curves, the dev-chosen points marked
    rep = json.loads(out.read_text())
    assert set(rep["policies"]) == {"fast", "slow", "kv-oneshot:40", "kv-online:45"} and rep["knobs_from"]["from"] == str(dev)
    assert rep["thresholds"] == {"kv-oneshot:40": 40.0} and "switches" in rep["policies"]["kv-online:45"]
    rows = {r["family"]: r for r in chosen_table(rep)}
    online, slow = rep["policies"]["kv-online:45"], rep["policies"]["slow"]
    assert rows["kv-online"]["tokens_vs_kv_online"] == pytest.approx(1.0)
    assert rows["kv-online"]["vs_slow_points"] == pytest.approx(100 * (online["accuracy"] - slow["accuracy"]))
    assert rows["kv-oneshot"]["tokens_vs_kv_online"] == pytest.approx(rep["policies"]["kv-oneshot:40"]["mean_tokens"] / online["mean_tokens"])


def test_a_sweep_point_the_eval_ran_as_a_policy_is_reused_not_run_again():
    from serve_app.core.policy import OnlineConfig

    probe_online = OnlineConfig(tau=40.0, delta=5.0)
    runs = {"slow": ["s"], "budget:224": ["b"], "kv-online:45": ["k45"], "kv-online": ["k5"]}
    assert peers.same_run(runs, "budget:224", probe_online, probe_online) == ["b"]
    assert peers.same_run(runs, "budget:256", probe_online, probe_online) is None
    assert peers.same_run(runs, "kv-online", probe_online, probe_online.model_copy(update={"delta": 45.0})) == ["k45"]
    assert peers.same_run(runs, "kv-online", probe_online, probe_online.model_copy(update={"delta": 5.0})) == ["k5"]
    assert peers.same_run(runs, "kv-online", probe_online, probe_online.model_copy(update={"delta": 25.0})) is None
    assert peers.same_run({"slow": ["s"]}, "kv-online", None, None) is None
