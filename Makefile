# The course workbook. Two commands do all the set-up on a fresh machine:
#   make lab    create .venv if missing, install the course, open JupyterLab
#   make test   create or update .venv, then ruff, unit tests, release check, nbval over solutions/
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch by default; a GPU user installs a CUDA torch into .venv and passes CONSTRAINTS=
CONSTRAINTS ?= constraints/cpu.txt
STAMP := $(VENV)/.course-installed
LAB_ARGS ?=
PYTEST_ARGS ?=
SUBMISSIONS ?= submissions
GRADEBOOK ?= gradebook
GRADE_ARGS ?=
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test test-unit test-e2e nbval lint release release-check grade grade-demo bench check-python help

help:
	@echo "make lab      open the course in JupyterLab (LAB_ARGS='--no-browser --port 8899' for headless)"
	@echo "make test     ruff + unit tests + release check + nbval over solutions/"
	@echo "make test-e2e JupyterLab + widgets in headless Chromium"
	@echo "make release  regenerate notebooks/ from solutions/"
	@echo "make grade SUBMISSIONS=dir GRADEBOOK=dir [GRADE_ARGS='--jobs 2 --shard 1/4']   grade student submissions"
	@echo "make grade-demo   grade a demo class built from the course itself"
	@echo "make bench    print the performance tables"

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: '$(PYTHON)' not found; install Python >= 3.10 or pass PYTHON=/path/to/python3" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v >= (3, 10) else "error: Python >= 3.10 is required, but $(PYTHON) is %d.%d; pass PYTHON=/path/to/python3.11" % v)'

$(STAMP): pyproject.toml $(CONSTRAINTS) | check-python
	@test -x $(BIN)/python || { echo "creating $(VENV) ..."; $(PYTHON) -m venv $(VENV); } || { echo "error: could not create the virtual environment $(VENV)" >&2; exit 1; }
	@echo "installing the course into $(VENV) (torch constraints: $(or $(CONSTRAINTS),none)) ..."
	@$(BIN)/python -m pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]" \
		|| { echo "error: installing the course failed (pip's message is above); nothing else was run" >&2; exit 1; }
	@touch $(STAMP)

setup: $(STAMP)

lab: setup
	$(BIN)/jupyter lab $(ALLOW_ROOT) --ServerApp.root_dir="$(CURDIR)" $(LAB_ARGS)

lint: setup
	$(BIN)/ruff check .

release: setup
	$(BIN)/course release

release-check: setup
	$(BIN)/course release --check

test: setup
	@$(BIN)/ruff check . || { echo "error: ruff found problems (see above)" >&2; exit 1; }
	@$(BIN)/course release --check || { echo "error: notebooks/ is stale; run 'make release'" >&2; exit 1; }
	$(BIN)/python -m pytest tests solutions --nbval --nbval-current-env \
		--nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout=300 $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# Only the browser tests; unlike `make test` (which skips them without a browser) they must run:
# a missing Chromium (Debian's `chromium`) or playwright fails. Artifacts: artifacts/e2e/.
test-e2e: setup
	COURSE_E2E=require $(BIN)/python -m pytest tests/e2e -rs $(PYTEST_ARGS)

nbval: setup
	$(BIN)/python -m pytest solutions --nbval --nbval-current-env \
		--nbval-sanitize-with nbval_sanitize.cfg --nbval-cell-timeout=300 $(PYTEST_ARGS)

grade: setup
	$(BIN)/course grade "$(SUBMISSIONS)" --out "$(GRADEBOOK)" $(GRADE_ARGS)

grade-demo: setup
	$(BIN)/course grade --demo grade-demo --jobs 2

bench: setup
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python "$$f" || exit 1; done
