# Set-up and checks for lens_fast. Each main target builds a FRESH virtual environment
# (created and owned by this Makefile), installs the CPU PyTorch wheel first (a bare torch
# requirement would pull a multi-GB CUDA build), then lens_fast itself.
#   make demo         the built-in demo: train and score a miniature Lens on this CPU
#   make test         the whole CPU test suite (what CI runs), on the pinned set in constraints.txt
#   make test-latest  the same suite on the newest versions pyproject.toml allows (.venv-latest):
#                     finds drift on purpose; prints every version that differs from the pins
#   make lock         make test-latest, then (only if it passed) write its versions to constraints.txt
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= triton,demo,test,curate,ray,lora
CONSTRAINTS := $(CURDIR)/constraints.txt
DEMO_ARGS ?=
PYTEST_ARGS ?=
# OMP_WAIT_POLICY=PASSIVE: the tests train small models on 2 threads; with libgomp's spinning
# default they ran many times slower whenever another process shared the cores (README, Reliability).
TEST_ENV := HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 OMP_WAIT_POLICY=PASSIVE

.PHONY: venv venv-latest demo test test-fast test-dali test-latest lock gpu-check diffusers-parity

# $(1): venv folder; $(2): the pip spec to install pip itself; $(3): flags for lens_fast's install.
# PIP_CONSTRAINT (not -c) so the pins reach pip's isolated build environment (setuptools) too.
define make_venv
	$(PYTHON) -m venv --clear $(1)
	$(1)/bin/python -m pip --disable-pip-version-check -q install $(2)
	$(1)/bin/python -m pip --disable-pip-version-check -q install "$(TORCH_SPEC)"
	LENS_FAST_SKIP_CUDA_BUILD=1 $(1)/bin/python -m pip --disable-pip-version-check -q install $(3) -e ".[$(EXTRAS)]"
endef

venv:
	$(call make_venv,$(VENV),$$(grep -E '^pip==' $(CONSTRAINTS)),)
	$(VENV)/bin/python -m pip check
venv: export PIP_CONSTRAINT = $(CONSTRAINTS)

# torch stays what TORCH_SPEC says (an eager upgrade would swap the CPU wheel for a CUDA build).
venv-latest:
	echo "$(TORCH_SPEC)" > $(CURDIR)/.torch-spec.txt
	$(call make_venv,$(LATEST_VENV),--upgrade pip,--upgrade --upgrade-strategy eager)
venv-latest: export PIP_CONSTRAINT = $(CURDIR)/.torch-spec.txt

demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/lens-fast demo $(DEMO_ARGS)

test: venv
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Re-run the tests in the existing .venv (no reinstall).
test-fast:
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The trainer's DALI reader on DALI's CPU backend. nvidia-dali is not in CI's set: ~1 GB, and it
# needs packaging<=26.3 (one below the pin), so this target installs it into the existing .venv
# (downgrading packaging there; `make venv` restores the pinned set) and runs only its tests.
test-dali:
	$(VENV)/bin/python -m pip --disable-pip-version-check -q install "nvidia-dali-cuda120>=1.30,<3" "packaging<=26.3"
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q tests/test_webdata_dali.py $(PYTEST_ARGS)

test-latest: venv-latest
	@echo "== versions that differ from constraints.txt (pinned -> newest):"
	@diff <(grep -E '^[A-Za-z0-9]' $(CONSTRAINTS) | sort -f) \
	      <($(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -vE '^torch==' | sort -f) \
	      | grep -E '^[<>]' || echo "   (none)"
	$(TEST_ENV) $(LATEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lock: test-latest
	@{ echo "# The tested set that make test / make demo install (pip constraints; torch comes from TORCH_SPEC)."; \
	   echo "# Written by \`make lock\` on $$(date -u +%Y-%m-%d) after the whole suite passed on it"; \
	   echo "# (Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -m)). Do not edit by hand."; \
	   $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -vE '^torch==' | sort -f; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@echo "constraints.txt updated: review with git diff, then commit"

gpu-check:
	bash bench/gpu_check.sh $(OUT)

# diffusers' two Lens test files run against diffusers' classes and against lens_fast's (only the
# import changed); DIFFUSERS=<checkout at the Lens commit> runs offline, else the commit is downloaded.
DIFFUSERS ?=
PARITY_OUT ?= diffusers_parity.md
diffusers-parity:
	LENS_FAST_SKIP_CUDA_BUILD=1 PIP_CONSTRAINT=$(CONSTRAINTS) $(VENV)/bin/python -m pip --disable-pip-version-check -q \
	    install -e ".[diffusers-tests]"
	$(VENV)/bin/python bench/diffusers_parity.py $(if $(DIFFUSERS),--diffusers $(DIFFUSERS),--download) \
	    --out $(PARITY_OUT)
