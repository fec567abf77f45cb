"""dmoe's own watchdog: a rank that makes no progress for `parallel.timeout_s` seconds
writes one line and hard-exits, instead of waiting forever.

    watchdog = Watchdog(cfg.parallel.timeout_s, rank, groups)
    with watchdog, comm_trace.watching(watchdog):   # a daemon thread for the duration
        for step in ...:
            watchdog.beat(step)                       # progress: a step (or eval, save) began
            ...

Why: gloo waits with no end for a peer that is stopped (SIGSTOP) rather than dead, even
with a process-group timeout, and a rank can hang in a collective its peers never enter.
The comm_trace wrappers write the tag and group of each collective they enter into the
watchdog (one attribute write), so the line names where the rank is stuck:

    watchdog: rank 0: no progress for 30 s at step 12 (last collective: a2a_dispatch layer 1
    over ep); exiting

The exit is `os._exit(4)`: the main thread is blocked inside a collective, so nothing
short of a hard exit ends the process (no cleanup, no destroy_process_group).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

EXIT_CODE = 4


class Watchdog:
    def __init__(self, timeout_s: float, rank: int = 0, groups=None,
                 exit_fn: Callable[[int], None] = os._exit, write: Callable[[str], None] | None = None):
        self.timeout_s, self.rank = float(timeout_s), rank
        self.kinds: dict[int, str] = {}
        if groups is not None:
            for kind in ("tp", "dp", "ep", "edp"):
                self.kinds.setdefault(id(getattr(groups, kind)), kind)
        self.step = 0
        self.collective = None  # (CommTag, group) of the last collective entered
        self._last = time.monotonic()
        self._exit, self._write = exit_fn, write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = False

    # the training loop and comm_trace feed these
    def beat(self, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self._last = time.monotonic()

    def entered(self, tag, group) -> None:
        self.collective = (tag, group)

    def describe_collective(self) -> str:
        if self.collective is None:
            return "none"
        tag, group = self.collective
        layer = f" layer {tag.layer}" if tag.layer is not None else ""
        kind = "world" if group is None else self.kinds.get(id(group), "other")
        return f"{tag.name}{layer} over {kind}"

    def line(self, idle_s: float) -> str:
        return (f"watchdog: rank {self.rank}: no progress for {idle_s:.0f} s at step {self.step} "
                f"(last collective: {self.describe_collective()}); exiting")

    def check(self) -> bool:
        """True (and the line written, the exit called) when past the timeout."""
        idle = time.monotonic() - self._last
        if self.timeout_s <= 0 or idle < self.timeout_s or self.fired:
            return False
        self.fired = True
        text = self.line(idle) + "\n"
        try:
            if self._write is not None:
                self._write(text)
            else:
                os.write(sys.stderr.fileno(), text.encode())  # no Python-level lock to wait on
        finally:
            self._exit(EXIT_CODE)
        return True

    def _run(self) -> None:
        period = min(1.0, max(self.timeout_s / 4, 0.05))
        while not self._stop.wait(period):
            if self.check():
                return

    def start(self) -> Watchdog:
        if self.timeout_s > 0 and self._thread is None:
            self.beat()
            self._thread = threading.Thread(target=self._run, name="dmoe-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
