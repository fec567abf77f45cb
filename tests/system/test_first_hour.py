"""A new user's first runs: logs piped to a file read one record per line, with key=value
step fields; DeepSpeed's own lines come through dmoe's format."""
import re
import sys

import pytest

from .conftest import TINY, run_cmd

pytestmark = pytest.mark.system

RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z r\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) .*$")
STEP = re.compile(r" INFO (train|eval) step=\d+( [a-z_]+=-?(\d+(\.\d+)?|nan|inf))+$")


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_piped_logs_are_one_record_per_line(tmp_path, data_dir, engine):
    proc = run_cmd([sys.executable, "launch/train.py", *TINY, "--train.steps=4", "--train.log_every=2",
                    f"--train.engine={engine}", f"--data.data_dir={data_dir}",
                    f"--train.run_dir={tmp_path}"], env_extra={"DMOE_NO_PROGRESS": "0"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert lines and [x for x in lines if not RECORD.match(x)] == []
    steps = [x for x in lines if " step=" in x]
    assert len(steps) == 4 and all(STEP.search(x) for x in steps), steps  # eval 0, 2 train, eval 4
    assert not any("e+0" in x or "e-0" in x for x in steps)


def test_runs_from_another_directory_with_the_packaged_default(tmp_path):
    """No repo around: `--config default` is the packaged file; relative run and data dirs
    land under the working directory, and the log says where (absolute)."""
    import subprocess

    import yaml

    from dmoe.config import load_config

    from .conftest import REPO

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DMOE_NO_PROGRESS": "1",
           "PATH": "/usr/bin:/bin"}
    shown = subprocess.run([sys.executable, "-m", "dmoe.cli", "config", "show", "--config", "default"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout) == load_config(REPO / "configs/default.yaml").to_dict()
    overrides = [*TINY, "--train.steps=2", "--train.log_every=1", "--train.eval_every=2",
                 "--train.eval_batches=1", "--train.save_every=0"]
    proc = subprocess.run([sys.executable, "-m", "dmoe.cli", "train", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir, data_dir = cwd / "runs" / "default", cwd / "data" / "builtin-byte"
    assert f"run dir {run_dir}, data dir {data_dir}" in proc.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    want = load_config(REPO / "configs/default.yaml", overrides).to_dict()
    packaged = yaml.safe_load((REPO / "dmoe/configs/default.yaml").read_text())
    for section, values in packaged.items():  # every value the packaged file sets (or TINY's)
        for key in values:
            assert saved[section][key] == want[section][key], f"{section}.{key}"
    assert (data_dir / "meta.json").exists() or any(data_dir.iterdir())
