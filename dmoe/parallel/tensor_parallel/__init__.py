"""Tensor parallelism: collectives.py (autograd pairs), layers.py (column / row / vocab
parallel layers and the vocab-parallel cross-entropy), apply.py (the model, per the plan)."""
