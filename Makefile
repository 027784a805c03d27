# tandem — two commands do all set-up on a fresh machine:
#   make demo   install (first time only) and run the tiny CPU demo
#   make test   install (first time only) and run the whole test suite (what CI runs)
# make test-fast runs the tests not marked slow: the edit loop, under a minute on 2 cores. Among them the trainer,
# session and resume logic through fakes (tests/fakes.py) and each benchmark's --tiny smoke run (the only fast tests
# that start Ray or a job in a subprocess); the other end-to-end jobs, Ray clusters and browsers are slow.
# A second run reuses .venv and starts in seconds.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.tandem-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast install system-deps clean

demo: $(STAMP)
	rm -rf runs/demo/ar runs/demo/decoder
	$(VENV)/bin/tandem train ar --config configs/demo/ar.yaml
	$(VENV)/bin/tandem train decoder --config configs/demo/decoder.yaml

# Two pytest workers (pytest-xdist; a module's tests stay on one worker, so its fixtures are built once), one
# intra-op thread each: the tests wait on subprocesses, Ray and Python more than on arithmetic.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadscope $(PYTEST_ARGS)

# Modules go to the workers in file order (tests/benchmarks/ first: one smoke run each, the longest fast tests), not
# the modules with the most tests first, which would leave the smoke runs as one worker's tail.
test-fast: PYTEST_ARGS := -m "not slow" --no-loadscope-reorder
test-fast: test

install: $(STAMP)

# Debian packages: a CJK font for the rendered-text OCR tests, GL/glib for OpenCV, chromium for the
# headless screenshot of `tandem report` in tests/rl/test_report.py. Installed only when missing.
system-deps:
	@if ! fc-list 2>/dev/null | grep -qi "wenquanyi\|noto sans cjk" || ! command -v chromium >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq fonts-wqy-microhei fonts-dejavu-core libgl1 libglib2.0-0 fontconfig chromium >/dev/null; \
	fi

$(STAMP): pyproject.toml constraints.txt | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip uv
	# Keep the pins in force for every later pip call inside this venv.
	printf '[global]\nconstraint = %s\n' "$(abspath constraints.txt)" > $(VENV)/pip.conf
	# Step 1: torch alone, by pip (it comes from this machine's local disk, where uv does not look).
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	# Step 2: everything else in ONE resolve against the same constraints, by uv (the torch above stays): the
	# same 131 packages as pip resolves. --compile-bytecode writes the .pyc files as pip does: where
	# PYTHONDONTWRITEBYTECODE is set, nothing else would, and every process would compile its imports again.
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -c constraints.txt -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
