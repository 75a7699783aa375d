# Entry points. Every target installs what is missing into .venv first, so a fresh clone needs nothing else.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASET ?= camvid_sample
NPROC ?= 1
ARGS ?=
RUNS ?=
RUN ?=

# Runs `python -m $(1)` in one process, or under torchrun when NPROC > 1.
launch = if [ "$(NPROC)" -gt 1 ]; then \
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m $(1) $(2); \
	else $(PY) -m $(1) $(2); fi

.PHONY: install test test-slow lint demo train-stego fit-kmeans eval compare bench

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check .

demo: install
	$(PY) -m compare.demo $(ARGS)

train-stego: install
	@$(call launch,stego.train,--config stego/configs/$(DATASET).yaml $(ARGS))

fit-kmeans: install
	$(PY) -m baselines.kmeans.fit dataset=$(DATASET) $(ARGS)

# Evaluate one run (RUN=runs/<method>/<dataset>/<name>): the comparison's metrics, written into $(RUN)/eval.
eval: install
	@test -n "$(RUN)" || { echo "make eval needs RUN=<run directory or segmenter.pt>"; exit 2; }
	$(PY) -m compare.run --dataset $(DATASET) --runs "$(RUN)" --out "$(RUN)/eval" $(ARGS)

compare: install
	$(PY) -m compare.run --dataset $(DATASET) --runs "$(RUNS)" $(ARGS)

bench: install
	$(PY) -m benchmarks.run_all $(ARGS)
