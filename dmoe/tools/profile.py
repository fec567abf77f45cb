"""`dmoe profile --config FILE [overrides] --steps N [--nproc N]`.

    dmoe profile --steps 20                               # one rank, in process
    dmoe profile --steps 20 --nproc 2 --parallel.ep=2     # spawns torchrun, 2 ranks
    torchrun --nproc_per_node 4 -m dmoe.cli profile --parallel.ep=4

Writes to --out (default <train.run_dir>/profile): profile.jsonl (one record per step),
comm per layer in it, tensorboard/, trace_rank0.json (chrome://tracing or ui.perfetto.dev),
report.html; prints the per-layer table.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from dmoe.startup.command import base_parser, run_tool

from . import html_report as H
from .profile_stats import layer_table, print_tables, step_summary, write_jsonl, write_tensorboard

log = logging.getLogger(__name__)


def parser():
    p = base_parser("dmoe profile", "short instrumented training run: comm, time split, routing")
    p.add_argument("--steps", type=int, default=10, help="profiled steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--trace-steps", type=int, default=2, help="extra steps under torch.profiler")
    p.add_argument("--no-wait", action="store_true", help="no timed barrier before all-to-alls")
    return p


def main(argv: list[str]) -> int:
    args, overrides = parser().parse_known_args(argv)

    def body(cfg, info, device, engine_name):
        from .profile_run import profile_run

        out = Path(args.out or Path(cfg.train.run_dir) / "profile")
        res = profile_run(cfg, info, device, engine_name, args.steps, out, warmup=args.warmup,
                          trace_steps=args.trace_steps, measure_wait=not args.no_wait)
        if info.rank == 0:
            write_outputs(res, out, cfg, engine_name)

    return run_tool("profile", argv, args, overrides, body)


def write_outputs(res: dict, out: Path, cfg, engine_name: str) -> None:
    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 130)
    out.mkdir(parents=True, exist_ok=True)
    records, rows, summary = res["records"], layer_table(res["records"]), step_summary(res["records"])
    write_jsonl(records, out / "profile.jsonl")
    write_tensorboard(records, out / "tensorboard")
    subtitle = (f"{res['layout'].describe().splitlines()[0]}; engine {engine_name}; "
                f"{len(records)} profiled steps of {res['tokens_per_step']} tokens")
    (out / "report.html").write_text(H.page("dmoe profile", profile_sections(res, rows, summary), subtitle))
    (out / "summary.json").write_text(json.dumps({"steps": summary, "layers": rows,
                                                  "gpu": res["gpu_note"], "trace": res["trace"]}, indent=2))
    print_tables(console, summary, rows, res["gpu_note"])
    console.print(f"wrote {out}/report.html, profile.jsonl, tensorboard/, {Path(res['trace'] or '-').name}")


def profile_sections(res: dict, rows: list[dict], summary: dict) -> list[str]:
    records = res["records"]
    steps = [r["step"] for r in records]
    ms = lambda key: [r[key] * 1e3 for r in records]
    s = summary
    head = (f"step {s['step_s'] * 1e3:.1f} ms: compute {s['compute_s'] * 1e3:.1f}, all-to-all "
            f"{s['a2a_s'] * 1e3:.1f}, other communication {s['comm_s'] * 1e3:.1f}, wait "
            f"{s['wait_s'] * 1e3:.1f} ms; {s['tokens_per_s']:,.0f} tokens/s")
    parts = [H.section("Summary", f"<p>{H.esc(head)}</p><p class='note'>{H.esc(res['gpu_note'])}</p>",
                       H.table(["layer", "a2a ms", "wait ms", "a2a MB", "GB/s", "share", "dropped/step",
                                "drop", "expert max/mean", "EP max/mean"],
                               [[f"moe{r['layer']}", f"{r['a2a_ms']:.2f}", f"{r['wait_ms']:.2f}",
                                 f"{r['a2a_mb']:.3f}", f"{r['a2a_gbps']:.3f}", f"{r['share']:.1%}",
                                 f"{r['dropped_per_step']:.0f}", f"{r['drop_frac']:.2%}",
                                 f"{r['load_max_over_mean']:.2f}", f"{r['ep_max_over_mean']:.2f}"] for r in rows]))]
    breakdown = H.stacked_bars(steps, {"compute": ms("compute_s"), "all-to-all": ms("a2a_s"),
                                       "other comm": ms("comm_s"), "wait": ms("wait_s")},
                               "step time breakdown", "ms")
    n_layers = len(records[0]["layers"]) if records else 0
    per_layer = {f"moe{i}": [r["layers"][i]["a2a_s"] * 1e3 for r in records] for i in range(n_layers)}
    drops = {f"moe{i}": [r["layers"][i]["drop_frac"] for r in records] for i in range(n_layers)}
    loads = [[sum(r["layers"][i]["expert_load"][e] for r in records)
              for e in range(len(records[0]["layers"][i]["expert_load"]))] for i in range(n_layers)]
    figs = [breakdown]
    if n_layers and len(steps) > 1:
        figs += [H.lines(steps, per_layer, "all-to-all per MoE layer", "step", "ms"),
                 H.lines(steps, drops, "drop fraction", "step", "dropped / routed", percent=True)]
    if n_layers:
        figs.append(H.heatmap(loads, [f"moe{i}" for i in range(n_layers)],
                              f"expert load: routed rows over {len(steps)} steps"))
    parts.append(H.section("Plots", H.plots(*figs)))
    if res.get("trace"):
        parts.append(H.section("Trace", f"<p>{H.esc(Path(res['trace']).name)}: open in "
                               "ui.perfetto.dev or chrome://tracing (ranges moe{i}/route, dispatch, "
                               "experts, combine)</p>"))
    return parts
