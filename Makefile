# The two commands a newcomer needs: `make demo` and `make test`. Both create / refresh .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export JAX_COMPILATION_CACHE_DIR := $(CURDIR)/.cache/jax

.PHONY: test test-slow demo app bench-cpu clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,faces,tfds,app]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python -m infer.demo --out demo_out

# the web app on the embedded SynthFace models `make demo` trains (python -m infer.app --help: real weights)
app: $(STAMP)
	$(BIN)/python -m infer.app

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/unet_cpu.py

clean-venv:
	rm -rf $(VENV)
