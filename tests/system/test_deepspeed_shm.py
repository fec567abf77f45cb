"""A run under the deepspeed launcher leaves nothing in /dev/shm.

DeepSpeed's CPU comm op creates a 66 MB /dev/shm/deepspeed_allreduce_buffer_* file per rank
and never unlinks it; dmoe's ranks unlink their own once every rank has mapped them
(dmoe.startup.deepspeed_shm). The test watches /dev/shm during the run: the buffers must
appear (else DeepSpeed's shm op was not used and the test would prove nothing) and be gone
when the job ends.
"""

import threading
import time
from pathlib import Path

import pytest

from dmoe.startup.deepspeed_shm import buffer_path

from .conftest import BIN, TINY, free_port, run_cmd

pytestmark = pytest.mark.system


def test_deepspeed_run_leaves_no_shm_buffers(tmp_path, data_dir):
    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ours = [buffer_path(rank, env) for rank in (0, 1)]
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(p for p in ours if p.exists())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = run_cmd(
            [
                str(BIN / "deepspeed"),
                "--num_gpus",
                "2",
                "--master_port",
                str(port),
                "launch/train.py",
                *TINY,
                "--train.steps=2",
                "--train.eval_every=100",
                f"--data.data_dir={data_dir}",
                f"--train.run_dir={tmp_path}",
            ],
            timeout=300,
        )
    finally:
        done.set()
        watcher.join()
        left = [p for p in ours if p.exists()]
        for p in left:
            p.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seen == set(ours), f"DeepSpeed's shm buffers never appeared ({sorted(map(str, ours))})"
    assert not left, f"left in /dev/shm: {left}"
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
