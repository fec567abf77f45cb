"""One rank of a launcher job that runs many bad-input cases one after another (see
test_bad_input_table_launchers.py): `torchrun ... bad_input_driver.py CASES.json` or
`deepspeed ... bad_input_driver.py CASES.json` (which adds --local_rank=N).

Each case is `dmoe train` in this process (dmoe.cli.train_main, the launch script's entry)
with the launcher's environment; after each, every rank writes `@@case <i> rank <r> rc=<code>`
to stderr. ONE_LINE_GRACE_S is 0 here: it only matters when the launcher kills the other
ranks on the first non-zero exit, and here nothing exits until the last case. The process
exits with the last case's code, so the launcher's exit code is checked too.

Each case gets its own default process group, joined here under the store prefix
`case_<i>` (dmoe's start-up finds it initialised and destroys it at the end, as it does a
group of its own). Without the prefix, a second group in the same process reads the
first's keys from the launcher's one store: a rank that gets there first takes its peer's
stale gloo address and connectFullMesh fails or waits ("Connection refused"; the same fault
as a torchrun restart, dmoe.startup.elastic). The config cases fail before dmoe would join
a group; theirs is destroyed here.
"""

import datetime
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dmoe.cli import train_main
from dmoe.startup import command


def launcher_store(world_size: int, rank: int) -> dist.TCPStore:
    """torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE), else one that rank 0 hosts at
    MASTER_ADDR:MASTER_PORT (the deepspeed launcher) for the whole job."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                         is_master=rank == 0 and not agent, timeout=datetime.timedelta(seconds=60))


def main() -> int:
    launcher_args = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    with open(next(a for a in sys.argv[1:] if a not in launcher_args)) as f:
        cases = json.load(f)
    command.ONE_LINE_GRACE_S = 0.0
    rank, world_size, code = os.environ.get("RANK", "?"), int(os.environ["WORLD_SIZE"]), 0
    store = launcher_store(world_size, int(rank))
    for i, argv in enumerate(cases):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"case_{i}", store), rank=int(rank),
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        code = train_main([*argv, *launcher_args])
        if dist.is_initialized():  # a case that failed before dmoe joined the group
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.write(f"@@case {i} rank {rank} rc={code}\n")
        sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
