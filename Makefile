# tempeh: every target installs what it needs from nothing (a Python >= 3.10 on PATH).
# Cluster users choose their torch build, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Training: `make train-coarse ARGS="data.root=PATH"`, then `make train-refine ARGS="data.root=PATH"`.
# CONFIG is a folder of <stage>.yaml files (or STAGE=FILE entries); RUN is the run directory.
RUN ?= runs/tempeh
CONFIG ?= configs
ARGS ?=
# Demo output folder (everything the demo writes goes under it).
DEMO_OUT ?= demo_out
# Benchmark output folder and options (e.g. BENCH_ARGS=--quick).
BENCH_OUT ?= benchmarks
BENCH_ARGS ?=

.PHONY: install test train-coarse train-refine demo bench bench-quick clean-venv

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests $(PYTEST_ARGS)

# The embedded default end to end (synthetic capture, both stages, held-out evaluation) into
# $(DEMO_OUT); a rerun reuses finished phases (python tools/demo.py --fresh redoes everything).
demo: $(STAMP)
	$(PY) tools/demo.py --out $(DEMO_OUT)

train-coarse: $(STAMP)
	$(PY) tools/train.py --run-dir $(RUN) $(foreach c,$(CONFIG),--config $(c)) --stages coarse_pretrain,coarse,cache_coarse $(ARGS)

train-refine: $(STAMP)
	$(PY) tools/train.py --run-dir $(RUN) $(foreach c,$(CONFIG),--config $(c)) --stages refine $(ARGS)

clean-venv:
	rm -rf $(VENV)

# Benchmarks: every module in a fresh process; writes $(BENCH_OUT)/results.json and results.md.
bench: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m tempeh.bench --out $(BENCH_OUT) $(BENCH_ARGS)

bench-quick: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m tempeh.bench --quick --out $(BENCH_OUT) $(BENCH_ARGS)
