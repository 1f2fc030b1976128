"""Reliability and security of the real service: API keys, hostile input, limits and timeouts,
a schemathesis fuzz run, the prefill fallback, and a chaos run that kills a replica of every pool
under load. One local Ray instance serves the module."""

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from loadtests.chaos import ChaosConfig, format_chaos, kill_replica, run_chaos  # noqa: E402
from loadtests.fuzz import FuzzConfig, format_fuzz, run_fuzz  # noqa: E402
from serve_app.app import build_app  # noqa: E402
from serve_app.config import AppConfig  # noqa: E402
from serve_app.serving.api import check_exposure  # noqa: E402

PORT = int(os.environ.get("KVSWITCH_TEST_RELIABILITY_PORT", "18441"))
MODEL = "kvswitch-arith-tiny"
EASY, HARD = "What is 2 + 3?", "What is 41 - 17 + 8 - 60 + 5 + 12?"
ROOT = Path(__file__).resolve().parent.parent
KEY, ENV_KEY = "sk-kvswitch-config-key-0123456789", "sk-kvswitch-env-key-9876543210"
KEYS_ENV = "KVSWITCH_TEST_API_KEYS"

POOL = {"num_cpus": 0.2, "max_ongoing_requests": 64, "max_queued_requests": 128}
BASE = {"prefill": {"num_cpus": 0.2}, "router": {"num_cpus": 0.1}, "fast": dict(POOL), "slow": dict(POOL)}
LIMITS = {"max_body_bytes": 65536, "max_prompt_tokens": 200, "max_total_tokens": 600, "request_timeout_s": 60, "prefill_timeout_s": 5}


@pytest.fixture(scope="module")
def cluster():
    os.environ[KEYS_ENV] = f" {ENV_KEY} ,"  # replicas of this local cluster inherit the driver's environment
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield
    serve.shutdown()
    ray.shutdown()
    os.environ.pop(KEYS_ENV, None)


def deploy(name: str, cfg: dict) -> str:
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{PORT}/{name}"


@pytest.fixture
def hostile(cluster):
    """The shared app of the input tests (deployed once, on first use, again after ``alone``)."""
    if "hostile" not in serve.status().applications:
        return deploy("hostile", {**BASE, "limits": LIMITS})
    return f"http://127.0.0.1:{PORT}/hostile"


@pytest.fixture
def alone(cluster):
    """A test that deploys its own app runs without the shared one: on CI's two cores that app's
    idle replicas would only slow the test down."""
    for name in list(serve.status().applications):
        serve.delete(name)


def chat(q: str = EASY, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": q}], **extra}


def post(base: str, body=None, raw: bytes | None = None, path: str = "/v1/chat/completions", headers=None, timeout=60) -> httpx.Response:
    if raw is not None:
        return httpx.post(f"{base}{path}", content=raw, headers={"content-type": "application/json", **(headers or {})}, timeout=timeout)
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=timeout)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["message"] and err["type"], err
    return err


def _pool_stats(app: str, pool: str) -> dict:
    return serve.get_deployment_handle(pool, app_name=app).record_routing_stats.remote().result()


def _wait_idle(app: str, pool: str, limit: float = 20) -> dict:
    deadline = time.time() + limit
    while (stats := _pool_stats(app, pool))["running"] and time.time() < deadline:
        time.sleep(0.2)
    return stats


# ------------------------------------------------------------------------------------------ auth


def test_exposure_rule():
    cfg = AppConfig()
    check_exposure(cfg, auth_enabled=False, host="127.0.0.1")
    with pytest.raises(RuntimeError, match="could not determine"):  # fails closed
        check_exposure(cfg, auth_enabled=False, host=None)
    check_exposure(cfg, auth_enabled=True, host=None)
    check_exposure(cfg, auth_enabled=True, host="0.0.0.0")
    with pytest.raises(RuntimeError, match="no API key"):
        check_exposure(cfg, auth_enabled=False, host="0.0.0.0")
    check_exposure(AppConfig(auth={"allow_unauthenticated_remote": True}), auth_enabled=False, host="0.0.0.0")
    assert KEY not in repr(AppConfig(auth={"api_keys": [KEY]}))  # SecretStr: never printed with the config


def test_api_keys_401_without_or_with_a_wrong_key_200_with_either_key_health_open(cluster):
    base = deploy("auth", {**BASE, "auth": {"api_keys": [KEY], "api_keys_env": KEYS_ENV}, "admin": {"enabled": True}})
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                        {"Authorization": "Bearer"}):
            err = assert_error(post(base, chat(), headers=headers), 401)
            assert err["code"] == "invalid_api_key"
        r = post(base, chat(), headers={})
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.get(f"{base}/v1/models", timeout=30), 401)
        assert_error(httpx.post(f"{base}/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=30), 401)
        assert httpx.get(f"{base}/health", timeout=30).json() == {"status": "ok"}
        assert_error(httpx.get(f"{base}/admin/v1/info", timeout=30), 401)  # the admin endpoints need a key too
        assert_error(post(base, {"prompt_ids": [1], "mode": "fast", "max_new_tokens": 2}, path="/admin/v1/generate"), 401)
        info = httpx.get(f"{base}/admin/v1/info", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
        assert info["model_name"] == MODEL and info["engines"]["slow"]["engine"] == "hf"
        for key in (KEY, ENV_KEY):  # the configured key and the one from $KVSWITCH_TEST_API_KEYS
            c = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
            assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": EASY}]).choices[0].message.content == "5"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()
        # an unauthorised body is never parsed: a huge one is refused with 401 too
        assert_error(post(base, raw=b"{" * 200_000), 401)
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        leaked = [p for p in logs.rglob("*") if p.is_file() and any(k.encode() in p.read_bytes() for k in (KEY, ENV_KEY))]
        assert not leaked, f"API keys appear in {leaked}"
    finally:
        serve.delete("auth")


# ------------------------------------------------------------------------------- hostile input

HOSTILE = [
    ("body above the limit", None, b'{"model": "kvswitch-arith-tiny", "messages": [{"role": "user", "content": "' + b"1" * 70000 + b'"}]}', 413),
    ("deeply nested json", None, b'{"model": "kvswitch-arith-tiny", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 20000
     + b"]" * 20000 + b"}", 400),
    ("lone surrogate", None, b'{"model": "kvswitch-arith-tiny", "messages": [{"role": "user", "content": "What is \\ud800 2 + 3?"}]}', 400),
    ("lone surrogate in stop", None, b'{"model": "kvswitch-arith-tiny", "messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff"}', 400),
    ("invalid utf-8 bytes", None, b'{"model": "kvswitch-arith-tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("huge n", chat(n=10**9), None, 400),
    ("negative n", chat(n=-1), None, 400),
    ("negative temperature", chat(temperature=-1), None, 400),
    ("negative top_p", chat(top_p=-0.5), None, 400),
    ("nan top_p", None, b'{"model": "kvswitch-arith-tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400),
    ("infinite temperature", None, b'{"model": "kvswitch-arith-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400),
    ("huge max_tokens", chat(max_tokens=10**40), None, 400),
    ("float max_tokens", chat(max_tokens=1.5), None, 400),
    ("negative seed", chat(seed=-3), None, 400),
    ("prompt above max_prompt_tokens", chat("1 + " * 150), None, 400),
    ("prompt + max_tokens above max_total_tokens", chat("What is " + "1 + " * 60 + "1?", max_tokens=560), None, 400),
    ("body is a list", [chat()], None, 400),
    ("body is a string", "hello", None, 400),
    ("null messages", {"model": MODEL, "messages": None}, None, 400),
    ("message content object", {"model": MODEL, "messages": [{"role": "user", "content": {"a": 1}}]}, None, 400),
    ("five stop strings", chat(stop=["a", "b", "c", "d", "e"]), None, 400),
]


@pytest.mark.parametrize("name,body,raw,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_a_json_4xx(hostile, name, body, raw, status):
    assert_error(post(hostile, body, raw=raw), status)


def test_admin_endpoints_are_off_unless_configured(hostile):
    for r in (httpx.get(f"{hostile}/admin/v1/info", timeout=30),
              post(hostile, {"prompt_ids": [[1, 2]]}, path="/admin/v1/features")):
        assert assert_error(r, 404)["code"] == "admin_disabled"


def test_unicode_and_control_characters_are_served(hostile):
    for text in ("What is 2 + 3?\u0000\u0007\u001b[31m", "What is 2 + 3? 🙂🙃 \u202e\u200b", "¿Cuánto es 2 + 3? 二加三"):
        r = post(hostile, chat(text, max_tokens=64))
        assert r.status_code == 200, r.text[:300]
        assert r.json()["choices"][0]["message"]["content"] is not None


def test_a_fast_reply_longer_than_the_slow_estimate_is_served(hostile):
    """Found by ``kvswitch fuzz``: the tokens-saved metric was incremented by 0 (Ray's Counter raises),
    which turned a finished reply into a 500."""
    r = post(hostile, {"model": MODEL, "seed": 1, "messages": [
        {"role": "user", "content": "\t\u009b\U000e5f5be,\u00b0w`\u0099\u009f\u00d4\u00f5\U000f1c1f\u00a7\U000e3d02\u000evT\u00c6"},
        {"role": "user", "content": ""}]})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["kvswitch"]["route"] == "fast"


def test_a_vanishing_temperature_decodes_greedily(hostile):
    """Found by ``kvswitch fuzz``: temperature 2.25e-267 (valid JSON) overflowed the softmax into a 500."""
    for t in (2.2520632515391187e-267, 5e-324, 1e-6):
        r = post(hostile, chat(temperature=t, seed=1))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "5", r.text[:300]
    # and a vanishing top_p keeps the most likely token (it left none: all-zero probabilities, a 500)
    r = post(hostile, chat(temperature=1.0, top_p=1e-323, seed=1))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "5", r.text[:300]


def test_other_failures_are_json_too(hostile):
    assert_error(httpx.get(f"{hostile}/v1/nothing", timeout=30), 404)
    assert_error(httpx.get(f"{hostile}/v1/chat/completions", timeout=30), 405)
    assert_error(httpx.post(f"{hostile}/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}, timeout=30), 400)
    # a declared length over the limit is refused before the body is read
    r = httpx.post(f"{hostile}/v1/embeddings", content=b"x" * 70000, headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 413)
    assert post(hostile, chat()).json()["choices"][0]["message"]["content"] == "5"


def _freed_within(app: str, pool: str, limit: float) -> float:
    """Seconds until ``pool`` of ``app`` runs nothing; fails if that takes ``limit`` or more."""
    start = time.perf_counter()
    while _pool_stats(app, pool)["running"]:
        assert time.perf_counter() - start < limit, f"{pool} still busy after {limit} s"
        time.sleep(0.05)
    return time.perf_counter() - start


def test_request_timeout_cancels_generation_and_frees_the_slot(hostile):
    """Eight sampled choices that would run for seconds, under a 0.5 s timeout: a JSON 504 (or an SSE
    error event) and every slot free well before the reply would have ended by itself."""
    long = chat(HARD, n=8, max_tokens=500, temperature=2.0, seed=7, kvswitch={"mode": "slow", "online": False})
    started = time.perf_counter()
    assert post(hostile, long, timeout=300).status_code == 200
    natural = time.perf_counter() - started
    assert natural > 1.0, natural  # well above the 0.5 s timeout (1.75 s measured on an idle 2-core machine)
    base = deploy("timeout", {**BASE, "limits": {**LIMITS, "request_timeout_s": 0.5}})
    try:
        started = time.perf_counter()
        err = assert_error(post(base, long), 504)
        assert err["code"] == "request_timeout" and time.perf_counter() - started < natural
        assert _freed_within("timeout", "slow", min(2.0, natural / 2)) >= 0
        assert _pool_stats("timeout", "slow") == {"queued": 0, "running": 0, "predicted_tokens": 0.0}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**long, "stream": True}, timeout=60) as r:
            if r.status_code == 200:  # timed out mid-stream: an error event, no [DONE]
                events = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
                assert "[DONE]" not in events
                err = json.loads(events[-1])["error"]
            else:  # timed out before the first token: a JSON 504
                r.read()
                err = assert_error(r, 504)
        assert err["code"] == "request_timeout" and err["type"] == "timeout_error"
        assert _freed_within("timeout", "slow", min(2.0, natural / 2)) >= 0
        assert _pool_stats("timeout", "slow") == {"queued": 0, "running": 0, "predicted_tokens": 0.0}
    finally:
        serve.delete("timeout")


def test_client_disconnect_cancels_a_non_streamed_generation(hostile):
    """A client that gives up on a non-streamed request frees its generation slots long before the
    reply would have finished (8 sampled choices at temperature 2 run to max_tokens)."""
    long = chat(HARD, n=8, max_tokens=500, temperature=2.0, seed=7, kvswitch={"mode": "slow", "online": False})
    started = time.perf_counter()
    full = post(hostile, long, timeout=300)
    natural = time.perf_counter() - started
    assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] >= 8 * 100, full.text[:200]

    async def give_up() -> float:
        async with httpx.AsyncClient(timeout=300) as c:
            task = asyncio.create_task(c.post(f"{hostile}/v1/chat/completions", json=long))
            while (await asyncio.to_thread(_pool_stats, "hostile", "slow"))["running"] == 0:
                await asyncio.sleep(0.01)
            task.cancel()  # closes the connection mid-request
            left = time.perf_counter()
            while (await asyncio.to_thread(_pool_stats, "hostile", "slow"))["running"]:
                await asyncio.sleep(0.02)
            return time.perf_counter() - left

    freed_after = asyncio.run(give_up())
    print(f"natural {natural:.2f} s, freed {freed_after:.2f} s after the client left")
    assert freed_after < natural / 2, (freed_after, natural)
    assert _pool_stats("hostile", "slow") == {"queued": 0, "running": 0, "predicted_tokens": 0.0}


def test_schemathesis_fuzz_finds_no_5xx_and_no_hang(hostile, tmp_path):
    report = run_fuzz(FuzzConfig(url=hostile, examples=100, timeout=60), progress=False)
    print("\n" + format_fuzz(report))
    (tmp_path / "fuzz.json").write_text(json.dumps(report, indent=1))
    assert report["cases"] >= 1000, report["operations"]
    assert report["server_errors"] == 0 and report["hangs"] == 0 and report["dropped_connections"] == 0, report["failures"]
    assert any(s.startswith("2") for s in report["statuses"]), "the deep pass reached generation"
    assert post(hostile, chat()).json()["choices"][0]["message"]["content"] == "5"


# ---------------------------------------------------------------------------------------- faults


def test_prefill_down_falls_back_to_the_default_mode_with_a_flag(alone):
    base = deploy("fallback", {**BASE, "fallback_mode": "slow", "limits": {"prefill_timeout_s": 2}})
    try:
        routed = post(base, chat()).json()["kvswitch"]
        assert routed["fallback"] is None and routed["route"] == "fast" and routed["reason"] == "easy"
        kill_replica("fallback", "prefill", __import__("random").Random(0))
        r = post(base, chat())
        assert r.status_code == 200, r.text[:300]
        kv = r.json()["kvswitch"]
        assert kv["fallback"] == "prefill_unavailable" and kv["route"] == "slow" and kv["reason"] == "prefill-unavailable"
        # the decode probe runs in the generation pool: the fallback still switches online (slow -> fast on an easy question)
        assert kv["switched"] is True and kv["start_mode"] == "slow" and kv["end_mode"] == "fast", kv
        assert r.json()["choices"][0]["message"]["content"] == "5"
        deadline = time.time() + 90  # Serve replaces the prefill replica; routing by difficulty resumes
        while time.time() < deadline:
            kv = post(base, chat()).json()["kvswitch"]
            if kv["fallback"] is None:
                break
            time.sleep(1)
        assert kv["fallback"] is None and kv["route"] == "fast"
        # embeddings have no fallback: they come back once the replica is back
        assert httpx.post(f"{base}/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=60).status_code == 200
    finally:
        serve.delete("fallback")


async def _killed_during(app: str, coro_factory, rng):
    """Run ``coro_factory()`` and kill ``app``'s slow replica as soon as it is generating."""
    task = asyncio.create_task(coro_factory())
    while (await asyncio.to_thread(_pool_stats, app, "slow"))["running"] == 0:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(kill_replica, app, "slow", rng)
    return await task


async def _stream_killed_after(base: str, app: str, body: dict, rng, after: int = 3) -> tuple[int, list[str]]:
    """Stream ``body``; once ``after`` events have arrived, kill the slow replica generating it."""
    async with httpx.AsyncClient(timeout=180) as c:
        async with c.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}) as resp:
            lines = []
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    lines.append(line[5:].strip())
                    if len(lines) == after:  # the stream is under way: now the replica dies
                        await asyncio.to_thread(kill_replica, app, "slow", rng)
            return resp.status_code, lines


def _streamed_text(lines: list[str]) -> tuple[str, dict]:
    chunks = [json.loads(x) for x in lines if x != "[DONE]"]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    infos = [ch["choices"][0]["kvswitch"] for ch in chunks if ch["choices"] and ch["choices"][0].get("kvswitch")]  # on the final chunk's choice
    assert len(infos) == 1, lines[-4:]
    return text, infos[0]


def test_a_dead_replica_is_retried_before_streaming_and_resumed_after(alone):
    """One slow replica: killed mid-generation of a non-streamed reply, the request is retried on its
    replacement (nothing had reached the client); killed after a stream has started, the stream goes
    on from the replacement (``resumed``) and ends with the unfaulted reply, greedy and seeded."""
    base = deploy("faults", BASE)
    long = chat(HARD, kvswitch={"mode": "slow", "online": False})
    seeded = chat(HARD, temperature=0.8, seed=21, max_tokens=400, kvswitch={"mode": "slow", "online": False})
    rng = __import__("random").Random(0)
    try:
        unfaulted = post(base, long, timeout=120).json()["choices"][0]["message"]["content"]
        assert unfaulted == "-11"

        async def whole():
            async with httpx.AsyncClient(timeout=120) as c:
                return await c.post(f"{base}/v1/chat/completions", json=long)

        r = asyncio.run(_killed_during("faults", whole, rng))
        assert r.status_code == 200, r.text[:300]
        assert r.json()["kvswitch"]["retried"] is True and r.json()["choices"][0]["message"]["content"] == unfaulted

        for body in (long, seeded):
            status, reference = asyncio.run(_stream_killed_after(base, "faults", body, rng, after=10**9))  # no kill
            status, lines = asyncio.run(_stream_killed_after(base, "faults", body, rng))
            assert status == 200 and lines[-1] == "[DONE]", lines[-2:]
            text, kv = _streamed_text(lines)
            ref_text, ref_kv = _streamed_text(reference)
            assert kv["resumed"] is True and ref_kv["resumed"] is False and text == ref_text, (text, ref_text)
    finally:
        serve.delete("faults")


def test_a_stream_is_cut_with_an_error_event_when_resuming_is_off(alone):
    base = deploy("cut", {**BASE, "resume_streams": False})
    try:
        status, lines = asyncio.run(_stream_killed_after(base, "cut", chat(HARD, kvswitch={"mode": "slow", "online": False}),
                                                         __import__("random").Random(0)))
        assert status == 200 and "[DONE]" not in lines
        err = json.loads(lines[-1])["error"]
        assert err["code"] == "replica_failed" and err["type"] == "server_error" and "incomplete" in err["message"]
    finally:
        serve.delete("cut")


def test_chaos_150_requests_while_a_replica_of_every_pool_is_killed(alone, tmp_path):
    """Sized for CI; `kvswitch chaos` runs the full 300 as a benchmark (README, results/chaos-serve-config.json)."""
    two = {**POOL, "num_replicas": 2}
    base = deploy("chaos", {**BASE, "fast": two, "slow": two, "limits": {"request_timeout_s": 120, "prefill_timeout_s": 3}})
    try:
        cfg = ChaosConfig(url=base, app="chaos", dataset=str(ROOT / "data" / "test-mix70-600-seed6060.jsonl"), num_requests=150,
                          concurrency=12, kill=["prefill", "fast", "slow"], kill_at=[0.15, 0.35, 0.55], timeout=150,
                          recover_timeout=300, out=str(tmp_path / "chaos.json"))
        # recover_timeout: a replacement replica loads torch and the model on cores busy with 12 decodes;
        # on 2 cores that took up to 152 s (how fast is the benchmark's figure; that it happens, the test's)
        report = asyncio.run(run_chaos(cfg, progress=False))
        print("\n" + format_chaos(report))
        (tmp_path / "chaos.json").write_text(json.dumps(report, indent=1))
        assert report["requests"] == 150 and len(report["kills"]) == 3
        assert report["hang"] == 0 and report["unclear"] == 0, report["errors_by_status"]
        assert report["cut"] == 0, report["errors_by_status"]  # every stream whose replica died was resumed
        assert report["correct"] + report["clear_error"] + report["wrong"] == 150
        assert report["corrupted"] == 0, report["wrong_answers"]  # wrong only where the unfaulted run was wrong too
        # or where the prefill fallback sent the request to the other pool (the model's answer there)
        rerouted = [w for w in report["wrong_answers"] if w["index"] in report["rerouted_wrong_requests"]]
        assert all(w["fallback"] == "prefill_unavailable" for w in rerouted) and len(rerouted) <= 3, rerouted
        assert report["held_up"] and report["correct"] >= 125, report
        assert all(k["recovered_after_s"] is not None for k in report["kills"]), report["kills"]
        assert post(base, chat()).json()["choices"][0]["message"]["content"] == "5"
    finally:
        serve.delete("chaos")
