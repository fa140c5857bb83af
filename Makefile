# The README, this Makefile and CI say the same thing: `make demo`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint bench-cpu clean

setup: $(STAMP)

# torch is pinned to the CPU wheel that lies on disk here; unpinned, pip pulls a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy src
	$(VENV)/bin/lint-imports
	TORCHREFIT_CHECK=1 $(PY) -m pytest -q -ra --durations=10

demo: setup
	$(PY) examples/demo.py

lint: setup
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy src
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build dist src/*.egg-info
