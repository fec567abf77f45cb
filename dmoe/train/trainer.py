"""The training loop: build, parallelize, train, evaluate, report, checkpoint.

One function per phase; the loop itself runs `dmoe.train.step.train_step` and hands
figures to the metrics sink. Communication: inside the step (gradient reduction, the MoE
dispatchers), `evaluate`, the checkpoint save, and the DP reductions of logged figures.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dmoe.checkpoint.commit import resolve_checkpoint
from dmoe.checkpoint.load import check_fresh_start, maybe_resume
from dmoe.checkpoint.save import save_checkpoint
from dmoe.config import Config, ConfigError, save_config
from dmoe.data.token_files import TokenData, prepare
from dmoe.model.local_build import build_local_model
from dmoe.parallel import comm_trace
from dmoe.parallel.layout import ParallelLayout, ProcessGroups, build_process_groups
from dmoe.startup.launchers import LaunchInfo
from dmoe.startup.signals import Interrupted, StopOnSignal, signal_name
from dmoe.startup.watchdog import Watchdog
from dmoe.train.engines import Engine, build_engine
from dmoe.train.metrics import MetricsSink
from dmoe.train.monitor import TrainMonitor
from dmoe.train.nonfinite import NonFiniteError, safe_exp
from dmoe.train.run_series import start_series
from dmoe.train.step import evaluate, tokens_per_step, train_step
from dmoe.train.wandb_sink import WandbSink, check_wandb

log = logging.getLogger(__name__)


def prepare_data(cfg: Config, info: LaunchInfo) -> TokenData:
    """Rank 0 tokenizes (if needed); everyone maps the result."""
    if info.rank == 0:
        prepare(cfg.data)
    if dist.is_initialized():
        dist.barrier()
    data = TokenData.open(Path(cfg.data.data_dir))
    cfg.model.vocab_size = data.vocab_size
    for split in ("train", "val"):
        tokens = len(getattr(data, split))
        if tokens < cfg.model.seq_len + 1:
            raise ConfigError(f"model.seq_len ({cfg.model.seq_len}) needs at least {cfg.model.seq_len + 1} "
                              f"tokens; the {split} split of {cfg.data.data_dir} has {tokens}")
    return data


def build(cfg: Config, info: LaunchInfo, device: torch.device, engine_name: str
          ) -> tuple[Engine, ProcessGroups, ParallelLayout]:
    layout = ParallelLayout(info.world_size, tp=cfg.parallel.tp, ep=cfg.parallel.ep)
    layout.validate(cfg.moe.num_experts)
    groups = build_process_groups(layout, info.rank)
    # only this rank's shard, bit for bit what the seeded full build then sharding gives
    model = build_local_model(cfg, groups)
    model.to(device)
    return build_engine(engine_name, model, cfg, groups), groups, layout


def _on_nonfinite(cfg: Config, engine: str, step: int, what: str, skipped: int) -> int:
    """train.nonfinite: stop with one line, or count a skipped step (the engine did not
    step the optimizer) and stop past train.max_skipped_steps. Returns the new count."""
    t = cfg.train
    if t.nonfinite == "skip" and skipped < t.max_skipped_steps:
        log.warning("step %d: non-finite %s (engine %s): optimizer step skipped (%d of at most "
                    "%d, train.max_skipped_steps)", step, what, engine, skipped + 1, t.max_skipped_steps)
        return skipped + 1
    why = (f"after {skipped} skipped steps (train.max_skipped_steps={t.max_skipped_steps})"
           if t.nonfinite == "skip" else "(train.nonfinite=stop)")
    raise NonFiniteError(f"step {step}: non-finite {what} (engine {engine}); training stopped "
                         f"{why}, nothing of this state saved; lower train.lr or check the data")


def train(cfg: Config, info: LaunchInfo, device: torch.device, engine_name: str) -> dict:
    check_fresh_start(cfg, info.rank)  # before anything is written into run_dir
    check_wandb(cfg)  # every rank: one line before anything starts
    data = prepare_data(cfg, info)
    engine, groups, layout = build(cfg, info, device, engine_name)
    watchdog = Watchdog(cfg.parallel.timeout_s, info.rank, groups)  # parallel.timeout_s; 0: off
    with watchdog, comm_trace.watching(watchdog), StopOnSignal(info.rank) as stop:
        return _train_loop(cfg, info, device, data, engine, groups, layout, watchdog, stop)


def _stop_on_signal(cfg: Config, engine: Engine, groups: ProcessGroups, step: int, signum: int,
                    saved: bool) -> None:
    """Every rank agreed a signal arrived: train.save_on_signal saves this step (unless just
    saved) and returns (the run ends, exit 0); else Interrupted (one line, 128 + signal)."""
    name = signal_name(signum)
    if not cfg.train.save_on_signal:
        raise Interrupted(f"{name} at step {step}: training stopped after the step, nothing saved "
                          "(set --train.save_on_signal=true to save a checkpoint first)", signum)
    if not saved:
        save_checkpoint(engine, cfg, groups, step, {"step": step, "seed": cfg.train.seed})
    log.info("%s at step %d: checkpoint saved (train.save_on_signal); stopping", name, step)


def _train_loop(cfg: Config, info: LaunchInfo, device: torch.device, data: TokenData, engine: Engine,
                groups: ProcessGroups, layout: ParallelLayout, watchdog: Watchdog,
                stop: StopOnSignal) -> dict:
    t = cfg.train
    run_dir = Path(t.run_dir)
    start = maybe_resume(cfg, engine, groups)  # 0: fresh start
    watchdog.beat(start)
    series = wandb = None
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        log.info("engine %s, launcher %s, %s", engine.name, info.launcher, layout.describe().splitlines()[0])
        log.info("parameters: %s", engine.module.num_params())
        series = start_series(run_dir, start, resolve_checkpoint(t.resume, t.run_dir) if start else None)
        wandb = WandbSink.open(cfg, run_dir, resumed=start > 0)
    tokens = tokens_per_step(cfg, groups)
    monitor = TrainMonitor(cfg, engine.module, groups, device, tokens)
    watchdog.beat()
    sink = MetricsSink(run_dir, t.steps, enabled=info.rank == 0,
                       console=os.environ.get("DMOE_NO_PROGRESS") != "1", series=series, extra=(wandb,))
    history, t0 = {"val": []}, time.time()
    skipped, stopped_at = 0, None

    def eval_and_log(step: int) -> None:
        val = evaluate(engine, data, cfg, groups, device)
        history["val"].append((step, val))
        sink.log(step, {"val_loss": val, "val_ppl": safe_exp(val)}, kind="eval")
        watchdog.beat()

    try:
        eval_and_log(start)
        for step in range(start + 1, t.steps + 1):
            watchdog.beat(step)
            log_step = step % t.log_every == 0 or step == t.steps
            with monitor.timed(step, log_step):
                result = train_step(engine, data, cfg, groups, device, step)
            if result.nonfinite:
                skipped = _on_nonfinite(cfg, engine.name, step, result.nonfinite, skipped)
            monitor.after_step(step, result, info.rank)
            if log_step:
                sink.log(step, *monitor.figures(result))
            else:
                sink.advance(step)
            if step % t.eval_every == 0 or step == t.steps:
                eval_and_log(step)
            saved = bool(t.save_every and (step % t.save_every == 0 or step == t.steps))
            if saved:
                save_checkpoint(engine, cfg, groups, step, {"step": step, "seed": t.seed})
                watchdog.beat()
            signum = stop.agreed(device)
            if signum:
                _stop_on_signal(cfg, engine, groups, step, signum, saved)
                stopped_at = step
                break
    finally:
        sink.close()
    summary = {
        "engine": engine.name, "launcher": info.launcher, "world_size": info.world_size,
        "steps": t.steps, "seconds": round(time.time() - t0, 1),
        "val_loss_first": history["val"][0][1], "val_loss_last": history["val"][-1][1],
        "val_curve": history["val"], "tokens_per_step": tokens,
    }
    if stopped_at is not None:
        summary["stopped_by_signal_at"] = stopped_at
    if info.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done in %.1fs: val loss %.3f -> %.3f", summary["seconds"],
                 summary["val_loss_first"], summary["val_loss_last"])
    return summary
