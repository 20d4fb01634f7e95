# Set-up and everyday commands. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.andromeda-installed

.PHONY: install demo test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml csrc/*.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel pybind11
	# Keep a user's own torch; install the CPU build only when the venv has none.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

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
