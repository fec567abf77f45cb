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
# torch's CPU wheels (no 3 GB CUDA stack); constraints.txt pins what the tests ran with
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PINS := $(VENV)/constraints.txt
# the DeepSpeed launcher's accelerator on machines without a GPU (without it, each of its
# processes logs "Setting accelerator to CPU")
DS_ENV := $(if $(filter-out 0,$(GPUS)),,DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu})

.PHONY: setup system-deps train train-torchrun test test-fast test-docker bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@# torch first, at constraints.txt's version: the CPU wheel (PyTorch's CPU index, no CUDA
	@# stack) on CPU machines, PyPI's CUDA build with a GPU; a torch already here is kept.
	@# The CPU index only when it answers (a mirror-only machine would retry it per package).
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if [ "$(GPUS)" != "0" ]; then $(PIP) install -q -c constraints.txt torch; \
	  elif $(PY) -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=5)" $(TORCH_CPU_INDEX)/ 2>/dev/null; then \
	    $(PIP) install -q -c constraints.txt torch --extra-index-url $(TORCH_CPU_INDEX); \
	  else $(PIP) install -q -c constraints.txt torch; fi; fi
	@# everything else pinned by constraints.txt, with the venv's own torch: nothing may swap the build
	{ $(PY) -c "from importlib.metadata import version; print('torch==' + version('torch'))" && grep -v '^torch==' constraints.txt; } > $(PINS)
	$(PIP) install -q -c $(PINS) -r requirements.txt
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -c $(PINS) deepspeed
	$(PY) -c "import transformers as t, sys; sys.exit(t.__version__ != '$(subst transformers==,,$(TRANSFORMERS))')" 2>/dev/null || \
	  $(PIP) install -q -c $(PINS) "$(TRANSFORMERS)"
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The main job: the DeepSpeed launcher and engine on the default config. A second run starts
# over (train.overwrite moves the previous checkpoints aside); ARGS="--train.resume=auto" resumes.
train: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(DS_ENV) $(VENV)/bin/deepspeed --log_level warning \
	  --num_gpus $(NPROC) --master_port $(PORT) launch/train.py --config $(CONFIG) --train.overwrite=true $(ARGS); rc=$$?; \
	  rm -f /dev/shm/deepspeed_allreduce_buffer_*_$(PORT)_*; exit $$rc

# The same run on the plain torch engine.
train-torchrun: setup
	$(VENV)/bin/torchrun --nproc_per_node $(NPROC) --master_port $(PORT) launch/train.py --config $(CONFIG) --train.overwrite=true $(ARGS)

# Debian packages the system tests use (Slurm); skipped when already there.
system-deps:
	scripts/system-deps.sh

# torchtitan, the benchmark's peer (not a dmoe dependency): installed for the tests that
# check the bench's torchtitan layer computes what dmoe's does
PEERS := $(VENV)/peers/.ready
$(PEERS): bench/install_peers.sh | $(STAMP)
	bash bench/install_peers.sh $(PY) && touch $(PEERS)

test: setup system-deps $(PEERS)
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
