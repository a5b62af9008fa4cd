# Two entry points that work on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use. torch and torchvision are installed first as a matched pair
# from the package registry: never the CPU-only torch wheel some machines keep on disk (it has no
# matching torchvision, and open_clip then fails at import).
PYTHON ?= python3
VENV ?= .venv
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.2
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Tests run single-threaded (tests/conftest.py), so one pytest-xdist worker per core uses the
# machine; worksteal evens out the few long end-to-end tests.
PYTEST_WORKERS ?= auto

.PHONY: venv test test-fast test-fuzz demo lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PAIR)
	touch $@

# pytest exits 5 when it collects no tests: treat that as a failure, never a pass.
test: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The inner loop: everything but the end-to-end runs marked slow.
test-fast: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m "not slow" \
	$(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The long fuzz tier (issue 28): 10,000 mutations a reader (DICOM, CSV, config.json, pipeline.json)
# and the issue's bombs at full size, each process bounded to 2 GiB of allocation beyond its imports
# (tests/fuzz_bound.py), plus the fault runs (tests/test_faults.py: full disk, kills). About 20
# minutes on one core; not part of `make test`.
test-fuzz: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} SPINEMM_FUZZ=1 SPINEMM_FUZZ_LONG=1 SPINEMM_FUZZ_MEMORY_GIB=2 \
	$(PY) -m pytest -q -s -n $(PYTEST_WORKERS) --dist worksteal tests/test_fuzz.py tests/test_fuzz_long.py tests/test_faults.py \
	$(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: venv
	$(VENV)/bin/spinemm demo --out demo_out --overwrite  # a rerun replaces the last demo

lint: venv
	$(VENV)/bin/ruff check spinemm recipes tests examples benchmarks

bench: venv
	$(PY) benchmarks/data_pipeline.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache build *.egg-info
