"""Cost of the comm recorder: training steps with it off, on, and on with wait probes.

    torchrun --nproc_per_node 2 bench/comm_trace_overhead.py [--config FILE] [overrides]

Modes run interleaved step by step (off, on, on+wait, off, ...) so that load from other
processes on the machine hits them alike; prints JSON and a one-line summary (rank 0).
Default overrides: the default model with parallel.ep=2, 12 rounds after 2 warm-up rounds.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dmoe.config import load_config  # noqa: E402
from dmoe.parallel import comm_trace  # noqa: E402
from dmoe.parallel.comm_trace import CommRecorder  # noqa: E402
from dmoe.startup.launchers import detect_launch  # noqa: E402
from dmoe.startup.process_group import init_distributed  # noqa: E402
from dmoe.train.step import train_step  # noqa: E402
from dmoe.train.trainer import build, prepare_data  # noqa: E402

ROUNDS, WARMUP = 12, 2


def main(argv):
    config = argv[argv.index("--config") + 1] if "--config" in argv else "configs/default.yaml"
    overrides = [a for a in argv if a.startswith("--") and a != "--config" and a != config]
    cfg = load_config(config, ["--parallel.ep=2", *overrides])
    info = detect_launch()
    torch.set_num_threads(1)
    device = init_distributed(info, cfg.parallel.backend)
    data = prepare_data(cfg, info)
    engine, groups, _ = build(cfg, info, device, "torch")
    modes = {"off": None, "on": CommRecorder(groups), "on+wait": CommRecorder(groups, measure_wait=True)}
    times = {m: [] for m in modes}
    step = 0
    for r in range(WARMUP + ROUNDS):
        for mode, rec in modes.items():
            step += 1
            if rec is not None:
                rec.start_step(step)
            with comm_trace.recording(rec):
                t0 = time.perf_counter()
                train_step(engine, data, cfg, groups, device, step)
                dt = time.perf_counter() - t0
            if rec is not None:
                rec.end_step()
            if r >= WARMUP:
                times[mode].append(dt)
    if info.rank == 0:
        med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
        out = {"median_step_ms": med, "overhead_on_pct": 100 * (med["on"] / med["off"] - 1),
               "overhead_on_wait_pct": 100 * (med["on+wait"] / med["off"] - 1),
               "events_per_step": len(modes["on"].events), "rounds": ROUNDS}
        print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
