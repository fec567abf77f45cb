"""Checkpoints: sharded, atomic, reshardable; one room for the whole concern.

    errors.py           CheckpointError (one line naming the file and the fault)
    durable.py          fsynced and atomic writes
    format.py           rank files, manifest, verified reads, global assembly
    slices.py           which slice of which tensor a rank holds and writes (from the
                        sharding plan, dmoe.parallel.plan)
    optimizer_state.py  one parameter's AdamW state out of / into each engine
    commit.py           the checkpoint tree, the commit sequence, `latest`, pruning
    save.py / load.py   collective save; resume (resharding on load)
    offline.py          reshard and export without process groups
"""
