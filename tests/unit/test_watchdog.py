"""dmoe.startup.watchdog: the line and the exit when no progress is made in time."""
import time

from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommTag
from dmoe.startup.watchdog import EXIT_CODE, Watchdog


def test_fires_once_with_step_and_last_collective():
    lines, codes = [], []
    wd = Watchdog(0.2, rank=1, exit_fn=codes.append, write=lines.append)
    wd.kinds[id("EPGROUP")] = "ep"
    with wd:
        wd.beat(12)
        wd.entered(CommTag("a2a_dispatch", layer=1), "EPGROUP")
        deadline = time.monotonic() + 5
        while not codes and time.monotonic() < deadline:
            time.sleep(0.05)
    assert codes == [EXIT_CODE]
    assert lines == ["watchdog: rank 1: no progress for 0 s at step 12 "
                     "(last collective: a2a_dispatch layer 1 over ep); exiting\n"]


def test_beats_keep_it_quiet_and_zero_is_off():
    codes = []
    wd = Watchdog(0.3, exit_fn=codes.append, write=lambda s: None)
    with wd:
        for step in range(10):
            wd.beat(step)
            time.sleep(0.05)
    assert codes == []
    off = Watchdog(0, exit_fn=codes.append, write=lambda s: None)
    with off:
        time.sleep(0.1)
        assert not off.check() and off._thread is None
    assert codes == []


def test_comm_trace_wrappers_tell_the_watchdog(monkeypatch):
    wd = Watchdog(0)
    monkeypatch.setattr(comm_trace.dist, "all_reduce", lambda *a, **k: None)
    import torch

    with comm_trace.watching(wd):
        comm_trace.all_reduce(torch.zeros(1), tag=CommTag("grad_norm"))
    assert wd.describe_collective() == "grad_norm over world"
    assert comm_trace._WATCHDOG is None
