# Each target sets itself up first (scripts/bootstrap.py: idempotent, quick when done).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.traindyn-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint bench docs notebooks clean

$(STAMP): pyproject.toml scripts/bootstrap.py
	$(PYTHON) scripts/bootstrap.py --venv $(VENV)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/traindyn demo

# two pytest-xdist workers, one thread each (tests/conftest.py): both cores of a 2-core machine
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# the API reference from the docstrings (pdoc), into docs/api/; any pdoc warning fails it
docs: $(STAMP)
	$(BIN)/python docs/build_api.py docs/api

# re-execute every notebook at full size and save it with its outputs and code hash
# (tests/test_notebook_outputs.py checks that committed outputs match the code)
notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py notebooks/*.ipynb

clean:
	rm -rf $(VENV) runs .pytest_cache
