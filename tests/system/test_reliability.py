"""A stuck rank, an elastic restart and a signal, each under torchrun with 2 ranks.

Every test starts torchrun in its own session and kills that session at the end, so a
failure cannot leave ranks behind or hang the suite."""
import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from .conftest import BIN, REPO, TINY, free_port

pytestmark = pytest.mark.system


def start_torchrun(args, torchrun_args=()):
    env = dict(os.environ, DMOE_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           *torchrun_args, "launch/train.py", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def kill_session(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in psutil.process_iter(["pid"]):  # a stopped rank outside the group, just in case
        try:
            if os.getsid(p.pid) == proc.pid:
                p.send_signal(signal.SIGCONT)
                p.kill()
        except (ProcessLookupError, psutil.Error, OSError):
            pass


def ranks(proc):
    """{rank: psutil.Process} of torchrun's worker processes."""
    out = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "launch/train.py" in " ".join(child.cmdline()):
            out[int(env["RANK"])] = child
    return out


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def train_records(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_watchdog_ends_a_rank_whose_peer_is_stopped(tmp_path, data_dir):
    timeout_s = 8
    proc = start_torchrun([*TINY, f"--data.data_dir={data_dir}", f"--train.run_dir={tmp_path}",
                           "--train.steps=100000", "--train.eval_every=100000",
                           f"--parallel.timeout_s={timeout_s}"])
    try:
        wait_for(lambda: any(r["kind"] == "train" for r in train_records(tmp_path)), 180, "first steps")
        workers = ranks(proc)
        assert sorted(workers) == [0, 1]
        workers[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for(lambda: not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE,
                 2 * timeout_s + 10, "rank 0 to exit")
        took = time.monotonic() - stopped_at
        workers[1].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_session(proc)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("watchdog: rank 0: no progress for")]
    assert len(lines) == 1, err[-3000:]
    assert "(last collective: " in lines[0] and lines[0].endswith("; exiting"), lines
    assert "exitcode  : 4" in err, err[-3000:]
    assert took < 2 * timeout_s + 4, took
    print(lines[0], f"after {took:.1f} s")


def last_losses(run_dir):
    """{step: loss} of train records, the last record of a step winning (a restart appends)."""
    return {r["step"]: r["loss"] for r in train_records(run_dir) if r["kind"] == "train"}


def test_torchrun_restart_resumes_from_latest_checkpoint(tmp_path, data_dir):
    args = [*TINY, f"--data.data_dir={data_dir}", "--train.steps=60", "--train.log_every=1",
            "--train.eval_every=1000", "--train.save_every=10", "--train.keep_last=0",
            "--parallel.timeout_s=60"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = start_torchrun([*args, f"--train.run_dir={ref_dir}"])
    try:
        _, err = ref.communicate(timeout=300)
    finally:
        kill_session(ref)
    assert ref.returncode == 0, err[-3000:]
    proc = start_torchrun([*args, f"--train.run_dir={run_dir}"], ["--max-restarts", "1"])
    try:
        latest = run_dir / "checkpoints" / "latest"
        wait_for(latest.exists, 180, "the first checkpoint")
        first = ranks(proc)
        first[1].send_signal(signal.SIGKILL)
        killed_after = latest.read_text().strip()
        out, err = proc.communicate(timeout=300)
        err = out + err  # rank 0's log goes to stdout (rich), errors to stderr
    finally:
        kill_session(proc)
    assert proc.returncode == 0, err[-3000:]
    words = " ".join(err.split())  # rich wraps the log lines
    assert "elastic restart 1 (TORCHELASTIC_RESTART_COUNT): train.resume=auto" in words, err[-3000:]
    resumed = re.findall(r"resumed from .{0,300}?\(step (\d+),", words)
    assert resumed, err[-3000:]
    step = int(resumed[-1])
    assert step >= int(killed_after.split("_")[1]) and step % 10 == 0, (resumed, killed_after)
    got, want = last_losses(run_dir), last_losses(ref_dir)
    after = [s for s in range(step + 1, 61)]
    assert after and [got[s] for s in after] == [want[s] for s in after], (step, got, want)
    print(f"killed after {killed_after}, resumed at step {step}")


def _run_until_training(tmp_path, data_dir, extra, sig, rank):
    proc = start_torchrun([*TINY, f"--data.data_dir={data_dir}", f"--train.run_dir={tmp_path}",
                           "--train.steps=100000", "--train.eval_every=100000", *extra])
    try:
        wait_for(lambda: any(r["kind"] == "train" for r in train_records(tmp_path)), 180, "first steps")
        ranks(proc)[rank].send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc)
    return proc.returncode, out, err


def test_sigterm_with_save_on_signal_saves_and_exits_zero(tmp_path, data_dir):
    code, out, err = _run_until_training(tmp_path, data_dir, ["--train.save_on_signal=true"],
                                         signal.SIGTERM, 1)
    assert code == 0, (out + err)[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    step = summary["stopped_by_signal_at"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{step:06d}"
    manifest = json.loads((tmp_path / "checkpoints" / f"step_{step:06d}" / "manifest.json").read_text())
    assert manifest["step"] == step
    assert "SIGTERM at step" in " ".join((out + err).split())
    assert "Traceback" not in out + err, (out + err)[-3000:]


def test_sigint_without_save_on_signal_one_line(tmp_path, data_dir):
    code, out, err = _run_until_training(tmp_path, data_dir, [], signal.SIGINT, 0)
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted: ")]
    assert len(lines) == 1 and lines[0].startswith("interrupted: SIGINT at step "), (out + err)[-3000:]
    assert "KeyboardInterrupt" not in out + err
    assert not re.search(r'File "[^"]*(/dmoe/|launch/train\.py)', out + err), (out + err)[-3000:]
    assert "exitcode  : 130" in err, err[-3000:]
    assert not (tmp_path / "checkpoints").exists()
