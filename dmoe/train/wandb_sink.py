"""An optional Weights & Biases sink beside TensorBoard (rank 0): `train.wandb_project`.

    sink = WandbSink.open(cfg, run_dir, resumed=True)   # None when train.wandb_project is ""
    sink.log(step, scalars, lists, kind); sink.close()

wandb is not a dependency: it is imported only when a project is set, and a missing
package is one line (WandbMissing, a ConfigError). The run id is kept in
<run_dir>/wandb_run_id so that a resume continues the same W&B run; a fresh start gets a
new id (dmoe.train.run_series moves the old file aside). Per-layer lists become
`kind/name/moe{i}` scalars; per-layer expert loads become `kind/expert_load/moe{i}`
histograms over expert ids. No communication.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from dmoe.config import Config, ConfigError

from .run_series import WANDB_ID


class WandbMissing(ConfigError):
    pass


def check_wandb(cfg: Config) -> None:
    """With train.wandb_project set, wandb must be importable (checked on every rank at
    start, so all ranks stop with the same line)."""
    project = cfg.train.wandb_project
    if not project:
        return
    try:
        importlib.import_module("wandb")
    except ImportError:
        raise WandbMissing(f"train.wandb_project ({project!r}) is set but wandb is not installed: "
                           "pip install wandb, or leave train.wandb_project empty") from None


class WandbSink:
    def __init__(self, wandb, run):
        self.wandb, self.run = wandb, run

    @classmethod
    def open(cls, cfg: Config, run_dir: Path, resumed: bool) -> WandbSink | None:
        project = cfg.train.wandb_project
        if not project:
            return None
        check_wandb(cfg)
        wandb = importlib.import_module("wandb")
        id_file = run_dir / WANDB_ID
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        run_id = run_id or wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir),
                         name=Path(cfg.train.run_dir).name, config=cfg.to_dict())
        return cls(wandb, run)

    def log(self, step: int, scalars: dict, lists: dict | None = None, kind: str = "train") -> None:
        data = {f"{kind}/{name}": value for name, value in scalars.items()}
        for name, values in (lists or {}).items():
            if not name.endswith("_per_layer"):
                continue
            base = name.removesuffix("_per_layer")
            for i, value in enumerate(values):
                if isinstance(value, list):  # expert load: a histogram over expert ids
                    edges = np.arange(len(value) + 1, dtype=np.float64)
                    data[f"{kind}/{base}/moe{i}"] = self.wandb.Histogram(
                        np_histogram=(np.asarray(value, dtype=np.float64), edges))
                else:
                    data[f"{kind}/{base}/moe{i}"] = value
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()
