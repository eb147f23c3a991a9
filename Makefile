# lorastream: `make demo` runs the pipeline on a local broker, `make test` checks everything.
# Each target does its own setup on a fresh machine: the virtualenv in .venv/ (pinned by
# constraints.txt), the Kafka jars from Maven Central (on the first broker start), the broker.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: setup demo test unit lint format typecheck bench soak gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(BIN)/lorastream demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy schemas streams trainer lorastream

# Most of the suite waits on the broker or on a subprocess, so it runs on $(TEST_WORKERS) xdist
# workers sharing the one broker the controller starts; the tests marked `timed` (wall time,
# memory) run one after another on one of them. Every run prints its 25 slowest tests.
# One torch/OpenMP thread per process: the workers and the trainers they start already
# outnumber the cores, and idle OpenMP threads spin (every process gets the same setting,
# so the tests that compare a subprocess's files with an in-process run still compare like
# with like).
TEST_WORKERS ?= 4
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
test: lint typecheck
	$(TEST_ENV) $(BIN)/python -m pytest -ra -n $(TEST_WORKERS) --dist loadgroup --durations=25

# The inner loop, under a minute: every test that needs no broker and no S3Proxy, less the
# wall-time and memory bounds (`make test` runs those), on two workers.
unit: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not integration and not timed" -n 2 --durations=10

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every benchmark in bench/, one after the other, then BENCHMARKS.md from their figures
# (about 15 minutes here).
bench: setup
	$(BIN)/python bench/run_all.py

# Not part of `make test`: about 15 minutes of SIGKILLs and broker restarts, then a report.
# `make soak SOAK_ARGS=--s3` keeps the adapters in a bucket of a real S3Proxy.
SOAK_ARGS ?=
soak: setup
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# The lent GPU machine has torch, transformers and PEFT but no registry: the rest of what
# the trainer imports, as wheels for its Python 3.12, to carry as .whl/ (bench/gpu/).
GPU_WHEELS := aiokafka async-timeout orjson pydantic pydantic-core pydantic-settings \
	typing-inspection annotated-types prometheus-client python-dotenv
gpu-wheels: setup
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  -c constraints.txt -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
