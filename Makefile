# Each target creates .venv if it is missing and installs what it needs, so every target
# works on a fresh clone. The stamps re-install when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install install-dev demo test lint format bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# runtime only: what `make demo` needs (no PyTorch)
$(VENV)/.installed-runtime: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e .
	touch $@

# tests and benchmarks: PyTorch (the reference), transformers, tokenizers, tiktoken, lm-eval.
# torch is pinned and installed first so that nothing pulls a multi-GB CUDA build.
$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,eval,data]"
	touch $@ $(VENV)/.installed-runtime

install: $(VENV)/.installed-runtime
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed-runtime
	rm -rf runs/quickstart  # the demo starts afresh each time (handgrad train refuses to overwrite a run)
	$(VENV)/bin/handgrad train quickstart --out runs/quickstart
	$(VENV)/bin/handgrad sample --checkpoint runs/quickstart --num-samples 2 --max-new-tokens 200

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check handgrad tests benchmarks
	$(VENV)/bin/ruff format --check handgrad tests benchmarks
	@! grep -rnE '^\s*(import|from)\s+(torch|jax|tensorflow)\b' handgrad || \
		(echo "handgrad/ must not import torch/jax/tensorflow" && false)

test: lint
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
		$(VENV)/bin/pytest -n 2 -q -p no:cacheprovider --durations=15 tests

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix handgrad tests benchmarks
	$(VENV)/bin/ruff format handgrad tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
