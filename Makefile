# The two commands a newcomer needs: `make serve` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPO ?= model_repository
WEIGHTS ?= weights
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv serve export test lint bench clean

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,openvino,export,bench,dev]"
	touch $(BIN)/activate

venv: $(BIN)/activate

# Export the paper set (checkpoints from $(WEIGHTS)/ where present, random weights otherwise;
# versions already present with the same weights are skipped), then serve it.
export: venv
	$(BIN)/python -m export --preset paper --weights-dir $(WEIGHTS) --out $(REPO)

serve: export
	$(BIN)/python -m service --model-repository $(REPO) --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

bench: export
	$(BIN)/python -m bench engine --repository $(REPO) --compare-torch

clean:
	rm -rf $(REPO) bench-results
