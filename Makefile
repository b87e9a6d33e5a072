# The README's two commands: `make demo` and `make test`. Both create .venv and install skAIn first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup  ## synthetic demo data -> short cpu-preset training -> web app on http://localhost:5000
	$(BIN)/skain demo

test: setup  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup  ## skip the slow (real-data, browser, multi-process) tests
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf outputs dataset_train dataset_test .pytest_cache
