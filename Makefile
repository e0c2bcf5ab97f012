# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
# Both create .venv when it is missing and install the project with its pinned stack (settings.ini).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: test demo study venv export site bench

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }; test $${PIPESTATUS[0]} -eq 0
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 --timing
	$(BIN)/python -m pytest -q tests/

demo: $(STAMP)
	$(BIN)/spseg demo --out $(DEMO_OUT)

# the study's Tables 2–8 at the tiny preset on a synthetic cohort, two seeds per configuration (resumable):
# results/tiny/ (tables, runs.csv, cohort.json, figures). Passive OpenMP threads keep a shared CPU from thrashing.
STUDY_OUT ?= results/tiny
STUDY_SEEDS ?= 2
study: $(STAMP)
	$(BIN)/spseg cohort $(STUDY_OUT)/cohort --n-tissues 12 --size 480
	OMP_WAIT_POLICY=passive $(BIN)/spseg study $(STUDY_OUT)/cohort --out $(STUDY_OUT) --seeds $(STUDY_SEEDS)

# after editing notebooks: library, clean notebooks, README
export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/spseg readme

# the report site in _site/: nbdev_docs (Quarto) where quarto is on the PATH, else mkdocs-material from nbdev's
# processed notebooks (stored outputs, nothing executed); works offline
site: $(STAMP)
	$(BIN)/spseg site --out _site

bench: $(STAMP)
	for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done
