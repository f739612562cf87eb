# visrec: on a fresh machine with Python >= 3.10 and make, `make demo` and `make test` do all the set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup data demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

data: setup
	@VISREC=$(BIN)/visrec sh scripts/get-data.sh

demo: data
	$(BIN)/visrec train fashion-mnist
	@echo "(from this checkout, TensorBoard is $(BIN)/tensorboard --logdir runs)"

test: data
	@sh scripts/get-test-services.sh
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench

bench: data
	$(BIN)/python bench/default_job.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache src/*.egg-info
