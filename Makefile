# One-command set-up: every target builds .venv from requirements.txt when it is missing or
# older than requirements.txt, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test test-fast lint bench demo clean

# Synthetic data, pre-training, fine-tuning on both benchmarks, embeddings, results tables and report (4-5 minutes on 2 cores).
demo: $(VENV)/.installed
	PYTHON=$(PY) bash demo.sh

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Scratch files of the tests (checkpoints of hundreds of MB) in memory where /dev/shm is writable: on a shared
# virtual disk, writing them costs more than the training steps. A TMPDIR of the caller's own wins.
TEST_TMPDIR := $(or $(TMPDIR),$(shell test -d /dev/shm -a -w /dev/shm && echo /dev/shm),/tmp)
PYTEST := OMP_NUM_THREADS=1 TMPDIR=$(TEST_TMPDIR) $(PY) -m pytest -q -n auto --maxprocesses 4

# Tests in parallel processes (pytest-xdist), one torch thread each, the slow ones first (tests/conftest.py):
# 176 s measured on 2 idle cores.
test: $(VENV)/.installed
	$(PYTEST) tests

# The tests not marked slow (no script runs, subprocesses or large models): under a minute, while editing.
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow" tests

# ruff with the project's rules (pyproject.toml): pyflakes, pycodestyle at 120 columns, import order, bugbear, pyupgrade.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# CPU benchmarks (the training step at toy sizes; on a GPU machine run bash bench/gpu_check.sh).
bench: $(VENV)/.installed
	$(PY) bench/bench_losses.py
	$(PY) bench/bench_data.py
	$(PY) bench/bench_train.py --tiny --device cpu

clean:
	rm -rf $(VENV) demo .pytest_cache
