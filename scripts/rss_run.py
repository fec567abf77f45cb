#!/usr/bin/env python3
"""Resident memory of a one-rank training run, step by step: RSS sampled from /proc while
`launch/train.py` runs, matched to the steps in its metrics.jsonl by time.

    .venv/bin/python scripts/rss_run.py --out /tmp/rss [--malloc trim|mmap|system] \
        -- --train.steps=1000 ...

Prints (and writes to OUT/rss.json) the RSS at the first and last logged steps, per 100
steps, and the least-squares slope in MB per 100 steps over the last 80% of the steps.
--malloc sets DMOE_MALLOC (dmoe.startup.allocator; default: dmoe's default, trim).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_100(points: list[tuple[int, float]]) -> float:
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(r for _, r in points) / n
    var = sum((s - mx) ** 2 for s, _ in points)
    return 100 * sum((s - mx) * (r - my) for s, r in points) / var if var else 0.0


def measure(train_args: list[str], run_dir: Path, malloc: str, interval: float = 0.2) -> dict:
    env = dict(os.environ, DMOE_NO_PROGRESS="1", OMP_NUM_THREADS="1", DMOE_MALLOC=malloc)
    cmd = [
        sys.executable,
        "launch/train.py",
        *train_args,
        f"--train.run_dir={run_dir}",
        "--train.overwrite=true",
        "--train.threads=1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    samples: list[tuple[float, float]] = []
    while proc.poll() is None:
        r = rss_mb(proc.pid)
        if r is not None:
            samples.append((time.time(), r))
        time.sleep(interval)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"rss_run: training exited {proc.returncode}: {err[-2000:]}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["time"]) for r in steps if r.get("kind") == "train"]
    points = []
    for step, t in steps:  # the last sample taken before the step's record was written
        before = [r for ts, r in samples if ts <= t]
        if before:
            points.append((step, before[-1]))
    last = points[-1][0]
    tail = [p for p in points if p[0] > last * 0.2]
    return {
        "malloc": malloc,
        "args": train_args,
        "rss_mb_first_logged": points[0],
        "rss_mb_end": points[-1],
        "peak_mb": max(r for _, r in samples),
        "per_100_steps": [p for p in points if p[0] % 100 == 0],
        "slope_mb_per_100_steps_last_80pct": slope_per_100(tail),
        "wall_s": samples[-1][0] - samples[0][0],
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/rss")
    p.add_argument("--malloc", default="trim", choices=["trim", "mmap", "system"])
    p.add_argument("train_args", nargs="*")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = measure(args.train_args, out / args.malloc, args.malloc)
    (out / f"rss_{result['malloc']}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
