# One-command set-up: every target builds .venv from requirements.txt when it is missing or
# older than requirements.txt, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test lint bench demo clean

# Synthetic data, pre-training, fine-tuning on both benchmarks, embeddings, results tables and report (4-5 minutes on 2 cores).
demo: $(VENV)/.installed
	PYTHON=$(PY) bash demo.sh

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Tests in parallel processes (pytest-xdist), one torch thread each: 4-8 minutes on 2 cores, by the machine.
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses 4 tests

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
