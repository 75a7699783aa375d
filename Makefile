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
NAME ?=
SEGMENTER ?=
IMAGES ?=
OUT ?=
# Paths reach the recipes through the environment ("$$RUNS"), so spaces, quotes and non-ASCII survive intact.
export RUNS RUN SEGMENTER IMAGES OUT

# Runs `python -m $(1)` in one process, or under torchrun when NPROC > 1.
launch = if [ "$(NPROC)" -gt 1 ]; then \
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m $(1) $(2); \
	else $(PY) -m $(1) $(2); fi

.PHONY: install test test-slow lint demo train-puis fit-kmeans eval compare predict bench gpu-check

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

method_config = $(call method_dir,$(1))/configs/$(DATASET).yaml
train_args = --config $(call method_config,$(1)) $(if $(BASE),base_segmenter=$(BASE)) $(ARGS)
# The run name the seeds extend: NAME=, else a name= in ARGS, else the config file's `name:` (read below).
seed_name = $(or $(NAME),$(patsubst name=%,%,$(lastword $(filter name=%,$(ARGS)))))
config_name = $(PY) -c 'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get("name") or "default")'

# `make train-<method> DATASET=... NPROC=... ARGS=... [BASE=<segmenter.pt2>] [SEEDS="0 1 2" [NAME=...]]`: every
# method, one rule. With SEEDS, one run per seed, one after the other: seed=<k> name=<name>_seed<k> (after ARGS,
# so they win), which `make compare` groups into mean ± std.
train-%: install
	@test -f $(call method_dir,$*)/train.py || { echo "make train-$*: no method directory $*/ or baselines/$*/"; exit 2; }
	@test -f $(call method_config,$*) || { echo "make train-$*: no config \
	$(call method_config,$*); pick DATASET= from: $$(ls $(call method_dir,$*)/configs | sed 's/.yaml//' | tr '\n' ' ')"; exit 2; }
	@if [ -z "$(strip $(SEEDS))" ]; then \
	$(call launch,$(call method_module,$*),$(call train_args,$*)); \
	else \
	name="$(seed_name)"; [ -n "$$name" ] || name=$$($(config_name) $(call method_config,$*)) || exit 2; \
	for k in $(SEEDS); do \
	echo "[seeds] $*: seed $$k -> name=$${name}_seed$$k"; \
	$(call launch,$(call method_module,$*),$(call train_args,$*) seed=$$k name=$${name}_seed$$k) || exit $$?; \
	done; \
	fi

# PU-SegNet is known to its users as PUIS.
train-puis: train-pusegnet

fit-kmeans: train-kmeans

# Evaluate one run (RUN=runs/<method>/<dataset>/<name>): the comparison's metrics, written into $(RUN)/eval.
eval: install
	@test -n "$$RUN" || { echo "make eval needs RUN=<run directory>"; exit 2; }
	$(PY) -m compare.run --dataset $(DATASET) --run "$$RUN" --out "$$RUN/eval" $(ARGS)

# RUNS: run directories or segmenter.pt2 files, separated by newlines or commas (or spaces, for paths without any).
compare: install
	$(PY) -m compare.run --dataset $(DATASET) --runs "$$RUNS" $(ARGS)

# `make predict SEGMENTER=<run dir or segmenter.pt2> IMAGES=<folder or image> OUT=<folder> [ARGS="--post crf"]`
predict: install
	@test -n "$$SEGMENTER" -a -n "$$IMAGES" -a -n "$$OUT" || { echo "make predict needs SEGMENTER=<run directory \
	or segmenter.pt2> IMAGES=<folder or image> OUT=<folder>"; exit 2; }
	$(PY) -m shared.predict --segmenter "$$SEGMENTER" --images "$$IMAGES" --out "$$OUT" $(ARGS)

bench: install
	$(PY) -m benchmarks.run_all $(ARGS)

# Everything that needs CUDA, in one command (under 8 minutes); run first when a GPU is lent.
gpu-check: install
	$(PY) -m benchmarks.gpu_check
