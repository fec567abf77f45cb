"""Apply tensor parallelism to a built MoETransformer, in place, following the sharding plan.

    apply_tensor_parallel(model, tp_group)

Every "tp" rule of dmoe.parallel.plan swaps the module that owns the parameter for its
TP version (Megatron's layout; one all-reduce per sub-layer forward, one per backward):
    rule on an nn.Embedding      VocabParallelEmbedding   (rows split by vocab)
    rule dim 0 on an nn.Linear   ColumnParallelLinear     (qkv: whole heads, q/k/v together)
    rule dim 1 on an nn.Linear   RowParallelLinear        (the same heads' input columns)
    lm_head                      ColumnParallelLinear (vocab-sharded logits; tied to tok_emb
                                 if it was)
    model.criterion              VocabParallelCrossEntropy (the logits are never gathered)
    q_norm, k_norm (qk_norm)     replicated, marked tp_partial: each rank normed its own heads
    MoE layers                   token-sliced: every TP rank holds the same tokens; it routes
                                 only its 1/tp slice, and the outputs are all-gathered
                                 (experts are not TP-sharded, so under EP each TP rank sends
                                 1/tp of the tokens)
LayerNorms, learned positions and the MoE router stay replicated. Parameter names (and so
checkpoints) stay those of the plain model. Roles for the gradient reduction are marked
through dmoe.parallel.param_roles: TP shards `tp_sharded`, MoE params `tp_partial`.

MoE semantics under token slicing (as with any split of the batch): capacity is computed
per slice; the reported routed/kept counts are summed over TP; the z-loss equals the
full-batch one; the load-balance loss is the mean of the slices' losses.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from dmoe.model.transformer import Attention
from dmoe.moe.layer import MoELayer, MoEStats
from dmoe.parallel import param_roles
from dmoe.parallel.plan import TP, ShardRule, sharding_plan

from .collectives import (
    gather_first_dim,
    group_rank,
    group_size,
    reduce_from_region,
    split_first_dim,
)
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
)

log = logging.getLogger(__name__)


def apply_tensor_parallel(model: nn.Module, tp_group: dist.ProcessGroup | None) -> nn.Module:
    """Swap the model's planned linears, embedding, head and criterion for TP versions.

    No communication."""
    tp, rank = group_size(tp_group), group_rank(tp_group)
    tied = model.lm_head.weight is model.tok_emb.weight
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            _check_heads(name, module, tp)
            for norm in (module.q_norm, module.k_norm):
                for param in norm.parameters() if norm is not None else ():
                    param_roles.mark_tp_partial(param)  # each TP rank normed its own heads
    for name, rule in sharding_plan(model).items():
        if rule.kind == TP and name.endswith(".weight"):
            _swap(model, name.removesuffix(".weight"), rule, tp_group)
    if tied:
        model.lm_head = ColumnParallelLinear(model.lm_head, tp_group)
        model.lm_head.weight = model.tok_emb.weight  # same vocab rows on this rank
    for module in model.modules():
        if isinstance(module, MoELayer):
            slice_moe_tokens(module, tp_group)
    model.criterion = VocabParallelCrossEntropy(tp_group, model.tok_emb.vocab_start)
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            for pname, param in module.named_parameters(recurse=False):
                if not (isinstance(module, RowParallelLinear) and pname == "bias"):
                    param_roles.mark_tp_sharded(param)
    log.info("tensor parallel: tp=%d, rank %d holds vocab [%d, %d)%s", tp, rank,
             model.tok_emb.vocab_start, model.tok_emb.vocab_end, " (tied head)" if tied else "")
    return model


def _swap(model: nn.Module, path: str, rule: ShardRule, group: dist.ProcessGroup | None) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, child)
    if isinstance(module, nn.Embedding):
        tp_module = VocabParallelEmbedding(module, group)
    elif rule.dim == 0:
        tp_module = ColumnParallelLinear(module, group, chunks=rule.chunks, unit=rule.unit)
    else:
        tp_module = RowParallelLinear(module, group, unit=rule.unit)
    setattr(parent, child, tp_module)


def _check_heads(where: str, attn: Attention, tp: int) -> None:
    if attn.n_heads < tp:
        raise ValueError(f"{where}: model.n_heads ({attn.n_heads}) must be at least parallel.tp ({tp})")
    if attn.n_kv_heads != attn.n_heads and attn.n_kv_heads % tp:
        raise ValueError(f"{where}: model.n_kv_heads ({attn.n_kv_heads}) must be divisible by "
                         f"parallel.tp ({tp})")


# ---------------------------------------------------------------- MoE token slicing
class _TokenSlicer:
    """The pair of hooks that slice a MoE layer's tokens over TP and gather them back.

    Holds the input shape between the two hooks (forward pre-hook, forward hook)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group, self.input_shape = group, None

    def slice(self, moe: MoELayer, args: tuple) -> tuple[torch.Tensor]:
        """Whole sequences per slice when the batch divides by tp (so the sequence-wise
        balance loss sees whole sequences), else a flat slice of the tokens."""
        (x_BSD,) = args
        tokens, tp = x_BSD.numel() // x_BSD.shape[-1], group_size(self.group)
        if tokens % tp:
            raise ValueError(
                f"tokens per rank (micro_batch_size * seq_len = {tokens}) must be divisible by "
                f"parallel.tp ({tp}) for a token-sliced MoE layer"
            )
        self.input_shape = x_BSD.shape
        if x_BSD.dim() == 3 and x_BSD.shape[0] % tp == 0:
            return (split_first_dim(x_BSD, self.group),)
        return (split_first_dim(x_BSD.reshape(tokens, x_BSD.shape[-1]), self.group),)

    def gather(self, moe: MoELayer, args: tuple, output: tuple) -> tuple[torch.Tensor, MoEStats]:
        y_TlD, stats = output
        y_BSD = gather_first_dim(y_TlD, self.group).view(self.input_shape)
        return y_BSD, combine_stats(stats, self.group)


def slice_moe_tokens(moe: MoELayer, tp_group: dist.ProcessGroup | None) -> MoELayer:
    """In place: route only this TP rank's slice of the tokens through `moe`.

    Hooks, so parameter names (and checkpoints) stay those of the plain model.
    Communication: forward one all-gather of the outputs, one all-reduce of the routing
    counts and one of the three router losses; backward one all-gather of the input grad.
    """
    slicer = _TokenSlicer(tp_group)
    moe.register_forward_pre_hook(slicer.slice)
    moe.register_forward_hook(slicer.gather)
    for param in moe.parameters():
        param_roles.mark_tp_partial(param)
    return moe


def combine_stats(stats: MoEStats, group: dist.ProcessGroup | None) -> MoEStats:
    """Whole-batch stats from per-slice ones. Communication: two all-reduces.

    Losses are the mean over slices. The sequence-wise loss equals the unsliced one when
    every slice holds whole sequences (batch divisible by tp, see _TokenSlicer.slice);
    otherwise each slice counts as one sequence.
    """
    tp = group_size(group)
    counts_2E = torch.stack([stats.routed_E, stats.kept_E])
    if tp > 1:
        counts_2E = counts_2E.clone()
        dist.all_reduce(counts_2E, group=group)
    losses = reduce_from_region(
        torch.stack([stats.aux_loss, stats.z_loss, stats.seq_aux_loss]) / tp, group
    )
    return MoEStats(counts_2E[0], counts_2E[1], aux_loss=losses[0], z_loss=losses[1],
                    seq_aux_loss=losses[2], capacity=stats.capacity)
