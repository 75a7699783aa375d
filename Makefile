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
BASE ?=
SEEDS ?=

# Runs `python -m $(1)` in one process, or under torchrun when NPROC > 1.
launch = if [ "$(NPROC)" -gt 1 ]; then \
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m $(1) $(2); \
	else $(PY) -m $(1) $(2); fi

.PHONY: install test test-slow lint demo train-puis fit-kmeans eval compare bench gpu-check

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

# A method's directory: <method>/ at the top level, or baselines/<method>/.
method_dir = $(if $(wildcard $(1)/train.py),$(1),baselines/$(1))
method_module = $(subst /,.,$(call method_dir,$(1))).train

# `make train-<method> DATASET=... NPROC=... ARGS=... [BASE=<segmenter.pt2>]`: every method, one rule.
train-%: install
	@test -f $(call method_dir,$*)/train.py || { echo "make train-$*: no method directory $*/ or baselines/$*/"; exit 2; }
	@test -f $(call method_dir,$*)/configs/$(DATASET).yaml || { echo "make train-$*: no config \
	$(call method_dir,$*)/configs/$(DATASET).yaml; pick DATASET= from: $$(ls $(call method_dir,$*)/configs | sed 's/.yaml//' | tr '\n' ' ')"; exit 2; }
	@$(call launch,$(call method_module,$*),--config $(call method_dir,$*)/configs/$(DATASET).yaml \
	$(if $(BASE),base_segmenter=$(BASE)) $(ARGS))

# PU-SegNet is known to its users as PUIS.
train-puis: train-pusegnet

fit-kmeans: train-kmeans

# Evaluate one run (RUN=runs/<method>/<dataset>/<name>): the comparison's metrics, written into $(RUN)/eval.
eval: install
	@test -n "$(RUN)" || { echo "make eval needs RUN=<run directory or segmenter.pt>"; exit 2; }
	$(PY) -m compare.run --dataset $(DATASET) --runs "$(RUN)" --out "$(RUN)/eval" $(ARGS)

compare: install
	$(PY) -m compare.run --dataset $(DATASET) --runs "$(RUNS)" $(ARGS)

bench: install
	$(PY) -m benchmarks.run_all $(ARGS)

# Everything that needs CUDA, in one command (under 8 minutes); run first when a GPU is lent.
gpu-check: install
	$(PY) -m benchmarks.gpu_check
