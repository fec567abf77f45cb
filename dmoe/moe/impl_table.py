"""What impl="auto" runs on CPU: the formulation that measured fastest at the nearest shape.

A shape is (rows per expert, local experts, d_model, expert ffn dim). The table holds, per
measured shape, the fastest rep (ms, one forward + backward of the whole MoE layer) of each
formulation. `nearest_cpu_impl` keeps the entries of the nearest (d_model, d_ff) bucket,
takes among them the one nearest in rows per expert and local experts (log2 distances
summed) and returns its fastest formulation among those allowed (torch._grouped_mm takes
only fp32/bf16 and 16-byte aligned widths). Measured with

    bench/moe_layer.py --tokens 1024 4096 16384 --experts 8 32 128 --k 2 --cf dropless \\
        --impls fused,loop,torch_grouped_mm --no-deepspeed --no-torchtitan --no-memory \\
        --min-reps 9 [--d-ff 256]

(GELU, fp32, one thread, interleaved reps, the fastest rep of each; bench/README.md has
the raw lines and the spread). It is one machine's ranking: re-measure on another CPU and
replace the table (MEASURED_ON says where it came from).
"""
from __future__ import annotations

import math

MEASURED_ON = ("2026-11-30, Intel Xeon (AVX-512) 2 cores shared with other jobs, torch "
               "2.13.0+cpu, one thread, fp32 GELU, caching malloc; fastest of >= 9 reps")
IMPL_ORDER = ("fused", "loop", "torch_grouped_mm")
# (rows per expert, local experts, d_model, d_ff) -> fastest-rep ms of IMPL_ORDER. The
# comment: tokens (k=2, dropless), and how far the runner-up is behind the fastest. Load
# average 1.6-2.2 while it ran; two runs of one path differed by up to ~2-6% at this load,
# so entries within ~2% are ties that this machine could not rank (bench/README.md).
CPU_TABLE: dict[tuple[int, int, int, int], tuple[float, float, float]] = {
    (16, 128, 256, 1024): (190.2, 153.4, 150.3),  # T=1024, 2.1%
    (64, 32, 256, 1024): (86.5, 81.0, 76.9),  # T=1024, 5.4%
    (256, 8, 256, 1024): (60.4, 59.2, 58.5),  # T=1024, 1.2%
    (64, 128, 256, 1024): (334.4, 297.2, 290.8),  # T=4096, 2.2%
    (256, 32, 256, 1024): (211.0, 207.2, 204.4),  # T=4096, 1.4%
    (1024, 8, 256, 1024): (187.0, 189.5, 190.1),  # T=4096, 1.4%
    (256, 128, 256, 1024): (870.4, 843.2, 844.4),  # T=16384, 0.1%
    (1024, 32, 256, 1024): (751.3, 768.1, 771.8),  # T=16384, 2.2%
    (4096, 8, 256, 1024): (737.0, 740.3, 750.6),  # T=16384, 0.4%
    (16, 128, 256, 256): (62.5, 45.7, 44.1),  # T=1024, 3.7%
    (64, 32, 256, 256): (27.5, 23.3, 23.3),  # T=1024, 0.2%
    (256, 8, 256, 256): (21.1, 19.9, 19.1),  # T=1024, 4.3%
    (64, 128, 256, 256): (110.8, 90.5, 88.2),  # T=4096, 2.6%
    (256, 32, 256, 256): (74.9, 67.1, 67.6),  # T=4096, 0.7%
    (1024, 8, 256, 256): (65.7, 64.8, 63.4),  # T=4096, 2.3%
}


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return sum(abs(math.log2(max(x, 1)) - math.log2(max(y, 1))) for x, y in zip(a, b))


def nearest_cpu_impl(rows_per_expert: float, num_local: int, d_model: int, d_ff: int,
                     allowed: tuple[str, ...] = IMPL_ORDER) -> str:
    """The fastest of `allowed` at the measured shape nearest to this one (see the module
    docstring; on a tie in distance, the first listed)."""
    bucket = min(_distance((d_model, d_ff), k[2:]) for k in CPU_TABLE)
    same = [k for k in CPU_TABLE if _distance((d_model, d_ff), k[2:]) == bucket]
    key = min(same, key=lambda k: _distance((rows_per_expert, num_local), k[:2]))
    times = dict(zip(IMPL_ORDER, CPU_TABLE[key]))
    return min(allowed, key=lambda impl: times[impl])
