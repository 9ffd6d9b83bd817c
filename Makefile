# Set-up and checks for lens_fast. Each main target builds a FRESH virtual environment
# (.venv, created and owned by this Makefile), installs the CPU PyTorch wheel first
# (a bare torch requirement would pull a multi-GB CUDA build), then lens_fast itself.
#   make demo   - the built-in demo: train and score a miniature Lens on this CPU
#   make test   - the whole CPU test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast gpu-check clean-venv

venv:
	$(PYTHON) -m venv --clear $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)"
	LENS_FAST_SKIP_CUDA_BUILD=1 $(PIP) install -e ".[triton,demo,test]"

demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/lens-fast demo $(DEMO_ARGS)

test: venv
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# Re-run the tests in the existing .venv (no reinstall).
test-fast:
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

gpu-check:
	bash bench/gpu_check.sh $(OUT)
