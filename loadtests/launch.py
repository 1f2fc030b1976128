"""``--launch``: deploy a serve config with ``serve run`` for the length of a load test.

``serve run`` starts a local Ray instance, deploys, and tears everything down on SIGINT. Its log
goes to a file beside the report (or a temporary one), so a failed start can be read afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml


def config_url(serve_config: str | Path) -> str:
    """``http://host:port`` from the config's ``http_options`` (Ray's defaults when absent)."""
    data = yaml.safe_load(Path(serve_config).read_text()) or {}
    http = data.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{http.get('port', 8000)}"


def _port_open(url: str) -> bool:
    host, port = httpx.URL(url).host, httpx.URL(url).port or 80
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _serve_binary() -> str:
    local = Path(sys.executable).with_name("serve")
    return str(local) if local.exists() else "serve"


@contextlib.contextmanager
def launched(serve_config: str | Path, log_path: str | Path | None = None, timeout: float = 600.0):
    """Run ``serve run serve_config`` until the block ends; yields the service URL once
    ``GET /v1/models`` answers."""
    url = config_url(serve_config)
    if _port_open(url):
        raise RuntimeError(f"something already listens on {url}; stop it (or drop --launch and test it with --url)")
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="kvswitch-serve-", suffix=".log")[1])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    with log_path.open("w") as log:
        proc = subprocess.Popen([_serve_binary(), "run", str(serve_config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            print(f"launching {serve_config} (log: {log_path}) ...", file=sys.stderr, flush=True)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve run exited with {proc.returncode} before the service came up; see {log_path}")
                try:
                    if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the service did not come up within {timeout:g} s; see {log_path}")
                time.sleep(2)
            yield url
        finally:
            _stop(proc)
            # Ray's HTTP proxy can hold the port for a while after `serve run` has exited; a caller
            # that launches the next config at once (bench-autoscale) would find it taken.
            _wait_closed(url)


def _wait_closed(url: str, timeout: float = 60.0, poll_s: float = 0.5) -> bool:
    """Wait until nothing listens on ``url``'s port; False if something still does after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while _port_open(url):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
