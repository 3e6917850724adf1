# LeakLab: `make demo` runs the quickstart notebook into reports/, `make test` runs every test.
# Both create .venv on first use (python3 only; no conda, no GPU) and install the toolkit into it.
#
# Variables (make VAR=value ...):
#   TORCH_INDEX  pip index to take torch from, e.g. https://download.pytorch.org/whl/cpu (PyTorch's
#                CPU wheels, about 200 MB) on a machine whose pip would otherwise take PyPI's CUDA
#                build (several GB). Empty (default): plain `pip install torch==2.13.0`.
#   JOBS         pytest-xdist workers for `make test` (default: one per CPU core; 1 runs serially).
#                Each worker runs torch, OpenMP and MKL on one thread (tests/conftest.py).
#   PORT         the port of `make lab` (JupyterLab) and `make dashboard` (Voila) (default 8888).
#   BROWSER      yes (default) opens a browser for `make lab` / `make dashboard`; no for a headless or
#                remote machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_INDEX ?=
JOBS   ?= $(shell nproc 2>/dev/null || echo 1)
PORT   ?= 8888
BROWSER ?= yes
PYTEST_ARGS ?=

TORCH_PIN := $(shell sed -n 's/^\(torch==[^ ]*\).*/\1/p' constraints.txt)
LAB_FLAGS := --port=$(PORT) $(if $(filter no,$(BROWSER)),--no-browser,) $(if $(filter 0,$(shell id -u)),--allow-root,)
XDIST     := $(if $(filter 0 1,$(JOBS)),,-n $(JOBS) --dist loadgroup)

.PHONY: demo test lab dashboard bench figures clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet "$(TORCH_PIN)" --index-url $(TORCH_INDEX),)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[notebooks,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m toolkit.report notebooks/00_quickstart.ipynb --out reports

test: $(STAMP)
	$(if $(XDIST),OMP_NUM_THREADS=1 MKL_NUM_THREADS=1,) $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

# The leakage explorer (notebooks/01_leakage_explorer.ipynb) as a web app: Voila on 127.0.0.1:$(PORT), no code
# shown; BROWSER=no for a headless machine.
dashboard: $(STAMP)
	$(VENV)/bin/voila notebooks/01_leakage_explorer.ipynb --Voila.ip=127.0.0.1 --port=$(PORT) \
		$(if $(filter no,$(BROWSER)),--no-browser,)

# Every paper figure (toolkit.figures) into reports/figures/: a PNG and its CSV each, and index.html.
figures: $(STAMP)
	$(PY) -m toolkit.figures --out reports/figures

bench: $(STAMP)
	$(PY) benchmarks/split_overhead.py

clean:
	rm -rf $(VENV) reports .pytest_cache
