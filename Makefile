# The README's two commands: `make demo` (the main job on the embedded tiny checkpoint) and
# `make test` (the suite). Both create .venv on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := .difflower-demo
PROMPT ?= a watercolor painting of a lighthouse at sunset

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned to 2.13.0 in pyproject.toml: a bare `torch` could pull a multi-GB CUDA build.
# The demo runs every backend this machine can run: ONNX Runtime on the CPU.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[onnx]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,onnx]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/difflower tiny $(DEMO)/tiny-sd --family sd --seed 0 --overwrite
	$(BIN)/difflower generate $(DEMO)/tiny-sd --prompt "$(PROMPT)" --steps 20 --seed 0 -o $(DEMO)/eager.png
	$(BIN)/difflower export $(DEMO)/tiny-sd --backend onnx --out $(DEMO)/tiny-sd-onnx --overwrite
	$(BIN)/difflower generate $(DEMO)/tiny-sd-onnx --prompt "$(PROMPT)" --steps 20 --seed 0 -o $(DEMO)/onnx.png
	$(BIN)/difflower validate $(DEMO)/tiny-sd-onnx --reference $(DEMO)/tiny-sd --steps 20 --json $(DEMO)/validate-onnx.json

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
