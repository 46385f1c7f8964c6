# The commands humans and CI share. Every target sets the machine up first (idempotent).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-quick test-kernels demo demo-dataplane demo-fleet check bench bench-smoke bench-readme clean

setup:
	@./scripts/setup.sh

# The suite runs over TEST_JOBS pytest-xdist workers, a whole file per worker (its module
# fixtures stay in one process; every kernel object a test names carries its process's pid),
# then the schemathesis file on its own: its plugin gives every API operation's item the same
# node id, and xdist runs one of them. PYTEST_ARGS (a selection, extra options) runs one
# plain pytest process with them instead; TEST_JOBS=1 runs the suite in one process too.
TEST_JOBS ?= 2
SCHEMA_TESTS := tests/api/test_schemathesis.py
ifeq ($(strip $(TEST_JOBS)),1)
XDIST :=
else
XDIST := -n $(TEST_JOBS) --dist loadfile
endif

## The whole suite (what CI runs).
test: setup
ifeq ($(strip $(PYTEST_ARGS)),)
	$(PY) -m pytest $(XDIST) --ignore=$(SCHEMA_TESTS)
	$(PY) -m pytest $(SCHEMA_TESTS)
else
	$(PY) -m pytest $(PYTEST_ARGS)
endif

## Everything but the slow end-to-end tests.
test-quick: setup
ifeq ($(strip $(PYTEST_ARGS)),)
	$(PY) -m pytest $(XDIST) -m "not slow" --ignore=$(SCHEMA_TESTS)
	$(PY) -m pytest -m "not slow" $(SCHEMA_TESTS)
else
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)
endif

## The data-plane suite inside other kernels booted under qemu (scripts/kernels.conf; TCG, so
## ~25 minutes per kernel). KERNELS="6.1" picks some; results in build/kernels/.
KERNELS ?=
test-kernels: setup
	@./scripts/setup-kernels.sh $(KERNELS)
	$(PY) scripts/kernels.py $(KERNELS)

## The project's main job, end to end: lab, daemon, REST calls, real traffic, teardown.
demo: setup
	$(PY) -m lb.lab.demo

## A fleet: 3 LB hosts announcing by BGP behind an ECMP router, one drained under traffic.
demo-fleet: setup
	$(PY) -m lb.lab.demo_fleet

## The data plane alone: packets through the balancer with BPF_PROG_TEST_RUN.
demo-dataplane: setup
	$(PY) -m lb.lab.demo_dataplane

check: setup
	$(VENV)/bin/ruff check lb api lbctl tests bench scripts
	$(VENV)/bin/mypy

## Every benchmark, then the README's marked section from the results. KATRAN_SRC=/path/to/katran
## adds Katran beside xlb (bench/katran/README.md names the commit).
bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.readme

bench-smoke: setup
	$(PY) -m bench.run --smoke

## The README's benchmark section from bench/results/*.json (no measuring).
bench-readme: setup
	$(PY) -m bench.readme

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/results/*.json bench/results/*.png
