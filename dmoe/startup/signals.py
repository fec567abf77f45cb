"""SIGTERM / SIGINT during training: every rank stops at the same step boundary.

    stop = StopOnSignal(rank)              # installs handlers (main thread only)
    with stop:
        for step in ...:
            ...
            signum = stop.agreed(device)   # one all-reduce (MAX) of the flag over the world
            if signum: ...                 # every rank sees the same answer

A handler only sets the flag (a signal may land inside a collective, a save or a
backward), so the step in flight finishes and the ranks agree, through the all-reduce,
that one of them was signalled: a signal sent to a single rank stops them all. A second
signal to a rank that is still finishing its step ends it at once (one line, exit
128 + signal).
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommTag

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Stopped by a signal without saving; str(err) is the one line shown to the user."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    def __init__(self, rank: int = 0):
        self.rank = rank
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second signal: stop now
            os.write(sys.stderr.fileno(), f"interrupted: {signal.Signals(signum).name} again on rank "
                     f"{self.rank}; exiting now\n".encode())
            os._exit(128 + signum)
        self.signum = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self, device: torch.device) -> int:
        """The signal number (the largest) any rank received so far; 0: none."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=device)
        comm_trace.all_reduce(flag, op=dist.ReduceOp.MAX, tag=CommTag("stop_flag"))
        return int(flag.item())


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
