# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv from nothing when it is missing (CPU torch pinned by TORCH; override for CUDA builds).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sentimerge run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf runs .pytest_cache
