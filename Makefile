# Tandem: two commands on a fresh machine with Python 3.11 and make.
#   make run   set up, start PostgreSQL (embedded unless DATABASE_URL is set), the three
#              services and their projections, load the demo organisation, serve until Ctrl-C.
#   make test  set up the same way and run the whole suite against real PostgreSQL.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
ROLE ?= admin
SUBJECT ?= dev

export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))

.PHONY: run test bench token contracts verify rebuild export import clean-data help

help:
	@echo "make run | make test | make bench | make token ROLE=admin | make contracts | make verify | make rebuild | make export | make import FILE=... | make clean-data"

# The stamp is rebuilt when the lock changes, so a pull that adds a package installs it.
$(VENV)/.installed: pyproject.toml uv.lock
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: Tandem needs Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) sync --frozen --quiet
	touch $@

run: $(VENV)/.installed
	$(PY) -m services.stack run

test: $(VENV)/.installed
	$(PY) -m services.stack test -- $(PYTEST_ARGS)

# Benchmarks, never tests, each figure beside a raw baseline from the same run (bench/README.md):
# the alignment query against hand-written SQL, read-model rebuilds against a raw read of the
# log. BENCH_ARGS="--only alignment --scale 0.05" or "--only rebuild --rebuild-sizes 20000" for small ones.
bench: $(VENV)/.installed
	$(PY) -m bench $(BENCH_ARGS)

token: $(VENV)/.installed
	@$(PY) -m services.common.auth token --role $(ROLE) --subject $(SUBJECT)

contracts: $(VENV)/.installed
	$(PY) -m services.contracts export

# Checks each service's event log against its hash chain; prints each log's head hash (keep it)
# or the first altered, deleted, reordered or unchained record, and fails on any.
verify: $(VENV)/.installed
	$(PY) -m services.audit verify

# Rebuilds every read model from the event logs, compares each with the live one (checksums)
# and prints events per second. Run it with the stack stopped, or it keeps what a runner moved.
rebuild: $(VENV)/.installed
	$(PY) -m services.audit rebuild

# Every event log as JSON Lines (.data/export/ unless OUT=...); `make import FILE=...` loads one
# into an empty installation and builds the read models from it.
export: $(VENV)/.installed
	$(PY) -m services.audit export $(if $(OUT),--out $(OUT))

import: $(VENV)/.installed
	@test -n "$(FILE)" || { echo "usage: make import FILE=path/to/export.jsonl"; exit 2; }
	$(PY) -m services.audit import $(FILE)

clean-data:
	rm -rf .data
