PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test up bench bench-scale chaos clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or: make PY=python3 ...)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/andon demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

up: $(STAMP)
	$(BIN)/andon up

bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

# the batch-submit, list and /metrics figures at 1,000,000 job rows (filling them takes minutes)
bench-scale: $(STAMP)
	$(BIN)/python bench/run.py --only-scale --scale-rows 1000000 --results bench/results-scale.json $(ARGS)

chaos: $(STAMP)
	$(BIN)/python chaos/run.py $(ARGS)

clean:
	rm -rf $(VENV) .andon .pytest_cache
