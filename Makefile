# Quick start: `make demo` (score a real brain with the shipped model) and `make test`.
# Both create the virtual environment they need in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data

.PHONY: test demo benchmark clean

$(BIN)/.installed: pyproject.toml
	@echo "Setting up $(VENV) (first run only, about 1-2 minutes): Python packages from PyPI..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "... PyTorch (CPU build) ..."
	# The CPU build first: an open torch range alone may pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	@echo "... the engine, Slicer's core classes for the tests, and the demo's template and plotting ..."
	$(BIN)/pip install -q -e '.[test,demo]'
	@echo "... done."
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	$(BIN)/anomaly-localizer demo --out demo-output

benchmark: $(BIN)/.installed
	$(BIN)/anomaly-localizer benchmark --data $(DATA)/ixi_t1_2mm

clean:
	rm -rf $(VENV) demo-output
