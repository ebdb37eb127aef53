# Quick start: `make demo` (score a real brain with the shipped model) and `make test`.
# Both create the virtual environment they need in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
# Which PyTorch build: `default` takes torch 2.13.0 from pip's configured index (with PyPI alone
# on Linux that is the CUDA build: about 530 MB plus several GB of CUDA libraries; on macOS and
# Windows, and where a local wheel folder provides it, the CPU build); `cpu` takes the CPU-only
# build from PyTorch's own index (about 200 MB). Change it on a fresh .venv (`make clean`).
TORCH ?= default
ifeq ($(TORCH),cpu)
TORCH_SOURCE := --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
TORCH_WHAT := the CPU-only build from download.pytorch.org
else
TORCH_SOURCE :=
TORCH_WHAT := from pip's configured index; on Linux with PyPI alone that is the CUDA build (GBs), use TORCH=cpu for the CPU-only one
endif

.PHONY: test demo benchmark clean

$(BIN)/.installed: pyproject.toml
	@echo "Setting up $(VENV) (first run only, about 1-2 minutes): Python packages from PyPI..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "... PyTorch 2.13.0 ($(TORCH_WHAT)) ..."
	# torch first, pinned: the engine's open torch range alone could pull another build.
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_SOURCE)
	@echo "... the engine, Slicer's core classes for the tests, and the demo's template and plotting ..."
	$(BIN)/pip install -q -e '.[test,demo]'
	@echo "... done."
	touch $@

test: $(BIN)/.installed
	@echo "Running the test suite: about 565 tests, 6-10 minutes on 2 quiet cores (much longer on a busy machine)."
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	$(BIN)/anomaly-localizer demo --out demo-output

benchmark: $(BIN)/.installed
	$(BIN)/anomaly-localizer benchmark --data $(DATA)/ixi_t1_2mm

clean:
	rm -rf $(VENV) demo-output
