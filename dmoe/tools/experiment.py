"""`dmoe experiment btx [--steps S] [--out runs/btx] [--model.key=value ...]`: does an MoE
learn subject experts? Four models at equal training tokens (S steps of one rank's batch
each) on the multi-domain corpus (dmoe.data.multidomain), then their per-domain
validation loss and the routing analysis of the three MoEs:

    (a) moe       an MoE trained from scratch on the mix                      S steps
    (b) btx       one dense model per domain, trained in parallel (separate
                  processes), S*f/N steps each; merged (`dmoe merge`), then
                  S*(1-f) steps on the mix
    (c) upcycled  a dense model, S*f steps on the mix; upcycled (`dmoe upcycle`),
                  then S*(1-f) steps
    (d) dense     a dense model of the MoE's active size, S steps on the mix
f = --branch-fraction (0.5). The configs are configs/experiments/btx_{moe,dense,
dense_active}.yaml; dotted overrides apply to every training run (e.g. --model.d_model=128
to scale it). Every run trains on one rank (plain torch, python launch/train.py), all of a
phase at once. A run whose summary.json exists is not run again, so an interrupted
experiment continues where it stopped. Writes OUT/results.json and OUT/results.md (the
table), OUT/analysis/<run>/ (dmoe analyze-routing's outputs).

    launch/experiments/btx.sh                    # the recipe (this, with its defaults)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from dmoe.tools.help_format import HelpFormatter, summary

log = logging.getLogger("dmoe.experiment")
REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "experiments"
MOE_FLAGS = ["--moe.capacity_factor=null", "--moe.eval_capacity_factor=null"]


def _launch(config: Path, run_dir: Path, steps: int, extra: list[str]) -> subprocess.Popen | None:
    """One training run in the background (None if it finished before)."""
    if (run_dir / "summary.json").is_file():
        log.info("%s: done before, kept", run_dir.name)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config),
           f"--train.run_dir={run_dir}", f"--train.steps={steps}", *extra]
    if not any(a.startswith("--train.resume") for a in extra) and (run_dir / "checkpoints").exists():
        cmd.append("--train.overwrite=true")  # an interrupted attempt: start it again
    env = dict(os.environ, OMP_NUM_THREADS="1", DMOE_NO_PROGRESS="1")
    out = open(run_dir / "train.log", "w")
    log.info("start %s: %s steps", run_dir.name, steps)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait(procs: dict[str, subprocess.Popen | None], out: Path) -> None:
    failed = [name for name, p in procs.items() if p is not None and p.wait() != 0]
    if failed:
        tail = (out / failed[0] / "train.log").read_text()[-2000:]
        raise RuntimeError(f"training run {failed[0]} failed:\n{tail}")


def _tool(name: str, argv: list[str]) -> None:
    from dmoe.cli import COMMANDS

    if COMMANDS[name](argv) != 0:
        raise RuntimeError(f"dmoe {name} {' '.join(argv)} failed")


def run_btx(out: Path, steps: int, fraction: float, tokens_per_domain: int, extra: list[str]) -> dict:
    from dmoe.config import load_config
    from dmoe.data.multidomain import DOMAINS
    from dmoe.data.token_files import prepare

    dense, moe = CONFIGS / "btx_dense.yaml", CONFIGS / "btx_moe.yaml"
    data_cfg = load_config(dense, extra).data
    data_dir = Path(prepare(data_cfg))
    domains = json.loads((data_dir / "meta.json").read_text())["domains"]
    branch, rest = int(steps * fraction), steps - int(steps * fraction)
    t0, timings = time.time(), {}
    phase1 = {"a_moe": _launch(moe, out / "a_moe", steps, extra),
              "c0_dense_half": _launch(dense, out / "c0_dense_half", branch, extra),
              "d_dense_active": _launch(CONFIGS / "btx_dense_active.yaml", out / "d_dense_active",
                                        steps, extra)}
    for d in domains:
        phase1[f"b0_{d}"] = _launch(dense, out / f"b0_{d}", max(branch // len(domains), 1),
                                    [*extra, f"--data.domains=[{d}]",
                                     f"--data.data_dir={data_dir}-{d}"])
    _wait(phase1, out)
    timings["phase1_s"] = round(time.time() - t0, 1)
    if not (out / "b_btx_init").exists():
        # the merged config starts from the first domain model's: train it on the mix
        _tool("merge", [*(str(out / f"b0_{d}") for d in domains), str(out / "b_btx_init"),
                        "--top-k", "2", *MOE_FLAGS, "--data.domains=[]",
                        f"--data.data_dir={data_dir}"])
    if not (out / "c_upcycled_init").exists():
        _tool("upcycle", [str(out / "c0_dense_half"), str(out / "c_upcycled_init"),
                          "--num-experts", str(len(domains)), "--top-k", "2", *MOE_FLAGS])
    t1 = time.time()
    phase2 = {name: _launch(out / f"{name}_init" / "config.yaml", out / name, rest,
                            [*extra, f"--train.resume={out / f'{name}_init'}"])
              for name in ("b_btx", "c_upcycled")}
    _wait(phase2, out)
    timings["phase2_s"] = round(time.time() - t1, 1)
    runs = ["a_moe", "b_btx", "c_upcycled", "d_dense_active", "c0_dense_half",
            *(f"b0_{d}" for d in domains)]
    results = {"steps": steps, "branch_fraction": fraction, "domains": domains,
               "known_domains": list(DOMAINS), "overrides": extra, "runs": {}}
    t2 = time.time()
    for name in runs:
        results["runs"][name] = _analyze(out / name, data_dir, out / "analysis" / name,
                                         tokens_per_domain)
    timings["analysis_s"] = round(time.time() - t2, 1)
    results["timings"] = {**timings, "total_s": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
    return results


def _analyze(run_dir: Path, data_dir: Path, out: Path, tokens_per_domain: int) -> dict:
    from dmoe.analysis.report import write_outputs
    from dmoe.tools.analyze_routing import analyze_checkpoint

    result = analyze_checkpoint(str(run_dir), str(data_dir), tokens_per_domain)
    write_outputs(result, out)
    layers = result["layers"]
    mean = (lambda key, sub: round(sum(lay[key][sub] for lay in layers) / len(layers), 4)
            if layers else None)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"loss": result["loss"], "loss_mean": result["loss_mean"],
            "nmi_domain": mean("domain", "nmi"), "nmi_token": mean("token", "nmi"),
            "nmi_token_class": mean("token_class", "nmi"), "reuse": mean("reuse", "rate"),
            "reuse_chance": mean("reuse", "chance"), "train_s": summary["seconds"],
            "tokens_per_step": summary["tokens_per_step"], "steps": summary["steps"]}


LABELS = {"a_moe": "(a) MoE from scratch", "b_btx": "(b) BTX: 4 domain models merged + mix",
          "c_upcycled": "(c) dense, upcycled half way", "d_dense_active": "(d) dense, same active size",
          "c0_dense_half": "(c) before upcycling (half the tokens)"}


def results_table(results: dict) -> str:
    domains = results["domains"]
    head = ("| model | " + " | ".join(domains) + " | mean | NMI domain | NMI token | NMI class | "
            "reuse (chance) |\n|" + " --- |" * (len(domains) + 6) + "\n")
    rows = []
    for name, r in results["runs"].items():
        label = LABELS.get(name, f"domain model {name[3:]} alone")
        moe = (f"{r['nmi_domain']:.3f} | {r['nmi_token']:.3f} | {r['nmi_token_class']:.3f} | "
               f"{r['reuse']:.3f} ({r['reuse_chance']:.3f})" if r["nmi_domain"] is not None
               else "- | - | - | -")
        rows.append(f"| {label} | " + " | ".join(f"{r['loss'][d]:.3f}" for d in domains)
                    + f" | {r['loss_mean']:.3f} | {moe} |")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dmoe experiment", description=summary(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("name", choices=["btx"], help="the experiment")
    p.add_argument("--steps", type=int, default=1000, help="training steps per model (S)")
    p.add_argument("--branch-fraction", type=float, default=0.5,
                   help="f: the share of S spent before merging / upcycling")
    p.add_argument("--out", default="runs/btx", help="directory for the runs, results and analysis")
    p.add_argument("--tokens-per-domain", type=int, default=16384,
                   help="validation tokens per domain in the routing analysis")
    a, extra = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 < a.branch_fraction < 1:
        p.error("--branch-fraction must be in (0, 1)")
    try:
        results = run_btx(Path(a.out).resolve(), a.steps, a.branch_fraction, a.tokens_per_domain,
                          extra)
    except (RuntimeError, ValueError) as err:
        sys.stderr.write(f"experiment error: {err}\n")
        return 2
    sys.stdout.write(results_table(results) + f"timings: {results['timings']}\n")
    return 0
