# The README's two commands: `make train` and `make test`. Both set up .venv first, once.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.dmoe-installed
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
# ranks for `make train`: every local GPU, or 2 CPU ranks (gloo) without one
NPROC ?= $(if $(filter-out 0,$(GPUS)),$(GPUS),2)
PORT ?= 29517
CONFIG ?= configs/default.yaml
# the `hf` extra (dmoe import/export checked against transformers); pinned, as in pyproject.toml
TRANSFORMERS := transformers==5.23.0
ARGS ?=

.PHONY: setup system-deps train train-torchrun test test-fast test-docker bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@# torch first: the CPU wheel on CPU machines; GPU users keep (or get) a CUDA build
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if [ "$(GPUS)" != "0" ]; then $(PIP) install -q torch; else $(PIP) install -q torch==2.13.0; fi; fi
	$(PIP) install -q -r requirements.txt
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation deepspeed
	@# transformers constrained to the torch already here: nothing it pulls may swap the build
	$(PY) -c "import transformers as t, sys; sys.exit(t.__version__ != '$(subst transformers==,,$(TRANSFORMERS))')" 2>/dev/null || { \
	  $(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt && \
	  $(PIP) install -q -c $(VENV)/torch-pin.txt "$(TRANSFORMERS)"; }
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The main job: the DeepSpeed launcher and engine on the default config. A second run starts
# over (train.overwrite moves the previous checkpoints aside); ARGS="--train.resume=auto" resumes.
train: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/deepspeed --num_gpus $(NPROC) --master_port $(PORT) \
	  launch/train.py --config $(CONFIG) --train.overwrite=true $(ARGS); rc=$$?; \
	  rm -f /dev/shm/deepspeed_allreduce_buffer_*_$(PORT)_*; exit $$rc

# The same run on the plain torch engine.
train-torchrun: setup
	$(VENV)/bin/torchrun --nproc_per_node $(NPROC) --master_port $(PORT) launch/train.py --config $(CONFIG) --train.overwrite=true $(ARGS)

# Debian packages the system tests use (Slurm); skipped when already there.
system-deps:
	scripts/system-deps.sh

test: setup system-deps
	$(PY) -m pytest -q -m "not docker"

# The Docker image built and run as two nodes (minutes; CI runs it as its own stage).
test-docker: setup
	scripts/system-deps.sh docker
	$(PY) -m pytest -q -m docker tests/system/test_docker.py

test-fast: setup
	$(PY) -m pytest -q -m "not system and not docker"

bench: setup
	$(PY) bench/moe_layer.py --quick

# The GPU path on one GPU in minutes (scripts/gpu_check.py); CPU-only parts without one.
gpu-check: setup
	scripts/gpu_check.sh $(ARGS)

clean:
	rm -rf runs data $(VENV)
