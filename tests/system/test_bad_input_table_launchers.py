"""The 52 cases of tests/unit/test_bad_inputs.py (45 config cases: values through CLI
overrides and YAML, run/data dirs and data paths, layout mismatches; 7 checkpoint cases:
train.resume naming a missing, unreadable or malformed checkpoint) under torchrun and the
deepspeed launcher with 2 ranks: each case is refused with one line from rank 0 only (none
from rank 1), naming the field or file and the value, a non-zero code on every rank, no
traceback. The checkpoint cases fail after the process group is up: the driver gives each
case a group of its own (see bad_input_driver.py for why a second group needs it).

One launcher job per launcher runs every case in turn (bad_input_driver.py): a launcher
start per case cost ~10 s (torchrun) and ~20 s (deepspeed) here, 25 min for the table; the
per-case launcher behaviour (exit code, the other ranks' grace) is covered by
test_bad_input_launchers.py, and this job's own exit code is the last case's.
"""

import glob
import json
import os
import re

import pytest

from tests.unit.test_bad_inputs import CHECKPOINT_CASES, CONFIG_CASES, base_args, make_scratch

from .conftest import BIN, free_port, run_cmd

pytestmark = pytest.mark.system

# on 2 ranks a tp=2 layout is valid: the layout mismatch there is tp=4
CASES = [
    (["--parallel.tp=4"] if argv == ["--parallel.tp=2"] else argv, message)
    for argv, message in CONFIG_CASES
] + CHECKPOINT_CASES


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_bad_input_table_under_launcher(tmp_path, launcher):
    scratch = make_scratch(tmp_path)

    def fill(text):
        return text.replace("{tmp}", str(scratch))

    cases = [[*base_args(scratch), *map(fill, argv)] for argv, _ in CASES]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    starter = (
        [str(BIN / "torchrun"), "--nproc_per_node", "2"]
        if launcher == "torchrun"
        else [str(BIN / "deepspeed"), "--num_gpus", "2"]
    )
    port = free_port()
    try:
        proc = run_cmd(
            [
                *starter,
                "--master_port",
                str(port),
                "tests/system/bad_input_driver.py",
                str(tmp_path / "cases.json"),
            ],
            timeout=300,
        )
    finally:
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            os.remove(f)  # the checkpoint cases build the DeepSpeed engine (its CPU shm buffer)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert not re.search(r'File "[^"]*(/dmoe/|launch/train\.py|bad_input_driver)', out), out[-3000:]
    ends = {
        (int(m[0]), int(m[1])): int(m[2])
        for m in re.findall(r"@@case (\d+) rank (\d+) rc=(-?\d+)", proc.stderr)
    }
    assert len(ends) == 2 * len(CASES), out[-3000:]
    assert all(code != 0 for code in ends.values()), ends
    # rank 0's lines between its markers: exactly one error line per case, the expected one
    segments, current = [], []
    for line in proc.stderr.splitlines():
        if line.startswith("@@case") and " rank 0 " in line:
            segments.append(current)
            current = []
        elif re.match(r"(config|checkpoint) error:", line):
            current.append(line)
    assert len(segments) == len(CASES)
    for (argv, message), lines in zip(CASES, segments):
        assert len(lines) == 1, (argv, lines)
        assert fill(message) in lines[0], (argv, lines)
    assert len(re.findall(r"^(config|checkpoint) error:", proc.stderr, re.MULTILINE)) == len(CASES)
