"""Where metrics go: a rich progress display, TensorBoard, and a JSONL file (rank 0 only).

Scalars are flat dicts of floats; per-expert load goes to TensorBoard as a histogram and to
JSONL as lists. Other ranks get a sink that drops everything.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class MetricsSink:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool = True, console: bool = True):
        self.enabled = enabled
        self._progress = self._task = self._tb = self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed: no TensorBoard logs")
        if console:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, status="")
            self._progress.start()

    def log(self, step: int, scalars: dict, lists: dict | None = None, kind: str = "train"):
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **scalars, **(lists or {})}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{name}", value, step)
            for name, values in (lists or {}).items():
                if name.endswith("_per_layer"):
                    for i, value in enumerate(values):
                        self._tb.add_scalar(f"{kind}/{name.removesuffix('_per_layer')}/moe{i}", value, step)
                elif name.endswith("load") and sum(values) > 0:
                    # histogram over expert ids, weighted by tokens routed to each
                    ids = np.repeat(np.arange(len(values)), np.asarray(values, dtype=np.int64))
                    self._tb.add_histogram(f"{kind}/{name}", ids, step)
        summary = "  ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k in _SHOWN)
        if self._progress is not None and kind == "train":
            self._progress.update(self._task, completed=step, status=summary)
        log.info("%s step %d  %s", kind, step, summary)

    def advance(self, step: int):
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self):
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


_SHOWN = ("loss", "ce_loss", "val_loss", "val_ppl", "aux_loss", "drop_frac", "tokens_per_s", "lr")
