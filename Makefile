# The README's two commands: `make demo` (the main job on the embedded tiny checkpoint) and
# `make test` (the suite). Both create .venv on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := .difflower-demo
PROMPT ?= a watercolor painting of a lighthouse at sunset

.PHONY: demo test test-slow lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned to 2.13.0 in pyproject.toml: a bare `torch` could pull a multi-GB CUDA build.
# The demo and the tests use every backend this machine runs: ONNX Runtime, OpenVINO and
# TorchScript on the CPU (Core ML prediction, TensorRT and Neuron need other hardware).
BACKENDS := onnx openvino torchscript

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[onnx,openvino]'
	touch $@

# The pages' tests drive Chromium and its driver from Debian's packages: installed here where this
# user may (root with apt-get); elsewhere those tests skip, saying what to install.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,lint,onnx,openvino,coreml,bench,tensorrt-tools,serve,ray]'
	@if ! command -v chromedriver >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver (Debian packages) for the page tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	    || echo "could not install them: the page tests will skip"; \
	fi
	touch $@

demo: $(VENV)/.installed
	$(BIN)/difflower tiny $(DEMO)/tiny-sd --family sd --seed 0 --overwrite
	$(BIN)/difflower generate $(DEMO)/tiny-sd --prompt "$(PROMPT)" --steps 20 --seed 0 -o $(DEMO)/eager.png
	set -e; for backend in $(BACKENDS); do \
	  $(BIN)/difflower export $(DEMO)/tiny-sd --backend $$backend --out $(DEMO)/tiny-sd-$$backend --overwrite; \
	  $(BIN)/difflower generate $(DEMO)/tiny-sd-$$backend --prompt "$(PROMPT)" --steps 20 --seed 0 \
	    -o $(DEMO)/$$backend.png; \
	  $(BIN)/difflower validate $(DEMO)/tiny-sd-$$backend --reference $(DEMO)/tiny-sd --steps 20 \
	    --json $(DEMO)/validate-$$backend.json; \
	done

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# The checks kept out of the default run (other families and modes of default tests).
test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m slow

# The import contract and the type check read the package as installed (the stage folders sit at
# the repository root and map into difflower.* only through pyproject's package-dir).
LINT_BUILD := .lint-build

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf $(LINT_BUILD) build
	$(BIN)/python -m pip install --quiet --no-deps --target $(LINT_BUILD) . 2>&1 | grep -v -i warning || true
	rm -rf build
	test -f $(LINT_BUILD)/difflower/graph_passes/calibration_prompts.txt  # package data reaches a wheel install
	cd $(LINT_BUILD) && ../$(BIN)/lint-imports ../pyproject.toml
	cd $(LINT_BUILD) && ../$(BIN)/mypy --config-file ../pyproject.toml -p difflower.reference -p difflower.validate

clean:
	rm -rf $(DEMO) .pytest_cache $(LINT_BUILD)
