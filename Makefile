# The README's two commands: `make demo` and `make test`. Both create .venv and install skAIn first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev

.PHONY: setup allocator demo test test-fast clean

setup: $(VENV)/.installed-$(EXTRAS) allocator

# tcmalloc keeps training's large buffers between steps (glibc maps and unmaps them: 20-38% of the CPU time in
# the kernel); skain preloads it when installed and tunes glibc otherwise (src/skain/runtime_env.py).
# Installed here only as root with apt-get; anywhere else this says how and goes on.
allocator:
	@$(BIN)/python -c "import sys; from skain.runtime_env import find_tcmalloc; sys.exit(find_tcmalloc() is None)" \
	|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	     && { apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
	          || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }; } ; } \
	|| echo "note: tcmalloc not installed (apt-get install libtcmalloc-minimal4); skain uses tuned glibc malloc"

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup  ## synthetic demo data -> short cpu-preset training -> web app on http://localhost:5000
	$(BIN)/skain demo

test: setup  ## the whole test suite (what CI runs)
	$(BIN)/python -m skain.runtime_env $(BIN)/python -m pytest -q --durations=15

test-fast: setup  ## skip the slow (real-data, browser, multi-process) tests
	$(BIN)/python -m skain.runtime_env $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf outputs dataset_train dataset_test .pytest_cache
