# Two entry points do all set-up on a fresh machine:
#   make demo   create .venv, install, run the embedded default end to end
#   make test   create .venv, install, lint (ruff), run the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	# the project's own bytecode, once: where PYTHONDONTWRITEBYTECODE is set, every process (each Ray
	# worker and actor) would otherwise compile the editable sources again (an edited module is still
	# recompiled, in memory, when its source is newer)
	$(PY) -m compileall -q omniflow pipelines jobs serve shapesworld
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m shapesworld.demo --out runs/demo

test: setup
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
