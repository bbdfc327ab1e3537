# `make` sets up everything; `make test` runs the whole suite (as root).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ROOTFS := build/rootfs
STAMPS := build/stamps
CBITS  := sandbox/runtime/libolsys.so sandbox/runtime/_olsys.py

.PHONY: all deps venv cbits rootfs test quickstart bench bench-deps clean

all: deps venv cbits rootfs

deps: $(STAMPS)/deps
$(STAMPS)/deps: scripts/install-deps.sh
	@scripts/install-deps.sh
	@mkdir -p $(STAMPS) && touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt $(STAMPS)/deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

cbits: $(CBITS)
$(CBITS) &: cbits/olsys.c cbits/shell.c cbits/olsys.h cbits/build.py setup.py $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace
	@touch $(CBITS)  # setuptools copies with the mtime of its cached build

rootfs: $(ROOTFS)/.ol-rootfs.json
$(ROOTFS)/.ol-rootfs.json: rootfs/build.py $(CBITS)
	$(PY) -m rootfs.build --out $(ROOTFS)

test: all
	$(PY) -m pytest -q tests

quickstart: all
	@scripts/quickstart.sh

# The peers the benchmark compares against, and wrk for throughput.
bench-deps: $(STAMPS)/bench-deps
$(STAMPS)/bench-deps: scripts/install-deps.sh
	@scripts/install-deps.sh bubblewrap crun runc wrk util-linux
	@mkdir -p $(STAMPS) && touch $@

bench: all bench-deps
	$(PY) scripts/bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build $(CBITS) cbits/*.o
