# The two commands of the contract: `make run` and `make test`. Both create .venv when needed and
# install the project into it; nothing has to be installed by hand beyond Python 3.11.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.example.toml
LINT_PATHS := daemon tests $(wildcard bench)

.PHONY: run test lint typecheck unit bench clean vectors

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/remoteclusterd serve --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

# Benchmarks (minutes each; see README "Performance"). They need wrk, curl and taskset.
bench: $(STAMP)
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python bench/heartbeat_fanout.py
	$(BIN)/python bench/msg_throughput.py
	$(BIN)/python bench/upload_throughput.py

# Regenerates tests/vectors/invites.json with the Go port of Mattermost's invite code.
vectors:
	command -v go >/dev/null || apt-get install -y golang-go golang-golang-x-crypto-dev
	GO111MODULE=off GOPATH=/usr/share/gocode go run ./tests/vectors/invitegen gen > tests/vectors/invites.json

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
