# LeakLab: `make demo` runs the quickstart notebook into reports/, `make test` runs every test.
# Both create .venv on first use (python3 only; no conda, no GPU) and install the toolkit into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lab bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[notebooks,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m toolkit.report notebooks/00_quickstart.ipynb --out reports

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) benchmarks/split_overhead.py

clean:
	rm -rf $(VENV) reports .pytest_cache
