"""``kvswitch loadtest`` against a plain OpenAI-compatible server that is not kvswitch: Hugging
Face's ``transformers serve`` on the embedded model (offline, local files). Its stream carries no
``kvswitch`` object, puts usage on the finish chunk and ends without ``[DONE]``."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtests.runner import LoadConfig, run_load
from serve_app.task import generate_problems, num_operators

pytest.importorskip("accelerate")  # transformers serve needs it on CPU (the test extra installs it)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def plain_server(model_dir, tmp_path_factory):
    cli = Path(sys.executable).with_name("transformers")
    if not cli.exists():
        cli = shutil.which("transformers")
    if cli is None:
        pytest.skip("the transformers CLI is not installed")
    port = _free_port()
    home = tmp_path_factory.mktemp("hf-home")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HOME": str(home)}
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen([str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (home / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "transformers serve did not come up in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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
