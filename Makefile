# The two commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# torch is installed before the project so that nothing pulls a build we did not choose.
# Without an NVIDIA GPU: torch==$(TORCH_VERSION), the CPU build on the project's development and CI machines
# (found locally). Elsewhere set TORCH_INDEX to a CPU wheel index, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# With an NVIDIA GPU: the usual CUDA build from PyPI, plus the `gpu` extra (flash-attn).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_GPU),gpu,)

.PHONY: demo test install install-dev lint bench clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(if $(and $(TORCH_INDEX),$(if $(HAS_GPU),,1)),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[dev$(if $(EXTRAS),$(comma)$(EXTRAS))]"
	touch $@ $(VENV)/.installed

comma := ,

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(PY) jobs/pipeline.py --config configs/pipeline/demo.yaml

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -ra --durations=25 tests

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check phi1_ray jobs tests benchmarks serve_apps

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/model_vs_hf.py

clean:
	rm -rf runs .pytest_cache
