# The course workbook. Two commands do all the set-up on a fresh machine:
#   make lab    create .venv if missing, install the course, open JupyterLab (blocks its terminal)
#   make test   create or update .venv, then ruff, unit tests, release check, nbval over solutions/
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pins torch's version (torch==2.13.0), not its build: which build pip gets is the index's choice.
# PyPI's default wheel is the CUDA build on Linux x86_64 (torch plus about 18 nvidia-*/cuda-*
# packages, several GB) and a CPU build on macOS and Windows. CONSTRAINTS= turns the pin off.
CONSTRAINTS ?= constraints/cpu.txt
# Off by default. Set it to take torch (and only torch and its own dependencies) from another
# index, e.g. the CPU-only build on Linux (about 200 MB instead of several GB):
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
# The course's torch range, the same as in pyproject.toml (tests/test_portability.py checks it).
TORCH_REQUIREMENT := torch>=2.4,<3
STAMP := $(VENV)/.course-installed
# JupyterLab's own settings mechanism: defaults in <prefix>/share/jupyter/lab/settings/overrides.d/
LAB_OVERRIDES := jupyter/lab/settings/overrides.d/course_lib.json
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.d
LAB_ARGS ?=
PYTEST_ARGS ?=
# make test's pytest workers (pytest-xdist): each test module and each notebook stays on one worker
# (--dist loadscope, which nbval needs: a notebook's cells run in order in one kernel). 2 suits the
# 2-core machines the course is built for; TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
SUBMISSIONS ?= submissions
GRADEBOOK ?= gradebook
GRADE_ARGS ?=
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
PIP := $(BIN)/python -m pip install --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
NBVAL := $(BIN)/python -m pytest --nbval --nbval-current-env --nbval-sanitize-with nbval_sanitize.cfg \
	--nbval-cell-timeout=300
# The solution notebooks that train or measure: `make test-portable` runs them on other
# floating-point paths (00 only counts integers).
PORTABLE_NOTEBOOKS ?= $(filter-out solutions/00_%,$(sort $(wildcard solutions/[0-9][0-9]_*.ipynb)))
PORTABLE_PATHS ?= ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE

.PHONY: setup lab test test-unit test-e2e test-portable time-notebooks nbval lint release \
	release-check grade grade-demo bench check-python help

help:
	@echo "make lab      open the course in JupyterLab (blocks the terminal; LAB_ARGS='--no-browser --port 8899' for headless)"
	@echo "make test     ruff + unit tests + release check + nbval over solutions/"
	@echo "make test-e2e JupyterLab + widgets in headless Chromium"
	@echo "make test-portable   nbval over the training/measuring notebooks on two other floating-point paths"
	@echo "make time-notebooks  print each solution notebook's nbval wall time (a benchmark)"
	@echo "make release  regenerate notebooks/ from solutions/"
	@echo "make grade SUBMISSIONS=dir GRADEBOOK=dir [GRADE_ARGS='--jobs 2 --shard 1/4']   grade student submissions"
	@echo "make grade-demo   grade a demo class built from the course itself"
	@echo "make bench    print the performance tables"
	@echo "make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   CPU-only torch on Linux"

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: '$(PYTHON)' not found; install Python >= 3.10 or pass PYTHON=/path/to/python3" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v >= (3, 10) else "error: Python >= 3.10 is required, but $(PYTHON) is %d.%d; pass PYTHON=/path/to/python3.11" % v)'

# Three stages, each announced with what it does and how long it takes; pip's own progress shows.
$(STAMP): pyproject.toml $(CONSTRAINTS) $(LAB_OVERRIDES) | check-python
	@test -x $(BIN)/python || { echo "== [1/3] creating the virtual environment $(VENV) (seconds) ..."; $(PYTHON) -m venv $(VENV); } \
		|| { echo "error: could not create the virtual environment $(VENV)" >&2; exit 1; }
	@echo "== [2/3] installing PyTorch ($(TORCH_REQUIREMENT), constraints: $(or $(CONSTRAINTS),none)) from $(or $(TORCH_INDEX_URL),PyPI)."
	@echo "   PyPI's default build is the CUDA one on Linux (several GB: can take 10 minutes or more to"
	@echo "   download) and a CPU one on macOS/Windows; a CPU-only Linux machine can pass"
	@echo "   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu instead (see README). Already installed: seconds."
	@$(PIP) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_REQUIREMENT)" \
		|| { echo "error: installing PyTorch failed (pip's message is above); nothing else was run" >&2; exit 1; }
	@echo "== [3/3] installing the course and its dependencies (JupyterLab, bitsandbytes, matplotlib, pytest, ...)"
	@echo "   into $(VENV): about 3-5 minutes on 2 cores the first time, longer on a slow network."
	@$(PIP) -e ".[dev]" \
		|| { echo "error: installing the course failed (pip's message is above); nothing else was run" >&2; exit 1; }
	@mkdir -p $(LAB_SETTINGS) && cp $(LAB_OVERRIDES) $(LAB_SETTINGS)/course_lib.json
	@echo "== set-up done: JupyterLab settings for the course in $(LAB_SETTINGS)/course_lib.json"
	@touch $(STAMP)

setup: $(STAMP)

lab: setup
	@echo "JupyterLab runs in this terminal until you stop it (Ctrl+C twice); use a second terminal for anything else."
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
	$(NBVAL) $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope) tests solutions $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# Only the browser tests; unlike `make test` (which skips them without a browser) they must run:
# a missing Chromium (Debian's `chromium`) or playwright fails. Artifacts: artifacts/e2e/.
test-e2e: setup
	COURSE_E2E=require $(BIN)/python -m pytest tests/e2e -rs $(PYTEST_ARGS)

# The stored outputs must not depend on the CPU. These two variables move this machine onto other
# kernel paths (PyTorch's portable non-SIMD kernels; MKL's compatible code path), which change the
# last bits of sums and matmuls as another CPU would. One nbval run per path, both at once (the
# training notebooks use one thread each); each run's log is printed when both have finished.
# A comma joins variables into one run: PORTABLE_PATHS=ATEN_CPU_CAPABILITY=default,MKL_CBWR=COMPATIBLE
# takes half the time but proves less (one combined path instead of two separate ones).
test-portable: setup
	@logs=$$(mktemp -d); pids=(); \
	echo "nbval on other floating-point paths ($(PORTABLE_PATHS)), in parallel: about 8 minutes on 2 cores (one combined path on two workers: about half)"; \
	for path in $(PORTABLE_PATHS); do \
		env $${path//,/ } $(NBVAL) $(PORTABLE_NOTEBOOKS) $(PYTEST_ARGS) >"$$logs/$$path.log" 2>&1 & pids+=($$!); \
	done; \
	status=0; i=0; \
	for path in $(PORTABLE_PATHS); do \
		if wait $${pids[$$i]}; then result=passed; else result=FAILED; status=1; fi; i=$$((i + 1)); \
		echo "===== $$path: $$result"; cat "$$logs/$$path.log"; \
	done; \
	rm -rf "$$logs"; \
	if [ $$status -ne 0 ]; then echo "error: nbval failed on another floating-point path: a stored output is not portable (see above)" >&2; fi; \
	exit $$status

# A benchmark, not a test: runs each solution notebook under nbval, one after the other, and prints
# its wall time against the budget (90 s a notebook, 5 minutes for the course, on 2 cores).
time-notebooks: setup
	$(BIN)/python benchmarks/time_notebooks.py $(TIME_ARGS)

nbval: setup
	$(NBVAL) solutions $(PYTEST_ARGS)

grade: setup
	$(BIN)/course grade "$(SUBMISSIONS)" --out "$(GRADEBOOK)" $(GRADE_ARGS)

grade-demo: setup
	$(BIN)/course grade --demo grade-demo --jobs 2

bench: setup
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python "$$f" || exit 1; done
