"""`dmoe bench-comm`: all-to-all bandwidth over message and group sizes, like nccl-tests.

    dmoe bench-comm --nproc 2                        # 2 local ranks via torchrun
    torchrun --nproc_per_node 8 -m dmoe.cli bench-comm --min-bytes 1K --max-bytes 256M

For each group size n (powers of two up to the world size; groups of consecutive ranks,
all timed at once) and each size S (bytes each rank sends in total, S/n to every peer,
its own share included), times `iters` all_to_all_single calls after `warmup`, and
reports the slowest rank's mean time t, algbw = S / t and busbw = algbw * (n-1)/n
(nccl-tests' alltoall convention: the share a rank keeps never crosses the bus).
Communication: the benchmark's collectives only. Prints a table, writes bench_comm.json
and report.html (bandwidth and time over sizes, one line per group size).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dmoe.startup.command import base_parser, run_tool

UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def parse_bytes(text: str) -> int:
    text = text.strip().upper().rstrip("B")
    return int(float(text[:-1]) * UNITS[text[-1]]) if text and text[-1] in UNITS else int(text)


def sizes_between(lo: int, hi: int, factor: int = 4) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def busbw(algbw: float, n: int) -> float:
    return algbw * (n - 1) / n


def group_sizes(world: int) -> list[int]:
    sizes, n = [], 2
    while n <= world:
        sizes.append(n)
        n *= 2
    return sizes or [1]


def time_alltoall(nbytes: int, group: dist.ProcessGroup | None, n: int, device: torch.device,
                  iters: int, warmup: int) -> float:
    """Mean seconds per call on this rank (float32 elements, S/n bytes to each peer)."""
    count = max(n, nbytes // 4 // n * n)
    send, recv = torch.ones(count, device=device), torch.empty(count, device=device)
    for _ in range(warmup):
        dist.all_to_all_single(recv, send, group=group)
    dist.barrier(group=group)  # the measured group only: ranks outside it are not here
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_to_all_single(recv, send, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def measured_groups(world: int, n: int) -> list[list[int]]:
    """Consecutive rank groups of size n; the world % n last ranks are in none."""
    return [list(range(s, s + n)) for s in range(0, world - world % n, n)]


def run_bench(device: torch.device, sizes: list[int], iters: int, warmup: int) -> list[dict]:
    """Every rank creates every group (new_group is collective over the default group, in
    the same order everywhere) and joins every default-group collective below; ranks outside
    a measured group (world % n of them) time nothing and report 0."""
    world, rank, rows = dist.get_world_size(), dist.get_rank(), []
    for n in group_sizes(world):
        groups = [dist.new_group(ranks) for ranks in measured_groups(world, n)]
        mine = groups[rank // n] if rank // n < len(groups) else None
        for nbytes in sizes:
            t = time_alltoall(nbytes, mine, n, device, iters, warmup) if mine is not None else 0.0
            # on the run's device: NCCL reduces only CUDA tensors
            worst = torch.tensor([t], dtype=torch.float64, device=device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            t = float(worst.item())
            algbw = nbytes / t / 1e9 if t > 0 else 0.0
            rows.append({"group_size": n, "bytes": nbytes, "time_us": t * 1e6,
                         "algbw_gbps": algbw, "busbw_gbps": busbw(algbw, n)})
    return rows


def main(argv: list[str]) -> int:
    p = base_parser("dmoe bench-comm", "all-to-all bandwidth (algbw, busbw) over sizes")
    p.add_argument("--min-bytes", default="4K",
                   help="smallest size each rank sends in total (K, M, G)")
    p.add_argument("--max-bytes", default="16M",
                   help="largest size (sizes double from --min-bytes)")
    p.add_argument("--iters", type=int, default=10, help="timed all-to-alls per size")
    p.add_argument("--warmup", type=int, default=3, help="untimed all-to-alls before them")
    args, overrides = p.parse_known_args(argv)

    def body(cfg, info, device, engine_name):
        sizes = sizes_between(parse_bytes(args.min_bytes), parse_bytes(args.max_bytes))
        rows = run_bench(device, sizes, args.iters, args.warmup)
        if info.rank == 0:
            out = Path(args.out or Path(cfg.train.run_dir) / "bench-comm")
            out.mkdir(parents=True, exist_ok=True)
            backend = dist.get_backend()
            (out / "bench_comm.json").write_text(json.dumps({"backend": backend, "rows": rows}, indent=2))
            (out / "report.html").write_text(report_html(rows, backend, dist.get_world_size()))
            _print(rows, backend, out)

    return run_tool("bench-comm", argv, args, overrides, body)


def _print(rows: list[dict], backend: str, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"all-to-all, backend {backend} (busbw = algbw * (n-1)/n)")
    for col in ("ranks", "size", "time us", "algbw GB/s", "busbw GB/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["group_size"]), _human(r["bytes"]), f"{r['time_us']:.1f}",
                      f"{r['algbw_gbps']:.3f}", f"{r['busbw_gbps']:.3f}")
    console = Console(width=None if Console().is_terminal else 100)
    console.print(table)
    if rows and rows[0]["group_size"] == 1:
        console.print("one rank: nothing crosses a link (run with --nproc N or under a launcher)")
    console.print(f"wrote {out}/bench_comm.json, report.html")


def report_html(rows: list[dict], backend: str, world: int) -> str:
    from . import html_report as H

    sizes = sorted({r["bytes"] for r in rows})
    by_n = {n: {r["bytes"]: r for r in rows if r["group_size"] == n} for n in sorted({r["group_size"] for r in rows})}
    labels = [_human(s) for s in sizes]
    series = lambda key: {f"{n} ranks": [g.get(s, {}).get(key) for s in sizes] for n, g in by_n.items()}
    figs = [H.lines(sizes, series("busbw_gbps"), "all-to-all bus bandwidth", "bytes each rank sends",
                    "busbw GB/s", xlog=True, xtick_labels=labels),
            H.lines(sizes, series("time_us"), "all-to-all time per call", "bytes each rank sends", "time (us)",
                    xlog=True, ylog=True, xtick_labels=labels)]
    table = H.table(["ranks", "size", "time us", "algbw GB/s", "busbw GB/s"],
                    [[r["group_size"], _human(r["bytes"]), f"{r['time_us']:.1f}", f"{r['algbw_gbps']:.3f}",
                      f"{r['busbw_gbps']:.3f}"] for r in rows])
    note = ("busbw = algbw * (n-1)/n (nccl-tests' all-to-all convention); the slowest rank's mean time"
            + ("; one rank: nothing crosses a link" if world == 1 else ""))
    return H.page("dmoe bench-comm", [H.section("Bandwidth", H.plots(*figs)), H.section("Rows", table)],
                  f"backend {backend}, world size {world}; {note}")


def _human(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:g}{unit}"
    return f"{n}B"
