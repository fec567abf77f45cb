"""`dmoe tune-capacity --target-drop 0.01`: the smallest capacity factor meeting a drop target.

    dmoe tune-capacity --config configs/default.yaml --steps 40 --target-drop 0.01
    dmoe tune-capacity --nproc 2 --parallel.ep=2 --quality --quality-steps 200

1. A recording run (`--steps`, the configured factor) keeps every micro-batch's routed
   rows per expert on every rank (routed_E: before drops), plus `--eval-batches` held-out
   batches in eval mode.
2. For each factor of the grid, dmoe.moe.capacity_replay gives the drop fraction that routing
   would have had, per layer and overall, without retraining (exact for the recorded
   routing), and the all-to-all bytes it implies (kept rows whose expert is on another EP
   rank x d_model x element size x 4: dispatch + combine, forward + backward).
3. Short timed runs at `--timed-factors` measure step time and tokens/s.
4. Prints the table, recommends the smallest grid factor whose overall drop <= target,
   writes capacity.yaml (pass it with --config next run, or copy its value), report.html.
`--quality` also trains `--quality-steps` at each of `--quality-factors` and reports the
final validation loss. Eval drops are reported at moe.eval_capacity_factor.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from dmoe.moe.capacity_replay import drop_fractions, kept_rows, offrank_rows, smallest_factor
from dmoe.startup.command import base_parser, run_tool

log = logging.getLogger(__name__)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parser():
    p = base_parser("dmoe tune-capacity", "capacity factor from recorded routing + timed runs")
    p.add_argument("--target-drop", type=float, default=0.01,
                   help="the overall drop fraction to stay under")
    p.add_argument("--steps", type=int, default=20, help="recorded training steps")
    p.add_argument("--record-from", type=int, default=0, help="use routing from this step on")
    p.add_argument("--factors", type=floats, default=floats("1.0,1.1,1.25,1.5,1.75,2.0,2.5,3.0"),
                   help="the grid of capacity factors replayed (comma-separated)")
    p.add_argument("--timed-factors", type=floats, default=floats("1.0,1.25,2.0"),
                   help="factors of the short timed runs")
    p.add_argument("--timed-steps", type=int, default=5, help="steps per timed run")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="held-out batches recorded in eval mode")
    p.add_argument("--quality", action="store_true", help="train short runs, report val loss")
    p.add_argument("--quality-factors", type=floats, default=floats("1.0,1.25,2.0"),
                   help="--quality: factors trained")
    p.add_argument("--quality-steps", type=int, default=0, help="0: train.steps")
    return p


def main(argv: list[str]) -> int:
    args, overrides = parser().parse_known_args(argv)
    args.overrides = [o for o in overrides if o.startswith("--") and "." in o]  # for the report heading

    def body(cfg, info, device, engine_name):
        out = Path(args.out or Path(cfg.train.run_dir) / "tune-capacity")
        result = tune(cfg, info, device, engine_name, args, out)
        if info.rank == 0:
            from .tune_report import write_outputs

            write_outputs(result, cfg, args, out)

    return run_tool("tune-capacity", argv, args, overrides, body)


def with_factor(cfg, factor: float, **train):
    c = copy.deepcopy(cfg)
    c.moe.capacity_factor = factor
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def tune(cfg, info, device, engine_name: str, args, out: Path) -> dict:
    from .profile_run import profile_run
    from .profile_stats import step_summary

    rec = profile_run(cfg, info, device, engine_name, args.steps, out, warmup=0, trace_steps=0,
                      measure_wait=False, record=False, eval_batches=args.eval_batches)
    result = {"recorded_factor": cfg.moe.capacity_factor, "recorded_steps": args.steps,
              "model": model_label(cfg, args.config, getattr(args, "overrides", ())), "resumed_from": resumed_from(cfg, rec["start_step"])}
    if info.rank == 0:
        result.update(predict(cfg, rec, args))
    timed = {}
    for f in args.timed_factors:
        r = profile_run(with_factor(cfg, f), info, device, engine_name, args.timed_steps, out,
                        warmup=1, trace_steps=0, measure_wait=False, record=True)
        s = step_summary(r["records"])
        timed[f] = {**s, "measured_drop": _measured_drop(r["records"])}
    result["timed"] = timed
    if args.quality:
        result["quality"] = quality_runs(cfg, info, device, engine_name, args, out)
    return result


def model_label(cfg, config_name, overrides=()) -> str:
    """What was measured: the config (and how many overrides), the model's size, one line."""
    from dmoe.model.flops import count_params

    m, e, n = cfg.model, cfg.moe, count_params(cfg)
    name = Path(str(config_name)).stem
    if overrides:
        name += f" + {len(overrides)} override" + ("s" if len(overrides) > 1 else "")
    return (f"{name} ({m.n_layers} layers, d_model {m.d_model}, {e.num_experts} "
            f"experts top-{e.top_k}, {n.total / 1e6:.2f}M params, {n.active_per_token / 1e6:.2f}M active "
            f"per token; tp {cfg.parallel.tp} ep {cfg.parallel.ep})")


def resumed_from(cfg, start_step: int) -> dict | None:
    """The checkpoint the runs resumed (train.resume), or None for a fresh model."""
    if not start_step:
        return None
    from dmoe.checkpoint.commit import resolve_checkpoint

    return {"checkpoint": str(resolve_checkpoint(cfg.train.resume, cfg.train.run_dir)), "step": start_step}


def _measured_drop(records: list[dict]) -> float:
    routed = sum(lay["routed"] for r in records for lay in r["layers"])
    dropped = sum(lay["dropped"] for r in records for lay in r["layers"])
    return dropped / max(routed, 1)


def routing_tensor(steps: list[torch.Tensor], ep_index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[S][R, M, L, E] per recorded step -> ([S*R*M, L, E] records, [S*R*M] EP index)."""
    stacked = torch.stack(steps)  # S, R, M, L, E
    s, r, m = stacked.shape[:3]
    ep_R = torch.tensor(ep_index).view(1, r, 1).expand(s, r, m)
    return stacked.reshape(s * r * m, *stacked.shape[3:]), ep_R.reshape(-1)


def predict(cfg, rec: dict, args) -> dict:
    """Per-factor drops (train routing, eval routing) and implied all-to-all bytes."""
    e, m = cfg.moe, cfg.model
    routed, ep_idx = routing_tensor(rec["routing"][args.record_from:], rec["ep_index"])
    per_layer, overall = drop_fractions(routed, e.top_k, args.factors, e.min_capacity)
    ranks = len(rec["ep_index"])
    steps = max(1, routed.shape[0] // (ranks * cfg.train.grad_accum))
    elem = 2 if cfg.train.precision == "bf16" else 4
    a2a = []  # per rank per step: dispatch + combine, forward + backward
    for f in args.factors:
        kept = kept_rows(routed, e.top_k, f, e.min_capacity)
        rows = offrank_rows(kept, ep_idx, cfg.parallel.ep).sum().item()
        a2a.append(rows * m.d_model * elem * 4 / (steps * ranks))
    ev = torch.tensor(rec["eval_routing"]).flatten(0, 1) if rec["eval_routing"] else None
    eval_factor = e.eval_capacity_factor
    eval_drop = drop_fractions(ev, e.top_k, [eval_factor], e.min_capacity)[1][0].item() if ev is not None else None
    eval_grid = drop_fractions(ev, e.top_k, args.factors, e.min_capacity)[1].tolist() if ev is not None else None
    return {"factors": args.factors, "drop_per_layer": per_layer.tolist(), "drop": overall.tolist(),
            "a2a_bytes_per_step": a2a, "eval_factor": eval_factor, "eval_drop": eval_drop,
            "eval_drop_grid": eval_grid, "records": int(routed.shape[0]), "steps": steps,
            "recommended": smallest_factor(args.factors, overall, args.target_drop)}


def quality_runs(cfg, info, device, engine_name: str, args, out: Path) -> dict:
    from dmoe.train.trainer import train

    results = {}
    for f in args.quality_factors:
        steps = args.quality_steps or cfg.train.steps
        c = with_factor(cfg, f, steps=steps, eval_every=steps, run_dir=str(out / f"quality_cf{f:g}"))
        summary = train(c, info, device, engine_name)
        results[f] = {"val_loss": summary["val_loss_last"], "seconds": summary["seconds"], "steps": steps}
    return results


