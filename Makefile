# Set-up and everyday commands. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.andromeda-installed

.PHONY: install demo test test-fast lint format bench clean

install: $(STAMP)

# The two big steps keep pip's own output (what it downloads, with progress bars): quiet, they
# looked like a hang of several minutes.
$(STAMP): setup.py pyproject.toml csrc/*.cpp
	@echo "== make install 1/3: $(VENV) with pip, setuptools, wheel, pybind11"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel pybind11
	@echo "== make install 2/3: torch 2.13.0, unless $(VENV) has a torch (the largest download)"
	# Keep a user's own torch; install the CPU build only when the venv has none.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	@echo "== make install 3/3: this package in editable mode with its [dev] tools (transformers,"
	@echo "   lm-eval, megatron-core, ...); compiles the C++ data helper"
	$(PY) -m pip install --no-build-isolation -e '.[dev]'
	touch $(STAMP)
	@echo "== make install: done; run commands as .venv/bin/python ... or 'source $(VENV)/bin/activate' first"

demo: install
	$(PY) tools/demo.py --out demo_out

test: install
	$(PY) -m pytest -q -x --durations=15 tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build *.egg-info demo_out megatron_andromeda/data/_helpers*.so megatron_andromeda/preprocess/_fast*.so
