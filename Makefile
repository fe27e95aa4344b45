# Two commands for a newcomer: `make run` and `make test`. Each does all its own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
WHEELS := $(HOME)/.cache/tokenrelay/wheels

.PHONY: run test lint typecheck pytest install web browser local-model screenshot test-local test-faults reliability clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The suite type-checks and smoke-runs the benchmark too, so its extra comes with the tests.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[test,bench]'
	touch $@

install: $(STAMP)

web: install
	@bash scripts/build-web.sh

run: web
	@bash scripts/run.sh

browser:
	@bash scripts/install-browser.sh

# The local model `make run` uses: llama-cpp-python compiled once per machine (portable
# flags, cached in ~/.cache/tokenrelay), so the default path is tested by `make test`.
local-model: install
	@bash scripts/install-local.sh

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: install
	$(VENV)/bin/mypy

pytest: install web browser local-model
	$(VENV)/bin/pytest -m "not local" $(PYTEST_ARGS)

test: lint typecheck pytest

test-faults: install
	$(VENV)/bin/pytest -m faults $(PYTEST_ARGS)

# The fault scenarios against real processes, then docs/reliability.md from their results.
reliability: install web browser
	@out=$$(mktemp -d); \
	TOKENRELAY_RELIABILITY_DIR=$$out $(VENV)/bin/pytest -m faults $(PYTEST_ARGS); status=$$?; \
	TOKENRELAY_RELIABILITY_DIR=$$out $(VENV)/bin/pytest tests/test_web_security.py \
		$(PYTEST_ARGS) || status=1; \
	$(PY) scripts/reliability_report.py $$out docs/reliability.md && rm -rf $$out; \
	echo "wrote docs/reliability.md"; exit $$status

# The benchmark (docs/performance.md): the full sweep, under 30 minutes; results and plot in
# bench/results/. `make bench BENCH_ARGS=--quick` runs every target's cell with short answers
# on both layouts (split and `serve`) in a few minutes, `BENCH_ARGS=--targets` the same at
# full length; add `--cluster` for the same load on a 3-master Valkey Cluster (#14).
.PHONY: bench

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# docs/screenshot.png, from the browser test that shows an answer mid-stream.
screenshot: web browser
	TOKENRELAY_SCREENSHOT=$(CURDIR)/docs/screenshot.png $(VENV)/bin/pytest -m browser \
		tests/test_web.py -k screenshot

test-local: web local-model
	$(VENV)/bin/pytest -m local $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) src/tokenrelay/gateway/static web/node_modules
