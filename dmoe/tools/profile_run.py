"""`dmoe profile`: a short training run with every collective recorded, per step and layer.

    result = profile_run(cfg, info, device, engine_name, steps=20, out_dir=Path(...))

The steps are dmoe.train.step's (the trainer's own), with each MoE layer's profiling
hook on (MoELayer.enable_profiling).

Each rank runs the real engine (forward, backward, optimizer step) on the real data with a
`CommRecorder` active (dmoe.parallel.comm_trace). After each step the ranks exchange a
small summary (all_gather_object, not recorded), and rank 0 keeps one record per step:
wall time split into compute / all-to-all / other communication / wait, and per MoE layer
the all-to-all time and bytes, routed and kept rows per expert. `record_routing` also keeps
every micro-batch's per-expert counts per rank (what `dmoe tune-capacity` replays).

The time split: `wait` is a timed 1-element all-reduce on the EP group just before each
all-to-all (`measure_wait`), i.e. time spent waiting for the slowest peer to arrive (load
imbalance, stragglers); the all-to-all after it then measures the transfer alone.
compute = step - all-to-all - other communication - wait.

After the timed steps, `trace_steps` more steps run under torch.profiler (named ranges
moe{i}/route, dispatch, experts, combine) and rank 0 writes a Chrome/Perfetto trace.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dmoe.checkpoint.load import maybe_resume
from dmoe.config import Config
from dmoe.data.token_files import TokenData
from dmoe.moe.layer import MoELayer
from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommRecorder
from dmoe.parallel.layout import ProcessGroups
from dmoe.startup.launchers import LaunchInfo
from dmoe.train.engines import Engine
from dmoe.train.step import eval_outputs, tokens_per_step, train_step
from dmoe.train.trainer import build, prepare_data

from .gpu_stats import GpuProbe

log = logging.getLogger(__name__)


def instrument_moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """Turns on each MoE layer's profiling hook: comm events named by layer, and
    torch.profiler ranges moe{i}/route, dispatch, experts, combine."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for i, layer in enumerate(layers):
        layer.enable_profiling(i)
    return layers


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _routing(outputs) -> torch.Tensor:
    """[M, L, E] routed rows per micro-batch and layer on this rank (before drops)."""
    return torch.stack([torch.stack([s.routed_E for s in o.moe_stats]) for o in outputs]).cpu()


def _kept(outputs) -> torch.Tensor:
    return torch.stack([torch.stack([s.kept_E for s in o.moe_stats]) for o in outputs]).cpu()


def rank_summary(events, step_s: float, outputs, num_layers: int, self_index: int) -> dict:
    """This rank's figures for one step (plain Python: goes through all_gather_object)."""
    a2a = [e for e in events if e.op == "all_to_all"]
    wait = sum(e.seconds for e in events if e.op == "barrier")
    a2a_s = sum(e.seconds for e in a2a)
    other = sum(e.seconds for e in events if e.op not in ("all_to_all", "barrier"))
    layers = []
    for i in range(num_layers):
        mine = [e for e in a2a if e.layer == i]
        layers.append({
            "a2a_s": sum(e.seconds for e in mine),
            "wait_s": sum(e.seconds for e in events if e.op == "barrier" and e.layer == i),
            "a2a_bytes": sum(e.size_bytes for e in mine),
            "a2a_offrank_bytes": sum(sum(e.send_bytes) - e.send_bytes[self_index] for e in mine),
        })
    return {"step_s": step_s, "a2a_s": a2a_s, "comm_s": other, "wait_s": wait, "layers": layers,
            "routed": _routing(outputs).tolist() if outputs and outputs[0].moe_stats else [],
            "kept": _kept(outputs).tolist() if outputs and outputs[0].moe_stats else []}


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    with comm_trace.paused():
        dist.all_gather_object(out, obj)
    return out


def eval_routing(engine: Engine, data: TokenData, cfg: Config, groups: ProcessGroups,
                 device: torch.device, batches: int) -> torch.Tensor:
    """[M, L, E] routed rows of `batches` held-out micro-batches in eval mode (this rank)."""
    return _routing(eval_outputs(engine, data, cfg, groups, device, batches))


def profile_run(cfg: Config, info: LaunchInfo, device: torch.device, engine_name: str,
                steps: int, out_dir: Path,
                warmup: int = 1, trace_steps: int = 2, measure_wait: bool = True,
                record: bool = True, eval_batches: int = 0) -> dict:
    """Runs warmup + steps (+ trace_steps) training steps; rank 0 gets the records."""
    data = prepare_data(cfg, info)
    engine, groups, layout = build(cfg, info, device, engine_name)
    # --train.resume=PATH|auto: profile (or record routing of) a trained model, not a fresh one
    start = maybe_resume(cfg, engine, groups)
    layers = instrument_moe_layers(engine.module)
    recorder = CommRecorder(groups, measure_wait=measure_wait) if record else None
    probe = GpuProbe(torch.cuda.current_device() if device.type == "cuda" else None)
    tokens = tokens_per_step(cfg, groups)
    ep_index, records, routing = groups.index("ep"), [], []
    for step in range(start + 1, start + warmup + steps + 1):
        per_rank = _timed_step(engine, data, cfg, groups, device, step, recorder, len(layers), ep_index)
        if step > start + warmup:
            gathered = _gather(per_rank, info.world_size)
            records.append(_merge(step, gathered, tokens, probe.sample(), groups))
            routing.append(torch.tensor([g["routed"] for g in gathered]))
    trace_path = _trace(engine, data, cfg, groups, device, start + warmup + steps, trace_steps, out_dir, info)
    evals = None
    if eval_batches:
        evals = _gather(eval_routing(engine, data, cfg, groups, device, eval_batches).tolist(),
                        info.world_size)
    return {"records": records, "routing": routing, "eval_routing": evals, "layout": layout,
            "ep_index": _gather(ep_index, info.world_size), "gpu_note": probe.note,
            "trace": trace_path, "num_layers": len(layers), "tokens_per_step": tokens,
            "start_step": start}


def _timed_step(engine, data, cfg, groups, device, step, recorder, num_layers, ep_index) -> dict:
    if recorder is not None:
        recorder.start_step(step)
    with comm_trace.recording(recorder):
        _sync(device)
        t0 = time.perf_counter()
        outputs = train_step(engine, data, cfg, groups, device, step).outputs
        _sync(device)
        step_s = time.perf_counter() - t0
    events = recorder.end_step() if recorder is not None else []
    return rank_summary(events, step_s, outputs, num_layers, ep_index)


def _merge(step: int, gathered: list[dict], tokens: int, gpu: dict, groups) -> dict:
    """One step record from every rank's summary: means over ranks plus per-rank lists."""
    from .profile_stats import merge_step

    return merge_step(step, gathered, tokens, gpu, groups.size("ep"))


def _trace(engine, data, cfg, groups, device, last_step, trace_steps, out_dir, info):
    if trace_steps <= 0:
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for step in range(last_step + 1, last_step + trace_steps + 1):
            with torch.profiler.record_function(f"step{step}"):
                train_step(engine, data, cfg, groups, device, step)
            _sync(device)
    path = Path(out_dir) / f"trace_rank{info.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return str(path)
