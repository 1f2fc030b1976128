"""Load-test statistics on synthetic timings, the workload, the config, and the SSE client on
canned streams (a plain OpenAI server's, without kvswitch fields or usage). The real run against
the service is in tests/test_service.py."""

import asyncio
import json

import httpx
import numpy as np
import pytest

from loadtests.cli import config_from_args
from loadtests.client import grade, request_body, send
from loadtests.runner import LoadConfig, arrival_times, build_report, load_scenario
from loadtests.stats import RequestRecord, balance, meets_slo, parse_slo, percentiles, ratios, summarize, tokens_saved, window
from serve_app.cli import build_parser


def rec(i=0, sent=0.0, ttft=0.1, chunks=(0.1, 0.2, 0.4), tokens=3, status="ok", correct=True, **kw) -> RequestRecord:
    r = RequestRecord(index=i, question="q", answer="1", mode="auto", sent_at=sent, status=status, correct=correct if status == "ok" else None,
                      **kw)
    if status == "ok":
        r.ttft, r.chunk_times, r.e2e, r.completion_tokens = ttft, list(chunks), chunks[-1] + 0.01, tokens
    return r


def test_percentiles_interpolate_between_order_statistics():
    p = percentiles([4.0, 1.0, 3.0, 2.0, None])
    assert p["mean"] == 2.5
    assert p["p50"] == 2.5  # halfway between 2 and 3
    assert p["p90"] == pytest.approx(3.7)
    assert p["p99"] == pytest.approx(3.97)
    assert percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert percentiles(range(101))["p99"] == pytest.approx(99.0)


def test_tpot_and_itl_definitions():
    r = rec(ttft=0.1, chunks=(0.1, 0.3, 0.35, 0.6), tokens=6)
    r.e2e = 0.6
    assert r.tpot == pytest.approx((0.6 - 0.1) / 5)  # (e2e - ttft) / (tokens - 1)
    assert r.itls == pytest.approx([0.2, 0.05, 0.25])  # gaps between text-bearing chunks
    assert rec(tokens=1).tpot is None  # one token: no time per output token
    assert rec(status="500").tpot is None


def test_goodput_counts_completed_requests_within_every_slo_per_second():
    records = [rec(0, sent=0.0, ttft=0.1, chunks=(0.1, 0.5)),       # e2e 0.51: within
               rec(1, sent=0.5, ttft=0.9, chunks=(0.9, 1.0)),       # ttft 0.9 > 0.5: misses
               rec(2, sent=1.0, ttft=0.2, chunks=(0.2, 1.49)),      # e2e 1.5 > 1.2: misses
               rec(3, sent=1.5, ttft=0.1, chunks=(0.1, 0.49), correct=False),
               rec(4, sent=1.8, status="503")]
    slo = parse_slo("ttft:500,e2e:1200")
    assert slo == {"ttft": 0.5, "e2e": 1.2}
    s = summarize(records, slo)
    assert s["duration_s"] == pytest.approx(2.5)  # first sent (0) → last finished (1.0 + 1.5)
    assert s["completed"] == 4 and s["errors"] == 1 and s["error_rate"] == pytest.approx(0.2)
    assert s["errors_by_status"] == {"503": 1}
    assert s["throughput_rps"] == pytest.approx(4 / 2.5)
    assert s["goodput_rps"] == pytest.approx(2 / 2.5)
    assert s["correct_goodput_rps"] == pytest.approx(1 / 2.5)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["accuracy"] == pytest.approx(3 / 4)
    assert s["e2e_s"]["p50"] == pytest.approx(np.percentile([0.51, 1.01, 1.5, 0.5], 50))


def test_tpot_slo_skips_one_token_replies_and_bad_slos_are_refused():
    one = rec(tokens=1)
    assert meets_slo(one, {"tpot": 0.001})
    slow = rec(ttft=0.1, chunks=(0.1, 1.0), tokens=2)
    assert not meets_slo(slow, {"tpot": 0.5})
    for bad in ("ttft", "latency:100", "e2e:-1", "e2e:abc"):
        with pytest.raises(ValueError):
            parse_slo(bad)
    assert parse_slo(None) == {} and parse_slo("") == {}


def test_routes_replicas_and_balance():
    records = [rec(i, route="slow" if i % 2 else "fast", replica=f"r{i % 4}", predicted_tokens=100.0 if i % 2 else 4.0, tokens=10 * (i + 1))
               for i in range(8)]
    s = summarize(records)
    assert s["routes"]["fast"]["requests"] == 4 and s["routes"]["slow"]["fraction"] == 0.5
    slow = s["replicas"]["slow"]
    assert set(slow["by_replica"]) == {"r1", "r3"}
    assert slow["by_replica"]["r1"] == {"requests": 2, "tokens": 20 + 60, "predicted_tokens": 200.0}
    assert slow["predicted_token_balance"]["imbalance"] == 0.0
    assert slow["token_balance"]["imbalance"] == pytest.approx(120 / 100 - 1)  # r3: 40 + 80 = 120, mean 100
    b = balance({"a": 60.0, "b": 40.0})
    assert b["imbalance"] == pytest.approx(0.2) and b["min_over_max"] == pytest.approx(40 / 60)
    assert balance({})["replicas"] == 0


def test_ratios_and_tokens_saved_match_questions_by_index():
    routed = [rec(0, tokens=4), rec(1, tokens=100), rec(2, status="timeout")]
    slow = [rec(0, tokens=200), rec(1, tokens=300), rec(2, tokens=250)]
    saved = tokens_saved(routed, slow)
    assert saved == {"matched": 2, "routed_tokens": 104, "slow_tokens": 500, "saved_tokens": 396, "saved_fraction": pytest.approx(0.792)}
    a = {"accuracy": 0.99, "mean_tokens": 50.0, "p50_e2e_s": 1.0, "p99_e2e_s": 2.0, "throughput_rps": 10.0, "goodput_rps": 9.0}
    b = {"accuracy": 1.0, "mean_tokens": 200.0, "p50_e2e_s": 4.0, "p99_e2e_s": 4.0, "throughput_rps": 2.5, "goodput_rps": 0.0}
    r = ratios(a, b)
    assert r["tokens"] == 0.25 and r["token_reduction"] == 4.0 and r["p50_e2e"] == 0.25 and r["throughput"] == 4.0
    assert r["goodput"] is None  # baseline goodput 0: no ratio
    assert r["accuracy_points"] == pytest.approx(-1.0)


def test_window_and_empty_runs():
    assert window([]) == 0.0
    assert window([rec(status="503")]) == 0.0
    s = summarize([rec(status="connection")], {"e2e": 1.0})
    assert s["throughput_rps"] is None and s["accuracy"] is None and s["errors_by_status"] == {"connection": 1}


def test_open_loop_arrivals_have_the_rate_and_burstiness_asked_for():
    times = np.asarray(arrival_times(4000, rate=8.0, burstiness=1.0, seed=1))
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.08)  # exponential: CV 1
    bursty = np.diff(arrival_times(4000, rate=8.0, burstiness=0.25, seed=1))
    assert bursty.mean() == pytest.approx(1 / 8, rel=0.1)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)  # gamma shape k: CV 1/sqrt(k)
    assert arrival_times(50, 2.0, 1.0, 7) == arrival_times(50, 2.0, 1.0, 7)


def test_request_body_forces_modes_the_way_vllm_and_kvswitch_both_read():
    assert "chat_template_kwargs" not in request_body("m", "q", "auto", None)
    assert request_body("m", "q", "slow", 64)["chat_template_kwargs"] == {"enable_thinking": True}
    body = request_body("m", "q", "fast", None)
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["stream"] and body["stream_options"]["include_usage"]
    with pytest.raises(ValueError):
        request_body("m", "q", "medium", None)


def test_grading():
    assert grade("<think>7 + 5 = 12</think>12", "12")
    assert not grade("<think>12</think>13", "12")
    assert grade("The capital is Paris.", "paris")
    assert not grade("no number", "3")


def test_config_validation_and_scenarios(tmp_path):
    with pytest.raises(ValueError):
        LoadConfig(dataset="d.jsonl", pattern="poisson")  # no rate
    with pytest.raises(ValueError):
        LoadConfig(dataset="d.jsonl", concurrency=4, modes=["auto", "turbo"])
    with pytest.raises(ValueError):
        LoadConfig(dataset="d.jsonl", concurrency=4, modes=["slow", "slow"])
    with pytest.raises(ValueError):
        LoadConfig(dataset="d.jsonl", concurrency=4, slo="e2e")
    with pytest.raises(ValueError):
        LoadConfig(dataset="d.jsonl", sweep=[1.5, 2])  # closed loop: whole concurrencies
    with pytest.raises(ValueError):
        LoadConfig(dataset="d.jsonl", concurrency=4, surprise=1)
    assert LoadConfig(dataset="d.jsonl", pattern="poisson", sweep=[0.5, 2]).levels == [0.5, 2.0]
    path = tmp_path / "s.yaml"
    path.write_text("dataset: d.jsonl\npattern: closed\nconcurrency: 8\nmodes: [auto, slow]\n")
    cfg = load_scenario(path, num_requests=5, warmup=None)
    assert cfg.name == "s" and cfg.num_requests == 5 and cfg.modes == ["auto", "slow"]
    # command-line options override the scenario's; --rate switches it to the open loop
    args = build_parser().parse_args(["loadtest", "--scenario", str(path), "--rate", "3", "--compare", "auto,fast"])
    cfg = config_from_args(args)
    assert cfg.pattern == "poisson" and cfg.rate == 3 and cfg.concurrency is None and cfg.modes == ["auto", "fast"]
    with pytest.raises(ValueError):
        config_from_args(build_parser().parse_args(["loadtest", "--dataset", "d", "--rate", "1", "--concurrency", "2"]))


def test_shipped_scenarios_parse_and_point_at_existing_files():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    scenarios = sorted((root / "loadtests" / "scenarios").glob("*.yaml"))
    assert scenarios
    for path in scenarios:
        cfg = load_scenario(path)
        assert (root / cfg.dataset).exists(), path
        assert cfg.serve_config and (root / cfg.serve_config).exists(), path


def _sse(events: list) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _plain_server(events: list, status: int = 200):
    def handler(request: httpx.Request) -> httpx.Response:
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "queue full", "type": "overloaded_error"}})
        return httpx.Response(200, content=_sse(events), headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _run_send(client, body=None, answer="12"):
    r = RequestRecord(index=0, question="q", answer=answer, mode="auto")
    return asyncio.run(send(client, "http://x", body or request_body("m", "q", "auto", None), r, timeout=5))


def test_client_reads_a_plain_openai_stream_without_kvswitch_fields_or_usage():
    # In addition to the real-service run (tests/test_service.py): a canned stream shaped like a
    # plain vLLM server's, with the thought inline and no usage chunk.
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"content": "<think>"}}]},
              {"choices": [{"index": 0, "delta": {"content": "7+5=12</think>"}}]},
              {"choices": [{"index": 0, "delta": {"content": "12"}, "finish_reason": "stop"}]}, "[DONE]"]
    r = _run_send(_plain_server(events))
    assert r.ok and r.correct and r.completion_tokens == 3 and not r.tokens_from_usage
    assert r.route is None and r.replica is None and r.finish_reason == "stop"
    assert r.ttft is not None and len(r.chunk_times) == 3 and r.e2e >= r.chunk_times[-1]


def test_client_takes_usage_reasoning_and_kvswitch_fields_when_present():
    events = [{"choices": [{"index": 0, "delta": {"reasoning_content": "7+5=12"}}]},
              {"choices": [{"index": 0, "delta": {"content": "12"}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
                            "kvswitch": {"route": "slow", "reason": "hard", "replica": "abc", "predicted_tokens": 250.0, "switched": True}}]},
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 17, "completion_tokens_details": {"reasoning_tokens": 15}}},
              "[DONE]"]
    r = _run_send(_plain_server(events))
    assert r.ok and r.correct and r.completion_tokens == 17 and r.reasoning_tokens == 15 and r.tokens_from_usage
    assert (r.route, r.reason, r.replica, r.predicted_tokens, r.switched) == ("slow", "hard", "abc", 250.0, True)


def test_client_records_failures_instead_of_raising():
    r = _run_send(_plain_server([], status=503))
    assert r.status == "503" and "queue full" in r.error
    r = _run_send(_plain_server([{"error": {"message": "boom"}}]))
    assert r.status == "stream_error" and "boom" in r.error
    r = _run_send(_plain_server([{"choices": [{"index": 0, "delta": {"content": "1"}}]}]))  # cut off: no finish_reason, no [DONE]
    assert r.status == "bad_response"
    # a finish_reason without [DONE] (transformers serve) is a complete reply
    r = _run_send(_plain_server([{"choices": [{"index": 0, "delta": {"content": "12"}, "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2}}]))
    assert r.ok and r.correct and r.completion_tokens == 2

    def refuse(request):
        raise httpx.ConnectError("refused")

    r = _run_send(httpx.AsyncClient(transport=httpx.MockTransport(refuse)))
    assert r.status == "connection"


def test_non_streamed_requests_are_recorded_like_streamed_ones():
    """``send_plain`` (``kvswitch chaos --no-stream``; the real service runs it in
    tests/test_reliability.py's chaos test only streamed): outcome, error type and code, kvswitch fields."""
    from loadtests.chaos import outcome
    from loadtests.client import send_plain

    def run(handler):
        r = RequestRecord(index=0, question="q", answer="12", mode="auto")
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        return asyncio.run(send_plain(client, "http://x", {"model": "m", "stream": False}, r, timeout=5))

    r = run(lambda req: httpx.Response(200, json={"choices": [{"message": {"content": "12"}, "finish_reason": "stop"}],
                                                  "usage": {"completion_tokens": 3},
                                                  "kvswitch": {"route": "slow", "retried": True, "fallback": "prefill_unavailable"}}))
    assert r.ok and r.correct and r.completion_tokens == 3 and r.e2e is not None and outcome(r) == "correct"
    assert (r.route, r.retried, r.fallback) == ("slow", True, "prefill_unavailable")
    r = run(lambda req: httpx.Response(503, json={"error": {"message": "replica died", "type": "server_error", "code": "replica_failed"}}))
    assert (r.status, r.error_type, r.error_code, outcome(r)) == ("503", "server_error", "replica_failed", "clear_error")
    r = run(lambda req: httpx.Response(500, text="Internal Server Error"))  # Ray's proxy when the router replica dies
    assert r.status == "500" and r.error_type is None and outcome(r) == "unclear"

    def refuse(request):
        raise httpx.ConnectError("refused")

    assert run(refuse).status == "connection"

    def slow(request):
        raise httpx.ReadTimeout("slow")

    assert outcome(run(slow)) == "hang"


def test_report_and_plot_from_synthetic_runs(tmp_path):
    from loadtests.report import format_report, plot_report

    cfg = LoadConfig(dataset="d.jsonl", concurrency=2, modes=["auto", "slow"], slo="e2e:1000")
    runs = [{"mode": "auto", "level": 2.0, "records": [rec(i, tokens=4, route="fast", replica=f"f{i % 2}", predicted_tokens=4.0) for i in range(4)],
             "duration_s": 1.0},
            {"mode": "slow", "level": 2.0, "records": [rec(i, tokens=200, route="slow", replica=f"s{i % 2}", predicted_tokens=250.0)
                                                        for i in range(4)], "duration_s": 4.0}]
    report = build_report(cfg, "m", runs)
    assert set(report["modes"]) == {"auto", "slow"}
    for fields in report["modes"].values():
        assert {"requests", "errors", "accuracy", "mean_tokens", "p50_e2e_s", "p99_e2e_s", "p50_ttft_s", "throughput_rps",
                "goodput_rps"} <= set(fields)
    assert report["ratios"]["auto"]["token_reduction"] == 50.0 and report["ratios"]["auto"]["throughput"] == 4.0
    assert report["replica_balance"]["slow"]["slow"]["predicted_token_balance"]["imbalance"] == 0.0
    text = format_report(report)
    assert "auto / slow" in text and "50.00x fewer" in text
    plot_report(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000


class _FakeServer:
    """An async stand-in server (in addition to the real ones in test_service.py and
    test_loadtest_plain_server.py) that answers every question after ``delay`` seconds and
    records how many requests were in flight at once."""

    def __init__(self, delay: float):
        self.delay, self.inflight, self.peak, self.seen = delay, 0, 0, []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/v1/models"):
            return httpx.Response(200, json={"data": [{"id": "fake"}]})
        body = json.loads(request.content)
        self.seen.append(body["messages"][0]["content"])
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.inflight -= 1
        answer = body["messages"][0]["content"].split("=")[-1]
        events = [{"choices": [{"index": 0, "delta": {"content": answer}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}, "[DONE]"]
        return httpx.Response(200, content=_sse(events), headers={"content-type": "text/event-stream"})


def _dataset(tmp_path, n=10):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}={i}", "answer": str(i)}) + "\n" for i in range(n)))
    return str(path)


def test_closed_loop_keeps_the_concurrency_and_leaves_warmup_out(tmp_path):
    from loadtests.runner import run_load

    server = _FakeServer(delay=0.05)
    cfg = LoadConfig(dataset=_dataset(tmp_path), concurrency=3, num_requests=12, warmup=2, modes=["auto", "fast"])
    report = asyncio.run(run_load(cfg, progress=False, transport=httpx.MockTransport(server)))
    assert server.peak == 3
    assert len(server.seen) == 2 * (12 + 2)  # each mode: 2 warm-up + 12 measured
    for mode in ("auto", "fast"):
        recs = report["levels"][0]["records"][mode]
        assert [r["index"] for r in recs] == list(range(12))  # the dataset (10 rows) cycles
        assert all(r["correct"] for r in recs)
        assert report["modes"][mode]["requests"] == 12 and report["modes"][mode]["accuracy"] == 1.0
    assert report["model"] == "fake"


def test_duration_stops_sending_and_the_open_loop_follows_its_schedule(tmp_path):
    from loadtests.runner import run_load

    server = _FakeServer(delay=0.1)
    cfg = LoadConfig(dataset=_dataset(tmp_path), concurrency=1, num_requests=50, warmup=0, duration=0.35)
    report = asyncio.run(run_load(cfg, progress=False, transport=httpx.MockTransport(server)))
    assert 2 <= report["modes"]["auto"]["requests"] <= 5

    server = _FakeServer(delay=0.01)
    cfg = LoadConfig(dataset=_dataset(tmp_path), pattern="poisson", rate=40, num_requests=20, warmup=0, seed=3)
    report = asyncio.run(run_load(cfg, progress=False, transport=httpx.MockTransport(server)))
    sent = [r["sent_at"] for r in report["levels"][0]["records"]["auto"]]
    planned = arrival_times(20, 40, 1.0, 3)
    assert max(abs(a - b) for a, b in zip(sent, planned)) < 0.05


def test_chaos_tells_corrupted_answers_from_the_fallback_routes_own():
    """A wrong answer where the unfaulted run was right is corrupted, unless the prefill fallback sent
    the request to the other pool: then it is the model's answer on that route, counted apart."""
    from loadtests.chaos import summarize_chaos

    def rec(i, correct, route, fallback=None):
        return RequestRecord(index=i, question=f"q{i}", answer="1", mode="auto", e2e=1.0, content="x", correct=correct,
                             route=route, fallback=fallback)

    base = [rec(0, True, "fast"), rec(1, True, "fast"), rec(2, False, "slow"), rec(3, True, "slow")]
    run = [rec(0, False, "slow", "prefill_unavailable"), rec(1, False, "fast"), rec(2, False, "slow"),
           rec(3, False, "slow", "prefill_unavailable")]
    report = summarize_chaos(run, [], 1.0, base)
    assert report["wrong"] == 4
    assert report["rerouted_wrong_requests"] == [0]  # fallback, and another pool than the unfaulted run's
    assert report["corrupted_requests"] == [1, 3]  # same pool: the faults changed the answer (3: fallback to the same pool)
    assert not report["held_up"]
    report = summarize_chaos(run[:1] + run[2:3], [], 1.0, base[:1] + base[2:3])
    assert report["corrupted"] == 0 and report["rerouted_wrong"] == 1 and report["held_up"]
