"""Train every architecture preset on 2 CPU ranks under the DeepSpeed launcher, data
parallel and with --parallel.ep=2, and print one JSON line per run plus a table:
validation loss at the end, wall time, drop fraction and load imbalance (busiest expert /
mean, mean over MoE layers) at the last logged step.

    .venv/bin/python bench/presets.py                       # all presets, both layouts
    .venv/bin/python bench/presets.py --presets deepseek-tiny --layouts ep2
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["switch-tiny", "mixtral-tiny", "qwen2-moe-tiny", "qwen3-moe-tiny", "deepseek-tiny"]
LAYOUTS = {"dp2": [], "ep2": ["--parallel.ep=2"]}


def run(preset: str, layout: str, port: int, extra: list[str]) -> dict:
    run_dir = REPO / "runs" / "presets" / f"{preset}-{layout}"
    cmd = [str(REPO / ".venv/bin/deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "launch/train.py", "--config", f"configs/{preset}.yaml", f"--train.run_dir={run_dir}",
           "--train.save_every=0", *LAYOUTS[layout], *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", DMOE_NO_PROGRESS="1")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.remove(leftover)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return {"preset": preset, "layout": layout, "error": proc.returncode}
    summary = json.loads((run_dir / "summary.json").read_text())
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in train if r["kind"] == "train"][-1]
    return {"preset": preset, "layout": layout, "val_loss": round(summary["val_loss_last"], 4),
            "val_loss_first": round(summary["val_loss_first"], 4), "steps": summary["steps"],
            "train_s": summary["seconds"], "wall_s": round(time.time() - t0, 1),
            "drop_frac": round(last.get("drop_frac", 0.0), 4),
            "load_max_over_mean": round(last.get("load_max_over_mean", 0.0), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--port", type=int, default=29611)
    args, extra = p.parse_known_args()
    rows = []
    for i, preset in enumerate(args.presets):
        for j, layout in enumerate(args.layouts):
            row = run(preset, layout, args.port + 2 * i + j, extra)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'preset':<16} {'layout':<6} {'val loss':>9} {'(step 0)':>9} {'train s':>8} "
          f"{'drop':>6} {'max/mean':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<16} {r['layout']:<6} failed (exit {r['error']})")
            continue
        print(f"{r['preset']:<16} {r['layout']:<6} {r['val_loss']:>9.3f} {r['val_loss_first']:>9.3f} "
              f"{r['train_s']:>8.1f} {r['drop_frac']:>6.2%} {r['load_max_over_mean']:>9.2f}")


if __name__ == "__main__":
    main()
