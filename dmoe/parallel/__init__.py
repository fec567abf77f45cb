"""Parallelism: layout.py (degrees -> groups, expert ownership), plan.py (how every
parameter is split), param_roles.py, parallelize.py (apply TP then EP to a built model),
tensor_parallel/, expert_parallel/, grads.py (the torch engine's reductions),
comm_trace.py (the recorder every collective reports to)."""
