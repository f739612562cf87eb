# visrec: on a fresh machine with Python >= 3.10 and make, `make demo` and `make test` do all the set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
# A machine without a GPU can take PyTorch's CPU-only build (far smaller than the CUDA build PyPI serves on
# Linux): make demo TORCH_INDEX_URL=<PyTorch's CPU wheel index, from its install selector>
TORCH_INDEX_URL ?=

.PHONY: setup setup-dev data demo test lint bench clean

# the runtime only: what `make demo` needs
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX_URL),$(BIN)/python -m pip install --index-url $(TORCH_INDEX_URL) torch torchvision)
	$(BIN)/python -m pip install -e .
	touch $(STAMP)

# plus the test and lint tools (pytest, ruff, Playwright, httpx, the Postgres driver): what `make test` needs
setup-dev: $(DEVSTAMP)

$(DEVSTAMP): $(STAMP)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(DEVSTAMP)

data: setup
	@VISREC=$(BIN)/visrec sh scripts/get-data.sh

demo: data
	$(BIN)/visrec train fashion-mnist
	@echo "(from this checkout, TensorBoard is $(BIN)/tensorboard --logdir runs)"

test: setup-dev data
	@sh scripts/get-test-services.sh
	$(BIN)/python -m pytest -q

lint: setup-dev
	$(BIN)/ruff check src tests bench

bench: data
	$(BIN)/python bench/default_job.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache src/*.egg-info
