"""Outputs of `dmoe tune-capacity`: console table, capacity.yaml, tune.json, report.html."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from . import html_report as H

log = logging.getLogger(__name__)


def tune_warnings(res: dict, target: float) -> list[str]:
    """What the recommendation cannot show: it sits at an edge of the factor grid (the best
    factor may lie outside it), or a layer's own drop misses the target at that factor."""
    factors, rec, out = res["factors"], res["recommended"], []
    if rec is None:
        out.append(f"no factor in the grid meets the target drop {target:.2%} (overall drop "
                   f"{res['drop'][-1]:.2%} at the largest, {factors[-1]:g}): extend --factors upward "
                   "or train dropless (moe.capacity_factor=0)")
        return out
    i = factors.index(rec)
    if len(factors) > 1 and i == len(factors) - 1:
        out.append(f"the recommended factor {rec:g} is the largest in the grid: only it meets the "
                   f"target; add factors between {factors[-2]:g} and {rec:g} to find a smaller one")
    if i == 0:
        out.append(f"the recommended factor {rec:g} is the smallest in the grid: a smaller factor "
                   "may meet the target too; extend --factors downward")
    for layer, drop in enumerate(res["drop_per_layer"][i]):
        if drop > target:
            out.append(f"moe{layer} drops {drop:.2%} at factor {rec:g}, above the target {target:.2%} "
                       "(the overall drop meets it)")
    return out


def table_rows(res: dict) -> list[list[str]]:
    """factor | drop per layer | drop | eval drop | step ms | tokens/s | a2a MB/step/rank."""
    rows = []
    for i, f in enumerate(res["factors"]):
        timed = res["timed"].get(f)
        layers = " ".join(f"{d[i]:.2%}" for d in _by_layer(res))
        eval_grid = res.get("eval_drop_grid")
        rows.append([f"{f:g}", layers, f"{res['drop'][i]:.2%}",
                     f"{eval_grid[i]:.2%}" if eval_grid else "-",
                     f"{timed['step_s'] * 1e3:.1f}" if timed else "-",
                     f"{timed['tokens_per_s']:,.0f}" if timed else "-",
                     f"{res['a2a_bytes_per_step'][i] / 1e6:.3f}",
                     "<- recommended" if f == res["recommended"] else ""])
    return rows


HEADERS = ["factor", "drop per layer", "drop", "eval drop", "step ms", "tokens/s", "a2a MB/step/rank", ""]


def _by_layer(res: dict) -> list[list[float]]:
    """[L][F] from [F][L]."""
    return [list(col) for col in zip(*res["drop_per_layer"])]


def override_yaml(res: dict, target: float) -> str:
    f = res["recommended"]
    head = (f"# dmoe tune-capacity: smallest factor with overall drop <= {target:g} over "
            f"{res['records']} recorded forwards (recorded at {res['recorded_factor']})\n")
    if f is None:
        return head + f"# no factor in {res['factors']} meets the target; try larger factors or dropless (0)\n"
    return head + f"moe:\n  capacity_factor: {f:g}\n"


def write_outputs(res: dict, cfg, args, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "capacity.yaml").write_text(override_yaml(res, args.target_drop))
    if res["recommended"] is not None:  # the whole resolved config with the factor: a safe --config
        from dmoe.config import save_config

        tuned = copy.deepcopy(cfg)
        tuned.moe.capacity_factor = res["recommended"]
        save_config(tuned, out / "config_tuned.yaml")
    console = Console(width=None if Console().is_terminal else 140)
    table = Table(title=f"capacity factors (target drop {args.target_drop:.2%})")
    for h in HEADERS:
        table.add_column(h, justify="right")
    for row in table_rows(res):
        table.add_row(*row)
    console.print(table)
    if res.get("eval_drop") is not None:
        console.print(f"eval: drop {res['eval_drop']:.2%} at moe.eval_capacity_factor {res['eval_factor']}")
    for f, q in (res.get("quality") or {}).items():
        console.print(f"quality: factor {f:g}: val loss {q['val_loss']:.4f} after {q['steps']} steps")
    rec = res["recommended"]
    console.print(f"recommended moe.capacity_factor: {rec if rec is not None else 'none in grid'}; "
                  f"wrote {out}/capacity.yaml (the override), config_tuned.yaml (whole config: "
                  f"--config {out}/config_tuned.yaml), report.html, tune.json")
    for line in tune_warnings(res, args.target_drop):
        log.warning("tune-capacity: %s", line)
    (out / "report.html").write_text(H.page("dmoe tune-capacity", sections(res, args),
                                            f"{res.get('model', '')}; recorded {res['records']} forwards "
                                            f"at factor {res['recorded_factor']}"))


def sections(res: dict, args) -> list[str]:
    xs = res["factors"]
    drops = {f"moe{i}": d for i, d in enumerate(_by_layer(res))}
    drops["overall"] = res["drop"]
    if res.get("eval_drop_grid"):
        drops["eval"] = res["eval_drop_grid"]
    rec = res["recommended"]
    figs = [H.lines(xs, drops, "predicted drop fraction vs capacity factor", "capacity factor",
                    "dropped / routed", marker_x=rec,
                    marker_label=f"recommended {rec:g}" if rec is not None else "",
                    hline=args.target_drop, hline_label=f"target {args.target_drop:.2%}",
                    bold=("overall", "eval"), percent=True)]
    timed = sorted(res["timed"].items())
    if len(timed) > 1:
        figs.append(H.lines([f for f, _ in timed], {"tokens/s": [t["tokens_per_s"] for _, t in timed]},
                            "measured throughput vs capacity factor", "capacity factor", "tokens/s",
                            marker_x=rec))
    figs.append(H.lines(xs, {"a2a MB/step/rank": [b / 1e6 for b in res["a2a_bytes_per_step"]]},
                        "implied all-to-all volume", "capacity factor", "MB", marker_x=rec))
    highlight = xs.index(rec) if rec is not None else None
    parts = [H.section("Factors", H.warnings(tune_warnings(res, args.target_drop)),
                       H.table(HEADERS, table_rows(res), highlight=highlight),
                       f"<p>recommended: <b>{H.esc(_factor(res['recommended']))}</b> (target {args.target_drop:.2%}); "
                       f"eval drop {H.esc(_pct(res.get('eval_drop')))} at eval factor {H.esc(res['eval_factor'])}</p>"),
             H.section("Curves", H.plots(*figs))]
    if timed:
        parts.append(H.section(f"Timed runs: {timed_subject(res)}", H.table(
            ["factor", "step ms", "tokens/s", "measured drop"],
            [[f"{f:g}", f"{t['step_s'] * 1e3:.1f}", f"{t['tokens_per_s']:,.0f}", _pct(t["measured_drop"])]
             for f, t in timed])))
    if res.get("quality"):
        parts.append(H.section("Quality", H.table(["factor", "steps", "val loss"], [
            [f"{f:g}", q["steps"], f"{q['val_loss']:.4f}"] for f, q in sorted(res["quality"].items())])))
    return parts


def timed_subject(res: dict) -> str:
    """The model the timed runs measured: the config and size, fresh or resumed."""
    model = res.get("model") or "the configured model"
    resumed = res.get("resumed_from")
    if resumed:
        return f"{model}, resumed from {resumed['checkpoint']} step {resumed['step']} (measured drop)"
    return f"{model}, a fresh model (measured drop)"


def _factor(f) -> str:
    return "none in the grid" if f is None else f"{f:g}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"
