# Two commands set up a fresh machine and use it: `make demo` and `make test`.
# Both create the virtual environment on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export ZENML_ANALYTICS_OPT_IN ?= false

.PHONY: setup demo test clean gpu-check lock

setup: $(STAMP)

# pip lists each package as it collects and installs it: the first install takes a few minutes,
# and a silent one reads like a hang.
$(STAMP): pyproject.toml
	@echo "Setting up $(VENV): installing tracesft and its dependencies (a few minutes the first time)..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e ".[dev]"
	touch $@
	@echo "$(VENV) is ready: its commands are $(BIN)/tracesft, $(BIN)/mlflow, $(BIN)/zenml (or run: . $(BIN)/activate)."

demo: setup
	$(BIN)/tracesft demo

# pytest exits 5 when it collects nothing: treat that as a failure, never as a pass.
test: setup
	$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf .tracesft

# On a CUDA machine: the real 4-bit path (NF4 + LoRA + paged 8-bit AdamW) on the tiny model.
# Without a visible CUDA device every test would be skipped, which reads like a pass: fail instead.
gpu-check: setup
	@$(BIN)/python -c "import os, sys, torch; torch.cuda.is_available() or sys.exit('make gpu-check: no CUDA device is visible (CUDA_VISIBLE_DEVICES=' + os.environ.get('CUDA_VISIBLE_DEVICES', 'unset') + '); run it on a machine with an NVIDIA GPU and its driver.')"
	$(BIN)/pytest tests/gpu -m gpu -q -s

# Regenerate docker/requirements.lock (the GPU image's exact dependency set) from the tested venv.
lock: setup
	$(BIN)/python docker/lock.py
