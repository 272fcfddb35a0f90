# The two commands of the README: `make run` and `make test`. Each creates the
# virtual environment and installs the pinned dependencies the first time.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-gpu test-slow bench gpu-check install browser haproxy clean

BENCH_STAMP := $(VENV)/.installed-bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(BENCH_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/raytrade up

# Debian's chromium for the dashboard's browser tests (Playwright drives it; nothing is downloaded).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# Debian's haproxy for serve.proxy = "haproxy" and its end-to-end test; where apt cannot
# install it, that test is skipped and says so.
haproxy:
	command -v haproxy >/dev/null || (apt-get update -qq && apt-get install -y -qq haproxy >/dev/null) \
		|| echo "haproxy not installed: tests/test_haproxy.py will be skipped"

# Everything but the gpu tests, the slow ones included (a bare `pytest` leaves out `slow` too).
test: $(STAMP) browser haproxy
	$(BIN)/python -m pytest -m "not gpu"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu -rs

# On a GPU machine: the gpu tests and the GPU lines of the benchmarks, under 8 minutes, one summary.
gpu-check: $(BENCH_STAMP)
	bash bench/gpu_check.sh

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(BENCH_STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .raytrade
