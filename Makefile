SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# Set-up and the two entry points of the README: `make demo` and `make test`.
# `make install` is idempotent: system packages and the virtualenv are only touched when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,deepspeed,ffcv
STAMP := $(VENV)/.installed-$(EXTRAS)
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev slurm-wlm munge
PYTEST_ARGS ?=
# One pytest-xdist worker per core; a test file stays on one worker (its module fixtures are built once), and
# files go out in the order tests/conftest.py gives them (slowest tier first), not re-sorted by test count.
PYTEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: install system-packages demo test test-fast lint clean gpu-wheels

install: system-packages $(STAMP)

# Build dependencies of FFCV and the local SLURM test cluster (Debian). Only as root, only what is missing.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || printf '%s ' $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "apt-get install $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "warning: missing system packages ($$missing); install them as root (apt-get install $$missing)"; \
	  fi; \
	fi

# torch comes from PyPI (the CUDA build, which also runs on CPU); torchvision needs exactly that build.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -c "import torch, torchvision, faiss, omegaconf, advcl_dist; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@if [[ ",$(EXTRAS)," == *,ffcv,* ]]; then $(BIN)/python -c "import ffcv.loader, importlib.metadata as m; print('ffcv', m.version('ffcv'))"; fi
	touch $@

# `make demo SEED=1`: the whole demo again with another train.seed (every stage's random streams), in runs/demo-seed1
SEED ?=
demo: install
	$(BIN)/python tools/pipeline.py --config configs/demo.yaml $(if $(SEED),train.seed=$(SEED) out_dir=runs/demo-seed$(SEED))

test: install
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The development tier: no multi-process, SLURM or end-to-end tests (minutes, not a quarter of an hour).
test-fast: install
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not distributed and not slurm and not integration" $(PYTEST_ARGS)

# The wheels tools/gpu_check.sh carries to the GPU machine (no network there): docs/benchmarks.md, "The GPU check"
gpu-wheels: install
	PYTHON=$(BIN)/python tools/gpu_wheels.sh

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
