# The two commands a newcomer needs: `make demo` and `make test`. Both create / refresh .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export JAX_COMPILATION_CACHE_DIR := $(CURDIR)/.cache/jax

.PHONY: test test-slow demo demo-full base app bench-cpu clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,faces,tfds,app]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# the demo starts from the shipped SynthFace base (assets/synthface_base); demo-full trains the base too
demo: $(STAMP)
	$(BIN)/python -m synthface.demo --out demo_out

demo-full: $(STAMP)
	$(BIN)/python -m synthface.demo --out demo_out_full --rebuild-base

# retrain the shipped base in place (rarely: every rebuild adds its weights to the repository's history)
base: $(STAMP)
	$(BIN)/python -m synthface.demo_base --out assets/synthface_base --work demo_out/base_work

# the web app on the embedded SynthFace models `make demo` trains (python -m infer.app --help: real weights)
app: $(STAMP)
	$(BIN)/python -m infer.app

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/unet_cpu.py

clean-venv:
	rm -rf $(VENV)
