# The two commands of the README:
#   make run    start a demo server (demo domain and user, high ports on 127.0.0.1)
#   make test   install everything the tests need (Debian packages, Python packages), run them
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test system-deps lint audit fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/postvern demo

system-deps:
	tools/install-system-deps

test: system-deps $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/mypy src/postvern
	$(BIN)/bandit -q -c pyproject.toml -r src -ll

# A bounded coverage-guided run of every fuzz target (bench/fuzz/run.py for long runs).
fuzz: $(STAMP)
	$(BIN)/pytest -q tests/test_fuzz_bounded.py

# Known vulnerabilities in the pinned dependencies: pip-audit where its data can be reached,
# otherwise the report of what is pinned and installed (to check by hand or elsewhere).
# --strict: without it, a package index that answers "not found" for every release (a mirror
# without PyPI's per-release JSON) skips each package and still says "No known
# vulnerabilities found", exit 0 — an audit of nothing that passed.
audit: $(STAMP)
	$(BIN)/pip-audit --strict --progress-spinner off || $(BIN)/python tools/pinned-report
