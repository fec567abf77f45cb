"""Where metrics go: a rich progress display, TensorBoard, and a JSONL file (rank 0 only).

Scalars are flat dicts of floats. Lists: `<name>_per_layer` holds one value per MoE layer
(TensorBoard `kind/<name>/moe{i}`), or one list per layer (expert load: a histogram over
expert ids per layer, `kind/<name>/moe{i}`); `<name>_per_rank` one value per rank
(`kind/<name>/rank{r}`); JSONL keeps the lists as they are. Nothing is summed across layers.
A resumed series (dmoe.train.run_series) continues both files; `extra` sinks (W&B) get the
same calls. Other ranks get a sink that drops everything.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from dmoe.startup.logs import fields, use_rich

from .run_series import JSONL, TB_DIR, Series, resumed_record

log = logging.getLogger(__name__)


class MetricsSink:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool = True, console: bool = True,
                 series: Series | None = None, extra: tuple = ()):
        self.enabled, self.extra = enabled, [s for s in extra if s is not None]
        self._progress = self._task = self._tb = self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / JSONL, "a", buffering=1)
        if series is not None and series.resumed_from:
            self._jsonl.write(json.dumps(resumed_record(series)) + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=series.purge_step if series else None)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed: no TensorBoard logs")
        if console and use_rich():  # no live bar in a file: a plain line per log_every step
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
                self._tb_list(kind, name, values, step)
        for sink in self.extra:
            sink.log(step, scalars, lists, kind)
        summary = fields(**{k: v for k, v in scalars.items() if k in _SHOWN})
        if self._progress is not None and kind == "train":
            self._progress.update(self._task, completed=step, status=summary)
        log.info("%s step=%d %s", kind, step, summary)

    def _tb_list(self, kind: str, name: str, values: list, step: int) -> None:
        for suffix, prefix in (("_per_layer", "moe"), ("_per_rank", "rank")):
            if not name.endswith(suffix):
                continue
            for i, value in enumerate(values):
                tag = f"{kind}/{name.removesuffix(suffix)}/{prefix}{i}"
                if not isinstance(value, list):
                    self._tb.add_scalar(tag, value, step)
                elif sum(value) > 0:  # histogram over expert ids, weighted by tokens routed to each
                    self._tb.add_histogram(tag, np.repeat(np.arange(len(value)), np.asarray(value, dtype=np.int64)),
                                           step)

    def advance(self, step: int):
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self):
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        for sink in self.extra:
            sink.close()
        if self._jsonl is not None:
            self._jsonl.close()


_SHOWN = ("loss", "ce_loss", "val_loss", "val_ppl", "aux_loss", "drop_frac", "tokens_per_s", "step_ms", "mfu",
          "lr")
