"""Profile records: merge the ranks' step summaries, summarise per layer, write sinks.

Shape legend: R ranks, M micro-batches, L MoE layers, E experts.
Load figures are on *routed* rows (demand, before drops): expert imbalance = max/mean rows
per expert; EP imbalance = max/mean rows per EP shard (its E/ep experts).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmoe.parallel.layout import expert_owner


def _max_over_mean(x: np.ndarray) -> float:
    mean = x.mean()
    return float(x.max() / mean) if mean > 0 else 0.0


def merge_step(step: int, gathered: list[dict], tokens: int, gpu: dict, ep: int) -> dict:
    mean = lambda key: float(np.mean([g[key] for g in gathered]))  # noqa: E731
    step_s = [g["step_s"] for g in gathered]
    rec = {"step": step, "step_s": max(step_s), "rank_step_s": step_s,
           "a2a_s": mean("a2a_s"), "comm_s": mean("comm_s"), "wait_s": mean("wait_s"),
           "rank_a2a_s": [g["a2a_s"] for g in gathered], "rank_wait_s": [g["wait_s"] for g in gathered]}
    rec["compute_s"] = max(0.0, float(np.mean(step_s)) - rec["a2a_s"] - rec["comm_s"] - rec["wait_s"])
    rec["tokens_per_s"] = tokens / rec["step_s"]
    rec["layers"] = _layers(gathered, ep)
    rec["gpu"] = gpu
    return rec


def _layers(gathered: list[dict], ep: int) -> list[dict]:
    if not gathered[0]["routed"]:
        return []
    routed_LE = np.asarray([g["routed"] for g in gathered]).sum((0, 1))
    kept_LE = np.asarray([g["kept"] for g in gathered]).sum((0, 1))
    out = []
    for i, (routed_E, kept_E) in enumerate(zip(routed_LE, kept_LE)):
        comm = [g["layers"][i] for g in gathered]
        a2a_s = float(np.mean([c["a2a_s"] for c in comm]))
        a2a_bytes = float(np.mean([c["a2a_bytes"] for c in comm]))
        ep_load = np.bincount(expert_owner(len(routed_E), ep).numpy(), weights=routed_E, minlength=ep)
        out.append({
            "layer": i, "a2a_s": a2a_s, "wait_s": float(np.mean([c["wait_s"] for c in comm])),
            "a2a_bytes": a2a_bytes, "a2a_offrank_bytes": float(np.mean([c["a2a_offrank_bytes"] for c in comm])),
            "a2a_gbps": a2a_bytes / a2a_s / 1e9 if a2a_s > 0 else 0.0,
            "routed": int(routed_E.sum()), "dropped": int(routed_E.sum() - kept_E.sum()),
            "drop_frac": float(1 - kept_E.sum() / max(routed_E.sum(), 1)),
            "expert_load": routed_E.tolist(), "load_max_over_mean": _max_over_mean(routed_E),
            "ep_load": ep_load.tolist(), "ep_max_over_mean": _max_over_mean(ep_load),
        })
    return out


def layer_table(records: list[dict]) -> list[dict]:
    """Per-layer means over the profiled steps (what the console table and report show)."""
    if not records or not records[0]["layers"]:
        return []
    step_s = float(np.mean([r["step_s"] for r in records]))
    rows = []
    for i in range(len(records[0]["layers"])):
        ls = [r["layers"][i] for r in records]
        a2a_s = float(np.mean([x["a2a_s"] for x in ls]))
        a2a_bytes = float(np.mean([x["a2a_bytes"] for x in ls]))
        routed, dropped = sum(x["routed"] for x in ls), sum(x["dropped"] for x in ls)
        rows.append({
            "layer": i, "a2a_ms": a2a_s * 1e3, "wait_ms": float(np.mean([x["wait_s"] for x in ls])) * 1e3,
            "a2a_gbps": a2a_bytes / a2a_s / 1e9 if a2a_s > 0 else 0.0, "a2a_mb": a2a_bytes / 1e6,
            "share": a2a_s / step_s if step_s > 0 else 0.0,
            "dropped_per_step": dropped / len(ls), "drop_frac": dropped / max(routed, 1),
            "load_max_over_mean": float(np.mean([x["load_max_over_mean"] for x in ls])),
            "ep_max_over_mean": float(np.mean([x["ep_max_over_mean"] for x in ls])),
        })
    return rows


def step_summary(records: list[dict]) -> dict:
    keys = ("step_s", "compute_s", "a2a_s", "comm_s", "wait_s", "tokens_per_s")
    return {k: float(np.mean([r[k] for r in records])) for k in keys} if records else {}


def write_jsonl(records: list[dict], path: Path) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_tensorboard(records: list[dict], log_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(log_dir))
    try:
        for r in records:
            for key in ("step_s", "compute_s", "a2a_s", "comm_s", "wait_s"):
                tb.add_scalar(f"profile/{key[:-2]}_ms", r[key] * 1e3, r["step"])
            tb.add_scalar("profile/tokens_per_s", r["tokens_per_s"], r["step"])
            for lay in r["layers"]:
                tag, i = f"moe{lay['layer']}", lay["layer"]
                tb.add_scalar(f"{tag}/a2a_ms", lay["a2a_s"] * 1e3, r["step"])
                tb.add_scalar(f"{tag}/a2a_gbps", lay["a2a_gbps"], r["step"])
                tb.add_scalar(f"{tag}/drop_frac", lay["drop_frac"], r["step"])
                tb.add_scalar(f"{tag}/load_max_over_mean", lay["load_max_over_mean"], r["step"])
                load = np.asarray(lay["expert_load"], dtype=np.int64)
                if load.sum() > 0 and i >= 0:
                    tb.add_histogram(f"{tag}/expert_load", np.repeat(np.arange(len(load)), load), r["step"])
    finally:
        tb.close()


def print_tables(console, summary: dict, rows: list[dict], gpu_note: str) -> None:
    from rich.table import Table

    s = summary
    console.print(f"step {s['step_s'] * 1e3:.1f} ms = compute {s['compute_s'] * 1e3:.1f} + all-to-all "
                  f"{s['a2a_s'] * 1e3:.1f} + other comm {s['comm_s'] * 1e3:.1f} + wait "
                  f"{s['wait_s'] * 1e3:.1f} ms;  {s['tokens_per_s']:,.0f} tokens/s")
    table = Table(title="MoE layers (means per step over ranks)")
    for col in ("layer", "a2a ms", "wait ms", "a2a MB", "GB/s", "share", "drop/step",
                "drop", "expert max/mean", "EP max/mean"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"moe{r['layer']}", f"{r['a2a_ms']:.2f}", f"{r['wait_ms']:.2f}", f"{r['a2a_mb']:.3f}",
                      f"{r['a2a_gbps']:.3f}", f"{r['share']:.1%}", f"{r['dropped_per_step']:.0f}",
                      f"{r['drop_frac']:.2%}", f"{r['load_max_over_mean']:.2f}", f"{r['ep_max_over_mean']:.2f}")
    console.print(table)
    console.print(gpu_note)
