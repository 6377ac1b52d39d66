# Entry points for people and CI. Every target that runs code depends on `venv`.
#   make venv        create .venv and install xstars in it (idempotent, re-run when pyproject changes)
#   make demo        build the offline demo world and its figures through Snakemake
#   make test        run the test suite
#   make lint        snakemake --lint
#   make clean-demo  stop the demo servers and delete the demo outputs

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xstars-installed
DEMO_ROOT ?= demo_world
CORES ?= 2

# Rules call the `xstars` command: put the venv first on PATH for Snakemake's shell jobs.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv demo test lint clean-demo

venv: $(STAMP)

# torch first and pinned: the machine's local CPU wheel satisfies `torch==2.13.0`, whereas a
# bare requirement pulled in by a dependency would fetch several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# Targets go before --config, which takes every following word as KEY=VALUE.
demo: venv
	$(BIN)/snakemake --cores $(CORES) all --config world=demo

test: venv
	$(BIN)/pytest -q

lint: venv
	$(BIN)/snakemake --lint

clean-demo:
	-test -x $(BIN)/xstars && $(BIN)/xstars demo down --root $(DEMO_ROOT)
	rm -rf $(DEMO_ROOT) results/demo logs/demo
