# The README's two commands: `make demo` and `make test`. Both create .venv and install skAIn first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev
DEMO_EXTRAS ?= web,openvino  # openvino: the web app's default "fast" path (docs/performance.md, "Web latency and load")
SYNTHETIC_DEMO := outputs/demo-synthetic

.PHONY: setup demo demo-synthetic test test-fast model clean

setup: $(VENV)/.installed-$(EXTRAS)

# .installed-<extras>: skAIn installed (editable) with those extras; redone when pyproject.toml changes
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-$(DEMO_EXTRAS)  ## the HAM10000 model shipped with skAIn on http://localhost:5000 (no training)
	$(BIN)/skain demo

demo-synthetic: $(VENV)/.installed-$(DEMO_EXTRAS)  ## SYNTHETIC images -> short cpu training -> web app (in $(SYNTHETIC_DEMO)/)
	$(BIN)/skain demo --synthetic --output $(SYNTHETIC_DEMO)

test: setup  ## the whole test suite (what CI runs)
	$(BIN)/python -m skain.runtime_env $(BIN)/python -m pytest -q --durations=15

test-fast: setup  ## skip the slow (real-data, browser, multi-process) tests
	$(BIN)/python -m skain.runtime_env $(BIN)/python -m pytest -q -m "not slow"

model: setup  ## rebuild the shipped model: make model CSV=.../HAM10000_metadata.csv IMAGES="dir1 dir2" (hours on 2 cores)
	PATH=$(abspath $(BIN)):$$PATH bash scripts/build_model.sh

clean:  ## only what the demo and the tests made; never outputs/ runs or dataset_train/ (real data lives there)
	rm -rf $(SYNTHETIC_DEMO) .pytest_cache
