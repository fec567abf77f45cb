"""Plot a saved moe_layer.py grid: forward+backward ms against experts and tokens.

    .venv/bin/python bench/plot.py bench/results/moe_layer_grid_2026-11-29.jsonl

One panel per (k, capacity factor); x = experts (log scale), y = median ms (log scale);
colour = tokens, line style = implementation (dmoe solid, DeepSpeed dashed, torchtitan
dash-dot, limit dotted); an implementation missing from a run (no torchtitan before
2026-11-30, DeepSpeed beyond top-2) is left out of the panel.
Needs matplotlib (the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

IMPLS = {"dmoe_ms": ("dmoe", "-", "o"), "deepspeed_ms": ("DeepSpeed", "--", "s"),
         "torchtitan_ms": ("torchtitan", "-.", "D"), "limit_ms": ("limit", ":", "^")}


def load(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.startswith("{")]
    return rows


# --metric: which figure of each implementation a panel shows (the limit has no fastest rep)
METRICS = {"wall": ("_ms", "median wall"), "cpu": ("_cpu_ms", "median CPU time"),
           "min": ("_min_ms", "fastest rep"), "mib": ("_peak_mib", "peak MiB")}


def plot(rows, out, title, metric="wall"):
    suffix, what = METRICS[metric]
    rows = [{key: r.get(key[:-3] + suffix, r.get(key) if metric == "min" and key == "limit_ms" else None)
             if metric != "mib" or key != "limit_ms" else None  # no limit in the memory plot
             for key in IMPLS} | {k: r[k] for k in ("k", "cf", "tokens", "experts")} for r in rows]
    impls = {key: style for key, style in IMPLS.items()
             if any(r.get(key) is not None for r in rows)}
    ks = sorted({r["k"] for r in rows})
    cfs = sorted({str(r["cf"]) for r in rows}, key=lambda c: (c == "dropless", c))
    tokens = sorted({r["tokens"] for r in rows})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(ks), len(cfs), figsize=(max(3.2 * len(cfs), 9.0), 3.0 * len(ks) + 0.6),
                             sharex=True, sharey=True, squeeze=False)
    for i, k in enumerate(ks):
        for j, cf in enumerate(cfs):
            ax = axes[i][j]
            for t, colour in zip(tokens, colours):
                case = sorted((r for r in rows if r["k"] == k and str(r["cf"]) == cf
                               and r["tokens"] == t), key=lambda r: r["experts"])
                for key, (name, style, marker) in impls.items():
                    pts = [(r["experts"], r[key]) for r in case if r.get(key) is not None]
                    ax.plot([e for e, _ in pts], [ms for _, ms in pts], style,
                            marker=marker, color=colour, markersize=4, label=f"{name}, T={t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
            ax.set_title(f"k={k}, cf={cf}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(ks) - 1:
                ax.set_xlabel("experts")
            if j == 0:
                ax.set_ylabel("fwd+bwd peak MiB" if metric == "mib" else f"fwd+bwd ms ({what})")
    experts = sorted({r["experts"] for r in rows})
    axes[0][0].set_xticks(experts, [str(e) for e in experts])
    handles, labels = axes[0][0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda n: (n % len(impls), n))  # one column per impl
    fig.legend([handles[n] for n in order], [labels[n] for n in order], loc="lower center",
               ncol=len(impls), fontsize=9, frameon=False)
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(out, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl", nargs="+", help="moe_layer.py output (one JSON line per case)")
    p.add_argument("-o", "--out", default="bench/moe_layer_grid.png")
    p.add_argument("--title", default="One MoE layer, fwd+bwd, 1 thread, hidden 256, ffn 1024, "
                   "fp32: dmoe vs DeepSpeed vs torchtitan vs the bare-expert limit")
    p.add_argument("--metric", choices=list(METRICS), default="wall",
                   help="median wall time (default), median CPU time (steadier on a loaded "
                        "machine: time-slicing by other jobs is not counted), fastest rep, or "
                        "peak activation memory (mib)")
    args = p.parse_args()
    plot(load(args.jsonl), args.out, args.title, args.metric)


if __name__ == "__main__":
    main()
