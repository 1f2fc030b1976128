import atexit
import faulthandler
import gc
import os
import sys
from pathlib import Path

import pytest

# Nothing in the suite may reach the network: the shipped files alone must load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray 2.60 turns token auth on for new local clusters; the service tests keep it on, deliberately.
# It must be set before Ray is first imported (Ray caches its config at import).
os.environ.setdefault("RAY_AUTH_MODE", "token")

from serve_app.config import DEFAULT_MODEL  # noqa: E402


@pytest.fixture(scope="session")
def model_dir() -> Path:
    assert (DEFAULT_MODEL / "config.json").is_file(), f"shipped model missing at {DEFAULT_MODEL}"
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def shipped(model_dir):
    """The embedded default model and its tokenizer, loaded once per test session."""
    from serve_app.engines.load import load_model

    return load_model(model_dir)


def pytest_configure(config):
    config.addinivalue_line("markers", "serve_level: routing, load view, autoscaling and load shedding across deployments; they do not "
                                       "depend on the engine, so make test's vLLM pass of test_service.py skips them")
    config.addinivalue_line("markers", "cluster: starts a real two-node Ray cluster on this machine (tests/test_cluster.py; -m 'not cluster' skips it)")


_SESSION: dict = {}


def pytest_sessionfinish(session, exitstatus):
    _SESSION["exitstatus"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process once pytest is done, without the interpreter's teardown.

    A CI run (608 passed, summary printed) ended in a segmentation fault *after* pytest had finished:
    in the interpreter's teardown, where the native libraries this process has loaded (torch, vLLM's
    engine clients, Ray's core worker, tokenizers) free their objects in no set order. The results
    were complete, but make saw signal 11 and stopped before the vLLM pass. So: collect garbage, run
    the atexit handlers (they stop vLLM engine processes, Ray and multiprocessing children) with
    faulthandler on, so a crash there names its frames, then leave with pytest's own exit status.
    """
    if "exitstatus" not in _SESSION:
        return
    gc.collect()
    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_SESSION["exitstatus"])
