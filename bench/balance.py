"""Load balancing at equal steps: Switch aux loss vs auxiliary-loss-free bias vs both vs
neither, on the built-in corpus, 2 CPU ranks (torchrun, plain torch engine, EP 2).

    .venv/bin/python bench/balance.py                          # default model, 300 steps
    .venv/bin/python bench/balance.py --config configs/deepseek-tiny.yaml --rate 0.01

Per setting: final validation loss, drop fraction, and load imbalance (busiest expert's
routed rows / mean, per MoE layer) over training, from each run's metrics.jsonl. Prints
one JSON line per setting and a table; writes bench/results/balance_<name>.jsonl and a plot
(imbalance of every layer against step, one colour per setting) to --plot. Needs
matplotlib (the `bench` extra) for the plot.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def settings(aux: float, rate: float) -> dict[str, list[str]]:
    return {
        "neither": ["--moe.aux_loss_coef=0", "--moe.bias_update_rate=0"],
        "aux loss": [f"--moe.aux_loss_coef={aux}", "--moe.bias_update_rate=0"],
        "loss-free bias": ["--moe.aux_loss_coef=0", f"--moe.bias_update_rate={rate}"],
        "both": [f"--moe.aux_loss_coef={aux}", f"--moe.bias_update_rate={rate}"],
    }


def train(config: str, name: str, overrides: list[str], steps: int, port: int) -> Path:
    run_dir = REPO / "runs" / "balance" / Path(config).stem / name.replace(" ", "-")
    cmd = [str(REPO / ".venv/bin/torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           "launch/train.py", "--config", config, f"--train.run_dir={run_dir}", "--parallel.ep=2",
           f"--train.steps={steps}", "--train.save_every=0", "--train.log_every=10", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", DMOE_NO_PROGRESS="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return run_dir


def summarize(name: str, run_dir: Path) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    last = train[-10:]  # the last 100 steps (log every 10)
    mean = lambda key: sum(r[key] for r in last) / len(last)  # noqa: E731
    return {"setting": name, "val_loss": round(evals[-1]["val_loss"], 4),
            "drop_frac_last100": round(mean("drop_frac"), 4),
            "imbalance_last100": round(mean("load_max_over_mean"), 3),
            "imbalance_per_layer_last100": [round(sum(r["load_max_over_mean_per_layer"][i] for r in last)
                                                  / len(last), 3)
                                            for i in range(len(last[-1]["load_max_over_mean_per_layer"]))],
            "steps": [r["step"] for r in train],
            "imbalance_per_layer": [r["load_max_over_mean_per_layer"] for r in train]}


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for color, row in zip(("tab:gray", "tab:blue", "tab:orange", "tab:green"), rows):
        layers = list(zip(*row["imbalance_per_layer"]))
        for i, series in enumerate(layers):
            ax.plot(row["steps"], series, color=color, linestyle=("-", "--", ":", "-.")[i % 4],
                    label=f"{row['setting']} (val {row['val_loss']:.3f})" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("busiest expert / mean (routed rows)")
    ax.set_title(title)
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--aux", type=float, default=0.01)
    p.add_argument("--rate", type=float, default=0.001)
    p.add_argument("--port", type=int, default=29701)
    p.add_argument("--plot", default=None, help="PNG path (default docs/balance_<config>.png)")
    args, extra = p.parse_known_args()
    rows = []
    for i, (name, overrides) in enumerate(settings(args.aux, args.rate).items()):
        run_dir = train(args.config, name, [*overrides, *extra], args.steps, args.port + i)
        row = summarize(name, run_dir)
        print(json.dumps({k: v for k, v in row.items() if k not in ("steps", "imbalance_per_layer")}),
              flush=True)
        rows.append(row)
    stem = Path(args.config).stem
    out = REPO / "bench" / "results" / f"balance_{stem}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{'setting':<16} {'val loss':>9} {'drop':>7} {'max/mean':>9}  per layer (last 100 steps)")
    for r in rows:
        print(f"{r['setting']:<16} {r['val_loss']:>9.3f} {r['drop_frac_last100']:>7.2%} "
              f"{r['imbalance_last100']:>9.2f}  {r['imbalance_per_layer_last100']}")
    plot(rows, args.plot or str(REPO / "docs" / f"balance_{stem}.png"),
         f"{stem}: load imbalance per MoE layer ({args.steps} steps, aux {args.aux}, rate {args.rate})")


if __name__ == "__main__":
    main()
