# `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-poll bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

## run: install, then run the daemon on ./config.yaml (Ctrl-C stops it)
run: $(STAMP)
	$(BIN)/kinod run --config config.yaml

## test: install, then lint and run the test suite
test: $(STAMP)
	$(BIN)/ruff check kinod tests
	$(BIN)/pytest

## test-poll: the end-to-end suite again, every daemon in poll mode (as on NFS)
test-poll: $(STAMP)
	KINOD_WATCH=poll KINOD_POLL_INTERVAL_S=0.2 $(BIN)/pytest tests/test_e2e_*.py

## bench: measure kinod against its baselines; writes bench/RESULTS.md (takes minutes)
bench: $(STAMP)
	$(BIN)/python bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check kinod tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
