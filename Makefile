# The README's two commands: `make demo` and `make test`. Both create .venv and install skAIn first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev
DEMO_EXTRAS ?= web
SYNTHETIC_DEMO := outputs/demo-synthetic

.PHONY: setup allocator demo demo-synthetic test test-fast model clean

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

# .installed-<extras>: skAIn installed (editable) with those extras; redone when pyproject.toml changes
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-$(DEMO_EXTRAS) allocator  ## the HAM10000 model shipped with skAIn on http://localhost:5000 (no training)
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
