"""One rank of a launcher job that runs many bad-input cases one after another (see
test_bad_input_table_launchers.py): `torchrun ... bad_input_driver.py CASES.json` or
`deepspeed ... bad_input_driver.py CASES.json` (which adds --local_rank=N).

Each case is `dmoe train` in this process (dmoe.cli.train_main, the launch script's entry)
with the launcher's environment; after each, every rank writes `@@case <i> rank <r> rc=<code>`
to stderr. ONE_LINE_GRACE_S is 0 here: it only matters when the launcher kills the other
ranks on the first non-zero exit, and here nothing exits until the last case. The process
exits with the last case's code, so the launcher's exit code is checked too.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dmoe.cli import train_main
from dmoe.startup import command


def main() -> int:
    launcher_args = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    with open(next(a for a in sys.argv[1:] if a not in launcher_args)) as f:
        cases = json.load(f)
    command.ONE_LINE_GRACE_S = 0.0
    rank, code = os.environ.get("RANK", "?"), 0
    for i, argv in enumerate(cases):
        code = train_main([*argv, *launcher_args])
        sys.stdout.flush()
        sys.stderr.write(f"@@case {i} rank {rank} rc={code}\n")
        sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
