# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Triton 2.51 server and perf_analyzer 2.51: their wheels pin numpy<2 for Python code retool never imports
SERVE_NODEPS := nvidia-pytriton==0.7.0 tritonclient==2.51.0
export TF_CPP_MIN_LOG_LEVEL := 3
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo lint test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray,deploy,sign]'
	$(PY) -m pip install -q --no-deps $(SERVE_NODEPS) kserve==0.21.0
	@# perf_analyzer links libb64.so.0d (Debian libb64-0d)
	@test -e /usr/lib/x86_64-linux-gnu/libb64.so.0d || ldconfig -p | grep -q libb64.so.0d || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -qq && apt-get install -y -qq libb64-0d; \
	    else echo "install: perf_analyzer needs libb64.so.0d: run sudo apt-get install libb64-0d"; fi; }
	touch $(STAMP)

demo: install
	$(PY) examples/demo.py

lint: install
	$(PY) -m ruff check .

# Two workers for the tests that time nothing (about half the wall time on 2 cores); the `serial` ones,
# whose outcome rests on timings or a quiet machine, run alone afterwards.
test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not serial" --durations=15
	$(PY) -m pytest -q -p no:xdist -m serial --durations=10

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# the peers the bench measures retool against (pyproject extra "bench"); never part of `make install`
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	$(PY) bench/run.py --out bench/results

clean:
	rm -rf $(VENV) demo-out model-repo .pytest_cache
