# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv from nothing when it is missing (CPU torch pinned by TORCH; override for CUDA builds), with the
# exact versions of constraints.txt, the ones the README's numbers were measured with.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
CORE_STAMP := $(VENV)/.installed-core
STAMP := $(VENV)/.installed

.PHONY: demo test bench report kill-test env clean

# glibc gives each allocating thread its own malloc arena (up to 8 per core) and memory freed in one serves only that
# one: with 2, stage 1 of the demo (shared adapter and the tweets3 expert, `sentimerge experts --tasks tweets3
# --force`) peaked at 2979 and 2948 MB against 3168 and 3256 MB, in the same time (2026-12-01). glibc reads it at
# start-up, so it is set here for every command run through make; set it yourself for other launches.
export MALLOC_ARENA_MAX ?= 2

env: $(STAMP)

CONSTRAINTS ?= constraints.txt

# pip installs torch, so that pip's configuration picks its build (a CPU wheel on disk, a CUDA index); everything
# else, the same pinned versions, is installed by uv (put into the venv by that pip call): on 2 CPU cores, 6 s with
# an empty uv cache against 41 s for pip (2026-12-08). `make INSTALLER=pip ...` installs with pip alone (where uv
# cannot reach your index: it reads UV_INDEX_URL, not pip's configuration). Neither compiles at install: Python
# compiles the modules a run imports when it first imports them, not the whole of torch and transformers.
INSTALLER ?= uv
UV ?= uv==0.13.10
ifeq ($(INSTALLER),uv)
INSTALL_REST = $(BIN)/uv pip install --quiet --python $(BIN)/python
else
INSTALL_REST = $(BIN)/pip install --quiet --no-compile
endif

# the demo needs the package alone; tests and benchmarks add pytest and Ray (the extras)
$(CORE_STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile "$(TORCH)" $(if $(filter uv,$(INSTALLER)),"$(UV)")
	$(INSTALL_REST) -c $(CONSTRAINTS) -e .
	touch $(CORE_STAMP)

# the tests start many processes (CLI runs, Ray workers) that would each compile what they import: compile once here
$(STAMP): $(CORE_STAMP)
	$(INSTALL_REST) -c $(CONSTRAINTS) -e ".[dev,ray]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

demo: $(CORE_STAMP)
	$(BIN)/sentimerge run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Every benchmark, on the demo run (`make demo` first; finished stages are skipped). Results: benchmarks/results/.
BENCH_RUN ?= runs/demo
SUITE_RUN ?= runs/suite
bench: $(STAMP)
	$(BIN)/sentimerge run configs/demo.yaml --run-dir $(BENCH_RUN)
	$(BIN)/python benchmarks/training_throughput.py configs/demo.yaml --run-dir $(BENCH_RUN)
	$(BIN)/python benchmarks/scoring_efficiency.py configs/demo.yaml --run-dir $(BENCH_RUN)
	$(BIN)/python benchmarks/candidate_turnover.py configs/demo.yaml --run-dir $(BENCH_RUN)
	$(BIN)/python benchmarks/ray_overhead.py configs/demo.yaml --run-dir $(BENCH_RUN)
	$(BIN)/python benchmarks/kill_resume.py --trials 20
	$(BIN)/python benchmarks/merge_landscape.py configs/demo.yaml --run-dir $(BENCH_RUN)
	$(BIN)/python benchmarks/test_split.py configs/demo.yaml --run-dir $(BENCH_RUN)
	$(BIN)/python benchmarks/demo_report.py $(BENCH_RUN)
	@if [ -d $(SUITE_RUN)/experts ]; then $(BIN)/python benchmarks/search_scaling.py configs/suite.yaml \
		--run-dir $(SUITE_RUN) --search-run $(BENCH_RUN); else echo "search_scaling: no suite experts in $(SUITE_RUN), skipped"; fi

# The quality report on the suite (`sentimerge report`, run through the benchmark script, which copies it to
# benchmarks/results/quality_report_suite.md and records its headline keys): every merge and fine-tuning strategy
# and a multi-task LoRA on the base, compared on the dev splits; the missing stages run first (about 50 min here).
report: $(STAMP)
	$(BIN)/python benchmarks/quality_report.py configs/suite.yaml --run-dir $(SUITE_RUN)

# The complete kill-and-resume suite (the test suite runs a reduced form).
kill-test: $(STAMP)
	$(BIN)/python benchmarks/kill_resume.py --trials 20

clean:
	rm -rf runs .pytest_cache
