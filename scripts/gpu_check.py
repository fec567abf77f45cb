"""dmoe's GPU path checked in minutes on one GPU; one JSON summary (make gpu-check).

    scripts/gpu_check.sh                          # every part; gpu_check.json in runs/gpu-check
    .venv/bin/python scripts/gpu_check.py --parts moe_layer,train --out /tmp/gc

Parts (each {"status": "pass" | "fail" | "skipped", "seconds", ...details}):
  moe_layer   the MoE layer's forward + backward on the device against a CPU fp32 reference:
              local dispatcher fp32, the all-to-all dispatcher over an EP group of one rank
              (NCCL on CUDA, gloo on CPU), bf16 autocast (CUDA), torch._grouped_mm; host
              syncs counted (dmoe's counter; torch.cuda.set_sync_debug_mode on CUDA)
  train       a one-rank training run (bf16 on CUDA; 20 steps, fewer on CPU) that saves a
              checkpoint, then a resume from it that trains on
  deepspeed   deepspeed --num_gpus 1 launch/train.py for 20 steps          (CUDA only)
  profile     dmoe profile (CUDA events, NVML counters)                    (CUDA only)
  bench       bench/moe_layer.py --device cuda --quick against DeepSpeed   (CUDA only)
Without a GPU the CUDA-only parts are "skipped" with reason "no GPU" and the others run on
the CPU (what CI runs: tests/system/test_gpu_check.py). Exit status 0 when nothing failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PARTS = ("moe_layer", "train", "deepspeed", "profile", "bench")
CUDA_ONLY = {"deepspeed", "profile", "bench"}
TINY = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=2", "--model.seq_len=64",
        "--model.ffn_dim=128", "--moe.num_experts=4", "--moe.expert_ffn_dim=64", "--moe.every=1",
        "--train.micro_batch_size=8", "--train.warmup_steps=1", "--train.log_every=5",
        "--train.eval_every=10", "--train.eval_batches=1", "--train.lr=0.01", "--data.max_corpus_mb=0.5"]


# ---------------------------------------------------------------- moe_layer

def _layer_case(name: str, device: torch.device, group, impl: str, autocast: bool, tol: float) -> dict:
    from dmoe.moe.dispatcher import CapacitySettings
    from dmoe.moe.layer import MoELayer
    from dmoe.parallel.expert_parallel.apply import shard_moe_layer

    D, E, K, F, T = 64, 8, 2, 128, 256
    torch.manual_seed(0)
    ref = MoELayer(D, E, K, F, CapacitySettings(None, None, 0, "position"), experts_impl="fused")
    x = torch.randn(2, T // 2, D)
    layer = MoELayer(D, E, K, F, CapacitySettings(None, None, 0, "position"), experts_impl=impl)
    layer.load_state_dict(ref.state_dict())
    layer.to(device)
    if group is not None:
        shard_moe_layer(layer, group)

    def run(mod, inp, use_autocast):
        inp = inp.clone().requires_grad_()
        ctx = (torch.autocast(inp.device.type, dtype=torch.bfloat16) if use_autocast
               else torch.autocast(inp.device.type, enabled=False))
        with ctx:
            y, _ = mod(inp)
        y.float().square().mean().backward()
        return y.float(), inp.grad, mod.experts.w1.grad, mod.router.gate.weight.grad

    y_ref, *g_ref = run(ref, x, False)
    reads = [0]  # Tensor.tolist() calls during the forward + backward: dmoe's host syncs
    tolist = torch.Tensor.tolist

    def counted_tolist(self, *args, **kwargs):
        reads[0] += 1
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counted_tolist
    cuda_syncs = None
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = run(layer, x.to(device), autocast)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
        else:
            out = run(layer, x.to(device), autocast)
    finally:
        torch.Tensor.tolist = tolist
    dmoe_syncs = reads[0]
    errs = {}
    for key, got, want in zip(("y", "x.grad", "w1.grad", "gate.grad"), out, (y_ref, *g_ref)):
        got, want = got.detach().float().cpu(), want.detach().float()
        errs[key] = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
    resolved = layer.experts.resolve_impl(x.reshape(-1, D).to(device), [T * K // E] * E,
                                          torch.bfloat16 if autocast else torch.float32)
    ok = all(e <= tol for e in errs.values()) and dmoe_syncs == 1
    return {"case": name, "ok": ok, "max_rel_err": errs, "tol": tol, "impl": impl,
            "impl_resolved": resolved, "dmoe_host_syncs": dmoe_syncs, "expected_host_syncs": 1,
            "cuda_sync_debug_events": cuda_syncs}


def part_moe_layer(device: torch.device, out_dir: Path, quick: bool) -> dict:
    import torch.distributed as dist

    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 cases compare at 1e-4
    store = dist.FileStore(str(out_dir / "pg_store"), 1)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=0, world_size=1)
    try:
        ep1 = dist.new_group([0])
        cases = [("local_fp32", None, "auto", False, 1e-4),
                 ("a2a_ep1_fp32", ep1, "auto", False, 1e-4),
                 ("grouped_mm_fp32", None, "torch_grouped_mm", False, 1e-4)]
        if cuda:
            cases += [("local_bf16_autocast", None, "auto", True, 5e-2),
                      ("a2a_ep1_bf16_autocast", ep1, "auto", True, 5e-2),
                      ("grouped_mm_bf16_autocast", None, "torch_grouped_mm", True, 5e-2)]
        results = []
        for case in cases:
            try:
                results.append(_layer_case(case[0], device, *case[1:]))
            except Exception:
                results.append({"case": case[0], "ok": False, "error": traceback.format_exc()[-2000:]})
        skipped = [] if cuda else ["bf16 autocast and the NCCL group: no GPU"]
        return {"status": "pass" if all(r["ok"] for r in results) else "fail", "cases": results,
                "not_run": skipped}
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- runs in subprocesses

def _run(cmd: list[str], log: Path, timeout: int, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, DMOE_NO_PROGRESS="1", PYTHONUNBUFFERED="1", COLUMNS="200")
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(env_extra or {})
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = 124, f"timed out after {timeout}s\n{err.stdout or ''}{err.stderr or ''}"
    log.write_text(text if isinstance(text, str) else str(text))
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1), "log": str(log),
            "tail": text[-1500:] if rc else ""}


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _train_losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if r.get("kind") == "train" and "loss" in r]


def part_train(device: torch.device, out_dir: Path, quick: bool) -> dict:
    cuda = device.type == "cuda"
    steps = 20 if cuda else 6
    run_dir, data_dir = out_dir / "train_run", out_dir / "data"
    common = [sys.executable, "launch/train.py", *TINY, f"--data.data_dir={data_dir}",
              f"--train.run_dir={run_dir}", f"--train.precision={'bf16' if cuda else 'fp32'}",
              f"--train.save_every={steps // 2}", "--train.log_every=2"]
    first = _run([*common, f"--train.steps={steps}", "--train.overwrite=true"],
                 out_dir / "train.log", 600)
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if run_dir.exists() else []
    losses = _train_losses(run_dir)
    resume = _run([*common, f"--train.steps={steps + 4}", "--train.resume=auto"],
                  out_dir / "train_resume.log", 600)
    resume_log = (out_dir / "train_resume.log").read_text()
    after = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if run_dir.exists() else []
    resumed = "resumed from" in resume_log and f"step_{steps + 4:06d}" in after
    ok = (first["rc"] == 0 and resume["rc"] == 0 and bool(saved) and resumed and len(losses) >= 2
          and all(v == v for v in losses) and losses[-1] < losses[0]
          and _summary(run_dir).get("world_size") == 1)
    return {"status": "pass" if ok else "fail", "steps": steps,
            "precision": "bf16" if cuda else "fp32", "checkpoints": saved, "train_losses": losses,
            "resumed": resumed, "checkpoints_after_resume": after, "runs": [first, resume]}


def part_deepspeed(device: torch.device, out_dir: Path, quick: bool) -> dict:
    run_dir = out_dir / "ds_run"
    r = _run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", "29541",
              "launch/train.py", *TINY, f"--data.data_dir={out_dir / 'data'}", f"--train.run_dir={run_dir}",
              "--train.steps=20", "--train.precision=bf16", "--train.engine=deepspeed",
              "--train.overwrite=true"], out_dir / "deepspeed.log", 600)
    s = _summary(run_dir)
    return {"status": "pass" if r["rc"] == 0 and s.get("engine") == "deepspeed" else "fail",
            "summary": s, "run": r}


def part_profile(device: torch.device, out_dir: Path, quick: bool) -> dict:
    prof = out_dir / "profile"
    r = _run([sys.executable, "-m", "dmoe.cli", "profile", "--steps", "5", "--warmup", "2",
              "--out", str(prof), *TINY, f"--data.data_dir={out_dir / 'data'}",
              f"--train.run_dir={out_dir / 'profile_run'}"], out_dir / "profile.log", 600)
    text = (out_dir / "profile.log").read_text()
    gpu_line = next((ln.strip() for ln in text.splitlines() if "GPU" in ln and "cuda:" in ln), None)
    ok = r["rc"] == 0 and (prof / "profile.jsonl").exists()
    return {"status": "pass" if ok else "fail", "nvml": gpu_line, "run": r}


def part_bench(device: torch.device, out_dir: Path, quick: bool) -> dict:
    help_text = subprocess.run([sys.executable, "bench/moe_layer.py", "--help"], cwd=REPO,
                               capture_output=True, text=True).stdout
    if "--device" not in help_text:
        return {"status": "skipped", "reason": "bench/moe_layer.py has no --device option yet"}
    r = _run([sys.executable, "bench/moe_layer.py", "--device", "cuda", "--quick"],
             out_dir / "bench.log", 600)
    return {"status": "pass" if r["rc"] == 0 else "fail", "run": r}


# ---------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu-check"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    env = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
           "nccl": torch.distributed.is_nccl_available()}
    results, t_all = {}, time.time()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for name in parts:
            t0 = time.time()
            if name in CUDA_ONLY and not cuda:
                results[name] = {"status": "skipped", "reason": "no GPU"}
            else:
                try:
                    results[name] = globals()[f"part_{name}"](device, Path(tmp) if name == "moe_layer" else out_dir,
                                                              args.quick)
                except Exception:
                    results[name] = {"status": "fail", "error": traceback.format_exc()[-3000:]}
            results[name]["seconds"] = round(time.time() - t0, 1)
            print(f"gpu-check {name}: {results[name]['status']} ({results[name]['seconds']} s)"
                  + (f" - {results[name]['reason']}" if "reason" in results[name] else ""), flush=True)
    failed = [n for n, r in results.items() if r["status"] == "fail"]
    summary = {"ok": not failed, "failed": failed, "env": env, "parts": results,
               "seconds": round(time.time() - t_all, 1)}
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"gpu-check: {'ok' if not failed else 'FAILED ' + ','.join(failed)}; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
