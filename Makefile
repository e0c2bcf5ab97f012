# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
# Both create .venv when it is missing and install the project with its pinned stack.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: test demo venv export clean-nbs report bench

$(STAMP): settings.ini setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location'; test $${PIPESTATUS[0]} -eq 0
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	cd nbs && ../$(VENV)/bin/nbdev_test --n_workers 2 --timing
	$(PY) -m pytest -q tests/

demo: $(STAMP)
	$(VENV)/bin/spseg demo --out $(DEMO_OUT)

export: $(STAMP)
	$(VENV)/bin/nbdev_export && $(VENV)/bin/nbdev_clean

report: $(STAMP)
	$(VENV)/bin/spseg report --out _report

bench: $(STAMP)
	$(PY) bench/synthetic_tissue.py
