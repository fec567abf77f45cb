"""Bad inputs through the real launchers (python, torchrun, the deepspeed launcher): each
job ends with dmoe's one line exactly once on stderr (rank 0 only, not one per rank), no
Python traceback, and a non-zero exit from the launcher.

torchrun and the deepspeed launcher print their own report of a failed child (torchrun's
`ChildFailedError` block, deepspeed's `exits with return code`); that is the launcher's,
not dmoe's, and cannot be silenced from inside the ranks (torchrun's includes a traceback of
its own agent, torch/distributed/run.py): the test asserts dmoe's own line appears once and
no traceback passes through dmoe's code or launch/train.py (under plain python: no
`Traceback` at all).
"""
import re
import sys

import pytest

from .conftest import BIN, TINY, free_port, run_cmd, run_deepspeed

pytestmark = pytest.mark.system


def _corrupt_run(tmp_path):
    """A run dir whose latest checkpoint has a manifest that is not JSON."""
    ckpt = tmp_path / "checkpoints" / "step_000004"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{ not json")
    (tmp_path / "checkpoints" / "latest").write_text("step_000004\n")
    return ["--train.resume=auto"]


# name -> (extra args or a function of tmp_path giving them, the line's prefix, a fragment)
CASES = {
    "unknown_key": (["--train.bogus=1"], "config error:", "bogus"),
    "ep_not_dividing_experts": (["--moe.num_experts=3", "--parallel.ep=2"], "config error:", "parallel.ep"),
    "world_not_matching_layout": (["--parallel.tp=4"], "config error:", "parallel.tp"),
    "corrupt_checkpoint": (_corrupt_run, "checkpoint error:", "manifest.json"),
    "nan_lr": (["--train.lr=.nan"], "config error:", "train.lr (nan) must be a finite number"),
}


def _launch(launcher, args):
    if launcher == "python":
        return run_cmd([sys.executable, "launch/train.py", *args], timeout=240)
    if launcher == "torchrun":
        return run_cmd([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                        "launch/train.py", *args], timeout=240)
    return run_deepspeed(2, args, timeout=240)


@pytest.mark.parametrize("launcher", ["python", "torchrun", "deepspeed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_per_job(tmp_path, data_dir, launcher, case):
    extra, prefix, fragment = CASES[case]
    extra = extra(tmp_path) if callable(extra) else extra
    proc = _launch(launcher, [*TINY, f"--data.data_dir={data_dir}", f"--train.run_dir={tmp_path}", *extra])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(ours) == 1, out[-3000:]
    assert fragment in ours[0], ours
    # no traceback through dmoe's code or the launch script (torchrun's agent prints its own
    # ChildFailedError traceback, from torch/distributed/run.py, about the failed child)
    assert not re.search(r'File "[^"]*(/dmoe/|launch/train\.py)', out), out[-3000:]
    if launcher == "python":
        assert "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "summary.json").exists()
