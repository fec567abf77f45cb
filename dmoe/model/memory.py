"""Memory per rank of a training run, estimated from the config and the rank layout before
anything runs (what `dmoe train --dry-run` prints).

    est = estimate_memory(cfg, ParallelLayout(8, tp=2, ep=2), engine="deepspeed")
    est.params, est.grads, est.optimizer, est.activations   # bytes on the fullest rank

Parameters per rank are exact: a meta-device model is cut by the sharding plan
(dmoe.parallel.plan) for TP rank 0 and EP rank 0, which hold the largest shards. The rest
is a model of what each engine keeps:
- torch engine: fp32 params, fp32 grads, AdamW's two fp32 moments (8 bytes a parameter);
- DeepSpeed ZeRO 1: the moments and ZeRO's fp32 partition copy (12 bytes a parameter)
  split over the data-parallel ranks that hold the parameter (dp for dense, edp for expert
  ones); ZeRO 2 also splits the grads that way;
- activations: what backward keeps for one micro-batch (micro_batch_size x seq_len tokens),
  in the autocast dtype (bf16: 2 bytes, fp32: 4; train.precision=auto resolved as the run
  resolves it, from the device facts: bf16 on a GPU that has it), counted tensor by tensor per block
  (norm outputs, qkv, rotated q/k, attention output, FFN hidden, the MoE rows at top_k per
  token, router scores in fp32) plus the fp32 logits; activation checkpointing keeps each
  block's input and one block's worth. Communication buffers, the allocator's slack and
  the CUDA context are not counted: expect the measured peak to be higher.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dmoe.config import Config
from dmoe.model.flops import vocab_size
from dmoe.parallel.layout import ParallelLayout
from dmoe.startup.precision import DeviceFacts, choose_precision, device_facts

FP32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    dense_params: int  # this rank's counts
    expert_params: int
    params: int  # bytes from here on
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def params_per_rank(cfg: Config, layout: ParallelLayout) -> tuple[int, int]:
    """(dense, expert) parameters on TP rank 0 / EP rank 0, from the sharding plan."""
    from dmoe.model.transformer import MoETransformer
    from dmoe.parallel.plan import EP, sharding_plan

    with torch.device("meta"):
        model = MoETransformer(_with_vocab(cfg))
    plan = sharding_plan(model)
    dense = expert = 0
    for name, p in model.named_parameters():
        rule = plan.get(name)
        n = p.numel()
        if rule is not None:
            shards = layout.ep if rule.kind == EP else layout.tp
            n = n // p.shape[rule.dim] * len(rule.index(p.shape[rule.dim], 0, shards))
        if rule is not None and rule.kind == EP:
            expert += n
        else:
            dense += n
    return dense, expert


def _with_vocab(cfg: Config) -> Config:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size = vocab_size(cfg)
    return cfg


def activation_bytes(cfg: Config, tp: int = 1, facts: DeviceFacts | None = None,
                     ep: int = 1) -> int:
    """What backward keeps for one micro-batch on one rank (see the module doc); `facts`
    (this machine's when None) resolve train.precision=auto."""
    from dmoe.model.transformer import is_moe_block

    m, e, t = cfg.model, cfg.moe, cfg.train
    T, D = t.micro_batch_size * m.seq_len, m.d_model
    H, G, R = m.n_heads, m.n_kv_heads or m.n_heads, m.head_dim or m.d_model // m.n_heads
    precision = choose_precision(t.precision, facts or device_facts())[0]
    b = 2 if precision == "bf16" else FP32
    attn = 4 * T * D + T * (H + 2 * G) * R // tp + T * (H + G) * R // tp + T * H * R // tp
    attn += 2 * T * H * R // tp if G != H else 0  # k, v repeated for grouped-query heads

    def mlp(width: int, activation: str, rows: int) -> int:  # fc1 out, activation(s), fc2 out
        return rows * width * (3 if activation == "swiglu" else 2) // tp + rows * D

    blocks = []
    for i in range(m.n_layers):
        if not is_moe_block(cfg, i):
            blocks.append(b * (attn + mlp(m.ffn_dim, m.mlp_activation, T)))
            continue
        rows = T * e.top_k
        # the expert outputs, the received rows under EP (the local path gathers them from
        # x and keeps x), and the pre-activation h only (act(h) is recomputed in backward:
        # dmoe/moe/act_mm.py, gather_mm.py, routed_mlp.py)
        experts = (2 if ep > 1 else 1) * rows * D + (
            0 if t.activation_checkpointing == "experts"
            else rows * e.expert_ffn_dim * (2 if e.activation == "swiglu" else 1))
        shared = 0
        if e.num_shared_experts:
            width = e.num_shared_experts * (e.shared_expert_ffn_dim or e.expert_ffn_dim)
            shared = mlp(width, e.activation, T)
        blocks.append(b * (attn + experts + shared + T * D) + FP32 * 2 * T * e.num_experts)
    if t.activation_checkpointing == "block":
        blocks = [b * T * D] * m.n_layers + [max(blocks)]
    logits = FP32 * 2 * T * vocab_size(cfg) // tp  # the logits and their softmax, in fp32
    return sum(blocks) + logits


def estimate_memory(cfg: Config, layout: ParallelLayout, engine: str,
                    facts: DeviceFacts | None = None) -> MemoryEstimate:
    """Bytes per rank for `engine` ("torch" or "deepspeed"; see the module doc) on the device
    `facts` describe (this machine's when None)."""
    dense, expert = params_per_rank(cfg, layout)
    n = dense + expert
    if engine == "deepspeed" and cfg.train.zero_stage >= 1:
        split = dense / layout.dp + expert / layout.edp
        optimizer = int(3 * FP32 * split)  # fp32 partition copy + two moments
        grads = int(FP32 * (split if cfg.train.zero_stage >= 2 else n))
    else:  # the torch engine, or DeepSpeed's ZeRO 0 (its torch optimizer)
        optimizer, grads = 2 * FP32 * n, FP32 * n
    activations = activation_bytes(cfg, layout.tp, facts, layout.ep)
    return MemoryEstimate(dense, expert, FP32 * n, grads, optimizer, activations)
