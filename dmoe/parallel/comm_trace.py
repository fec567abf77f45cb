"""One instrumented layer for every collective dmoe issues, off unless a recorder is active.

    recorder = CommRecorder(groups)             # knows which group is tp / dp / ep / edp
    with recording(recorder):
        recorder.start_step(step)
        ... forward / backward / optimizer step ...
        events = recorder.end_step()            # list[CommEvent], times resolved

Call sites (expert_parallel/all_to_all.py and dispatcher.py, tensor_parallel/collectives.py
and layers.py, grads.py) call the wrappers
below with the same arguments as `torch.distributed` plus a `tag` naming the call
(`CommTag("a2a_dispatch", layer=1)`). With no active recorder a wrapper is one attribute
read and the plain collective: the measured overhead is in the README.

Where the recorder lives: process groups stay explicit objects passed to every call
(STYLE habit 2); only this *observer* is process-wide, in one slot set by `recording()`,
the way torch.profiler is. A slot rather than a ContextVar because autograd runs backward
on its own device threads (on GPU), which do not inherit context variables; threading a
recorder argument through every TP layer for a debugging concern would touch every
constructor. Only one training loop runs per process, so one slot is enough.

Timing: on CPU (gloo) the wall time of the blocking call; on CUDA a pair of events on the
current stream, resolved (synchronised) in `end_step`. Bandwidth follows nccl-tests:
algbw = size / time, busbw = algbw * factor, factor 2(n-1)/n for all-reduce and (n-1)/n
for all-gather, reduce-scatter and all-to-all, where size is the per-rank buffer size
(for all-to-all: all rows this rank sends, its own share included).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

BUSBW_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "barrier": lambda n: 0.0,
}


@dataclass(frozen=True)
class CommTag:
    """What a call is for: `name` (a2a_dispatch, tp_all_gather, dp_grads, ...) and the MoE
    layer it belongs to (None outside MoE layers)."""

    name: str
    layer: int | None = None


@dataclass
class CommEvent:
    step: int
    name: str
    layer: int | None
    op: str  # all_to_all | all_reduce | all_gather | barrier
    group: str  # tp | dp | ep | edp | world | other
    group_size: int
    phase: str  # fwd | bwd (inside backward()) | other
    size_bytes: int  # nccl-tests "size": this rank's buffer
    send_bytes: list[int]  # bytes this rank sends to each peer (group order)
    recv_bytes: list[int]  # bytes this rank receives from each peer
    seconds: float = 0.0
    _events: tuple | None = field(default=None, repr=False)

    @property
    def algbw_gbps(self) -> float:
        return self.size_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def busbw_gbps(self) -> float:
        return self.algbw_gbps * BUSBW_FACTOR[self.op](self.group_size)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "_events"}
        d.update(algbw_gbps=self.algbw_gbps, busbw_gbps=self.busbw_gbps)
        return d


class CommRecorder:
    """Collects CommEvents per step. `measure_wait` adds a timed barrier-like 1-element
    all-reduce before every all-to-all so that waiting for slower peers (load imbalance)
    is recorded as `wait` instead of inflating the transfer time."""

    def __init__(self, groups=None, measure_wait: bool = False):
        self.kinds: dict[int, tuple[str, int]] = {}
        if groups is not None:
            for kind in ("tp", "dp", "ep", "edp"):
                self.kinds[id(getattr(groups, kind))] = (kind, groups.size(kind))
        self.measure_wait = measure_wait
        self.step, self.events, self.paused = 0, [], False

    def group_info(self, group: dist.ProcessGroup | None) -> tuple[str, int]:
        if group is None or group is dist.GroupMember.WORLD:
            return "world", dist.get_world_size()
        return self.kinds.get(id(group), ("other", dist.get_world_size(group)))

    def start_step(self, step: int) -> None:
        self.step, self.events = step, []

    def end_step(self) -> list[CommEvent]:
        """Resolves CUDA event times (synchronises) and returns this step's events."""
        for ev in self.events:
            if ev._events is not None:
                ev._events[1].synchronize()
                ev.seconds = ev._events[0].elapsed_time(ev._events[1]) / 1e3
                ev._events = None
        return self.events

    @contextmanager
    def timed(self, op: str, tag: CommTag, group, tensor, send_bytes, recv_bytes, size_bytes):
        kind, n = self.group_info(group)
        phase = "bwd" if torch._C._current_graph_task_id() != -1 else "fwd"
        ev = CommEvent(self.step, tag.name, tag.layer, op, kind, n, phase, int(size_bytes),
                       list(send_bytes), list(recv_bytes))
        if tensor.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            ev._events = (start, end)
        else:
            t0 = time.perf_counter()
            yield
            ev.seconds = time.perf_counter() - t0
        self.events.append(ev)


_ACTIVE: CommRecorder | None = None
# dmoe.startup.watchdog.Watchdog of this process's training loop, told the tag and group of
# each collective entered (one attribute write); a second slot of the same kind
_WATCHDOG = None


def active() -> CommRecorder | None:
    rec = _ACTIVE
    return None if rec is None or rec.paused else rec


@contextmanager
def recording(recorder: CommRecorder | None):
    """Makes `recorder` the process's active recorder for the duration (None: no-op)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, recorder
    try:
        yield recorder
    finally:
        _ACTIVE = previous


@contextmanager
def watching(watchdog):
    """Makes `watchdog` (or None) the one the wrappers tell each collective they enter."""
    global _WATCHDOG
    previous, _WATCHDOG = _WATCHDOG, watchdog
    try:
        yield watchdog
    finally:
        _WATCHDOG = previous


@contextmanager
def paused():
    """The profiler's own bookkeeping collectives are not part of the training step."""
    rec = _ACTIVE
    if rec is None:
        yield
        return
    was, rec.paused = rec.paused, True
    try:
        yield
    finally:
        rec.paused = was


def _row_bytes(t: torch.Tensor) -> int:
    return (t.numel() // max(t.shape[0], 1)) * t.element_size() if t.dim() else t.element_size()


def _wait(rec: CommRecorder, tag: CommTag, group, like: torch.Tensor) -> None:
    probe = torch.zeros(1, device=like.device)
    with rec.timed("barrier", CommTag(tag.name + "_wait", tag.layer), group, probe, [], [], 0):
        dist.all_reduce(probe, group=group)


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor,
                      output_split_sizes: list[int] | None = None,
                      input_split_sizes: list[int] | None = None,
                      group: dist.ProcessGroup | None = None,
                      tag: CommTag = CommTag("all_to_all"), async_op: bool = False):
    """async_op=True returns the work handle (wait() before reading `out`); under an
    active recorder the call is timed as a blocking one (issued and waited here)."""
    if _WATCHDOG is not None:
        _WATCHDOG.collective = (tag, group)
    rec = active()
    if rec is None:
        return dist.all_to_all_single(out, inp, output_split_sizes, input_split_sizes, group=group,
                                      async_op=async_op)
    n = rec.group_info(group)[1]
    row = _row_bytes(inp if inp.numel() else out)
    send = [s * row for s in input_split_sizes] if input_split_sizes else [inp.nbytes // n] * n
    recv = [s * row for s in output_split_sizes] if output_split_sizes else [out.nbytes // n] * n
    if rec.measure_wait:
        _wait(rec, tag, group, inp)
    with rec.timed("all_to_all", tag, group, inp, send, recv, sum(send)):
        work = dist.all_to_all_single(out, inp, output_split_sizes, input_split_sizes,
                                      group=group, async_op=async_op)
        if work is not None:
            work.wait()
    return work


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM,
               group: dist.ProcessGroup | None = None,
               tag: CommTag = CommTag("all_reduce")) -> None:
    if _WATCHDOG is not None:
        _WATCHDOG.collective = (tag, group)
    rec = active()
    if rec is None:
        return dist.all_reduce(t, op=op, group=group)
    n = rec.group_info(group)[1]
    with rec.timed("all_reduce", tag, group, t, [t.nbytes] * n, [t.nbytes] * n, t.nbytes):
        dist.all_reduce(t, op=op, group=group)


def all_gather(parts: list[torch.Tensor], t: torch.Tensor,
               group: dist.ProcessGroup | None = None,
               tag: CommTag = CommTag("all_gather")) -> None:
    if _WATCHDOG is not None:
        _WATCHDOG.collective = (tag, group)
    rec = active()
    if rec is None:
        return dist.all_gather(parts, t, group=group)
    n = len(parts)
    with rec.timed("all_gather", tag, group, t, [t.nbytes] * n, [p.nbytes for p in parts],
                   t.nbytes * n):
        dist.all_gather(parts, t, group=group)
