"""Speed and memory figures of the training log: step time, tokens/s, MFU, all-to-all time,
peak memory.

    peak = peak_flops_per_rank(cfg.train.peak_tflops, device)   # measured once when 0
    mfu(flops_per_token, tokens_per_s, world_size, peak)        # achieved / peak, per rank

MFU (model FLOPs utilisation, PaLM's definition): the model's training FLOPs per token
(forward + backward, dmoe.model.flops.train_flops_per_token: active experts only, no
recomputation) times the global tokens/s, shared over the world's ranks, divided by one
rank's peak FLOP/s. The peak is `train.peak_tflops` (the hardware's datasheet figure, e.g.
989 for an H100's dense bf16) or, when 0, a short fp32 matmul measured at start on this
device (the achievable peak: MFU against it reads higher than against a datasheet).

All-to-all time comes from a CommRecorder (dmoe.parallel.comm_trace) that the trainer makes
active on log steps only; other steps pay nothing. Communication: `agree` all-reduces the
log step's per-rank figures over the world (sum and max), on log steps only.
"""
from __future__ import annotations

import logging
import resource
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def mfu(flops_per_token: float, tokens_per_s: float, world_size: int, peak_flops: float) -> float:
    """Achieved model FLOP/s per rank over one rank's peak FLOP/s (0 without a peak)."""
    if peak_flops <= 0:
        return 0.0
    return flops_per_token * tokens_per_s / world_size / peak_flops


def measure_matmul_flops(device: torch.device, seconds: float = 0.25) -> float:
    """FLOP/s of back-to-back square fp32 matmuls on `device` (this rank's threads)."""
    n = 4096 if device.type == "cuda" else 512
    # own generator: the training RNG (restored on resume) must not move
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(n, n, device=device, generator=g)
    b = torch.rand(n, n, device=device, generator=g)
    torch.mm(a, b)  # warm-up: kernels, allocator
    iters, elapsed = 0, 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    while iters < 3 or elapsed < seconds:
        torch.mm(a, b)
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    return 2 * n**3 * iters / elapsed


def peak_flops_per_rank(peak_tflops: float, device: torch.device) -> float:
    """train.peak_tflops in FLOP/s, or (when 0) the measured fp32 matmul peak, averaged over
    the world's ranks so that every rank divides by the same figure. Collective when 0
    (one all-reduce over the world)."""
    if peak_tflops > 0:
        log.info("MFU peak: train.peak_tflops = %g TFLOP/s per rank", peak_tflops)
        return peak_tflops * 1e12
    measured = torch.tensor([measure_matmul_flops(device)], dtype=torch.float64, device=device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(measured)
    peak = float(measured) / world
    log.info("MFU peak: measured fp32 matmul %.1f GFLOP/s per rank (mean of %d ranks; set "
             "train.peak_tflops to the hardware's peak for a datasheet MFU)", peak / 1e9, world)
    return peak


def peak_memory(device: torch.device) -> tuple[str, float]:
    """(metric name, MiB): CUDA's peak allocated bytes on GPU, the process's peak resident
    set size (getrusage ru_maxrss, KiB on Linux) on CPU."""
    if device.type == "cuda":
        return "peak_cuda_alloc_mib", torch.cuda.max_memory_allocated(device) / 2**20
    return "peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def a2a_seconds(events, num_layers: int) -> tuple[float, list[float]]:
    """All-to-all seconds of one recorded step on this rank: in total and per MoE layer."""
    a2a = [e for e in events if e.op == "all_to_all"]
    per_layer = [sum(e.seconds for e in a2a if e.layer == i) for i in range(num_layers)]
    return sum(e.seconds for e in a2a), per_layer


def agree(values: list[float], device: torch.device) -> tuple[list[float], list[float]]:
    """(mean, max) of each figure over the world's ranks. Collective: two all-reduces."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return t.tolist(), t.tolist()
    high = t.clone()
    dist.all_reduce(t)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return (t / world).tolist(), high.tolist()
