"""Expert parallelism: all_to_all.py (autograd uneven all-to-all), dispatcher.py (the
all-to-all token dispatcher), apply.py (shard the experts of a model, per the plan)."""
