# Two commands on a fresh machine: `make demo` and `make test` (`make test-fast` in the edit loop). All create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# constraints.txt pins torch to the CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/medsight demo --out demo-output --overwrite

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2  # one worker per core, one thread each

# the edit loop: everything but the tests marked slow (those train a model)
test-fast: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not slow"

clean:
	rm -rf $(VENV) demo-output .pytest_cache
