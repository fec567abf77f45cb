"""One metrics series per run: a run in a run dir that already holds metrics either continues
them (a resume) or sets them aside (a fresh start); nothing is silently appended.

    info = start_series(run_dir, start_step, checkpoint)   # rank 0, before the sink opens

- Resume (start_step > 0): metrics.jsonl continues; its next record is
  {"kind": "resumed_from", "step": N, "checkpoint": path}, and records written after the
  checkpoint by the interrupted run (step > N, earlier in the file) are superseded by the
  ones that follow it. TensorBoard continues in the same directory with `purge_step=N+1`,
  which hides the interrupted run's events past the checkpoint.
- Fresh start (start_step 0) beside old metrics: metrics.jsonl, tensorboard/ and the W&B
  run id are renamed aside with a time suffix (`metrics.replaced-<time>.jsonl`,
  `tensorboard.replaced-<time>/`), like train.overwrite does with checkpoints/, and a
  warning names them. No communication.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

JSONL, TB_DIR, WANDB_ID = "metrics.jsonl", "tensorboard", "wandb_run_id"


@dataclass(frozen=True)
class Series:
    resumed_from: int  # 0: a fresh series
    checkpoint: str | None
    purge_step: int | None  # TensorBoard: hide older events from this step on
    moved_aside: tuple[str, ...] = ()


def start_series(run_dir: Path, start_step: int, checkpoint: str | Path | None) -> Series:
    if start_step > 0:
        return Series(start_step, str(checkpoint) if checkpoint else None, start_step + 1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name, aside in ((JSONL, f"metrics.replaced-{stamp}.jsonl"), (TB_DIR, f"{TB_DIR}.replaced-{stamp}"),
                        (WANDB_ID, f"{WANDB_ID}.replaced-{stamp}")):
        path = run_dir / name
        if path.exists():
            path.rename(run_dir / aside)
            moved.append(aside)
    if moved:
        log.warning("fresh start in %s: the previous run's metrics moved aside to %s (a resume "
                    "continues them: --train.resume=auto)", run_dir, ", ".join(moved))
    return Series(0, None, None, tuple(moved))


def resumed_record(series: Series) -> dict:
    """The JSONL record that starts a resumed series."""
    return {"step": series.resumed_from, "kind": "resumed_from", "time": time.time(),
            "checkpoint": series.checkpoint}
