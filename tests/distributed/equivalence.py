"""Shared pieces of the layout-equivalence tests: a tiny config, the batches every DP rank
sees, full (unsharded) parameters and gradients, and the single-process reference run."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dmoe.config import load_config
from dmoe.model.transformer import MoETransformer
from dmoe.parallel.param_roles import is_expert
from dmoe.train.engines import param_groups

from .gather import gather_full_tensors

SEED, STEPS, MICRO, SEQ, VOCAB = 7, 3, 2, 8, 32
# (world size, tp, ep): dp2; dp2 ep2; tp2; dp4 ep2; dp4 ep4; dp2 tp2 ep2
LAYOUTS = [(2, 1, 1), (2, 1, 2), (2, 2, 1), (4, 1, 2), (4, 1, 4), (4, 2, 2)]

# The DeepSeek-style options on the tiny model (deepseek-tiny's architecture): sigmoid
# scores, loss-free bias, sequence-wise loss, a shared expert, group-limited routing, a
# dense first block, RMSNorm, SwiGLU.
DEEPSEEK = ["--moe.score_func=sigmoid", "--moe.bias_update_rate=0.05", "--moe.seq_aux_loss_coef=0.1",
            "--moe.num_shared_experts=1", "--moe.num_groups=2", "--moe.topk_groups=1",
            "--moe.every=1", "--moe.first_dense_layers=1", "--moe.activation=swiglu",
            "--model.norm=rmsnorm", "--model.mlp_activation=swiglu", "--model.n_kv_heads=2",
            "--moe.route_scale=2.0", "--moe.num_experts=8", "--parallel.a2a_dedup=true"]


def tiny_config(tp: int, ep: int, extra: list[str] = ()):
    # TP routes per token slice: capacity and the load-balance loss then differ from a
    # single process on the whole micro-batch, so TP layouts run dropless, aux coef 0.
    moe = ["--moe.capacity_factor=null", "--moe.aux_loss_coef=0"] if tp > 1 else \
          ["--moe.capacity_factor=1.0", "--moe.min_capacity=0"]
    return load_config(None, [
        "--model.vocab_size=32", "--model.d_model=16", "--model.n_layers=2", "--model.n_heads=4",
        f"--model.seq_len={SEQ}", "--model.ffn_dim=32", "--moe.num_experts=4", "--moe.top_k=2",
        "--moe.every=2", "--moe.expert_ffn_dim=16", f"--parallel.tp={tp}", f"--parallel.ep={ep}",
        f"--train.micro_batch_size={MICRO}", "--train.lr=0.01", "--train.grad_clip=0.5",
        "--train.weight_decay=0.1", *moe, *extra,
    ])


def batch(step: int, dp_rank: int):
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def build_full_model(cfg):
    torch.manual_seed(SEED)
    model = MoETransformer(cfg).double()
    for module in model.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float64
    return model


def full_tensors(model, groups, grads: bool) -> dict:
    """Every parameter (or grad) unsharded: TP shards gathered, then expert shards over EP."""
    out = gather_full_tensors(model, groups.tp, grads=grads)
    if grads:  # parameters without gradients (a router's expert bias) are compared as params
        out = {name: g for name, g in out.items() if g is not None}
    if groups.size("ep") > 1:
        for name, p in model.named_parameters():
            if is_expert(p):
                local = out[name].contiguous()
                parts = [torch.empty_like(local) for _ in range(groups.size("ep"))]
                dist.all_gather(parts, local, group=groups.ep)
                out[name] = torch.cat(parts, 0)
    return out


def reference_run(cfg, dp: int):
    """Single process, same seed, the same global batch (the DP ranks' micro-batches)."""
    model = build_full_model(cfg)
    opt = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k in ("params", "weight_decay")}
         for g in param_groups(model, cfg.train.weight_decay)],
        lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    losses, grads = [], []
    for step in range(STEPS):
        opt.zero_grad()
        outputs = [model(*batch(step, d)) for d in range(dp)]
        loss = sum(out.loss for out in outputs) / dp
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        for g in opt.param_groups:
            g["lr"] = cfg.train.lr
        opt.step()
        if cfg.moe.bias_update_rate:
            _loss_free_update(model, outputs, cfg.moe.bias_update_rate)
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def _loss_free_update(model, outputs, rate):
    """DeepSeek-V3's rule written out: per expert, +rate if its routed count over the whole
    global batch is below the mean count, -rate if above."""
    routers = [m for n, m in model.named_modules() if n.endswith(".router")]
    for i, router in enumerate(routers):
        counts = [sum(int(out.moe_stats[i].routed_E[e]) for out in outputs)
                  for e in range(router.num_experts)]
        mean = sum(counts) / len(counts)
        for e, c in enumerate(counts):
            router.expert_bias[e] += rate if c < mean else -rate if c > mean else 0.0
