"""Tensor-parallel layers (Megatron-style) and the vocab-parallel cross-entropy.

Shape legend: T tokens (any leading dims), D input features, O output features,
V vocabulary; a trailing `l` (O_l, V_l) marks this rank's shard.

    ColumnParallelLinear   W split by output rows; input copied in, output stays sharded
    RowParallelLinear      W split by input columns; partial outputs all-reduced
    VocabParallelEmbedding table split by vocabulary rows; lookups all-reduced
    vocab_parallel_cross_entropy(logits_TVl, targets_T, group)   loss without gathering V

Every layer is built from the full module by slicing it with the same `ShardRule`
maths as the sharding plan (dmoe.parallel.plan: balanced, in whole `unit`s, `chunks`
packed blocks split alike), so all ranks build one model from one seed and shard it, and
checkpoints know each rank's slice from the plan alone.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommTag
from dmoe.parallel.plan import TP, ShardRule, shard_range

from .collectives import (
    copy_to_region,
    gather_last_dim,
    group_rank,
    group_size,
    reduce_from_region,
    split_last_dim,
)


def _shard_param(full: torch.Tensor, dim: int, index: torch.Tensor) -> nn.Parameter:
    local = full.detach().index_select(dim, index.to(full.device)).clone()
    return nn.Parameter(local, requires_grad=full.requires_grad)


def _is_even_split(size: int, world: int, unit: int = 1) -> bool:
    return size % (world * unit) == 0


# ---------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Module):
    """y_TOl = x_TD W_l^T + b_l, with W's output rows split over the TP group.

    Communication: forward none (unless gather_output: all-gather of y along features);
    backward one all-reduce of the input grad (copy_to_region), since every rank's shard
    contributes part of dL/dx.
    """

    def __init__(self, linear: nn.Linear, group, gather_output: bool = False,
                 chunks: int = 1, unit: int = 1):
        super().__init__()
        self.group, self.chunks, self.unit = group, chunks, unit
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gather_output = gather_output
        world = group_size(group)
        if gather_output and (chunks != 1 or not _is_even_split(self.out_features, world, unit)):
            raise ValueError(
                f"gather_output needs one chunk and out_features ({self.out_features}) "
                f"divisible by parallel.tp ({world})"
            )
        index = ShardRule(TP, 0, chunks, unit).index(self.out_features, group_rank(group), world)
        self.weight = _shard_param(linear.weight, 0, index)
        self.bias = None if linear.bias is None else _shard_param(linear.bias, 0, index)
        self.out_features_per_rank = len(index)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TOl = F.linear(copy_to_region(x_TD, self.group), self.weight, self.bias)
        return gather_last_dim(y_TOl, self.group) if self.gather_output else y_TOl

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features} "
                f"(this rank {self.out_features_per_rank}), chunks={self.chunks}, unit={self.unit}")


class RowParallelLinear(nn.Module):
    """y_TO = sum over ranks of x_TDl W_l^T, then + b; W's input columns split over TP.

    Communication: forward one all-reduce of the partial outputs (reduce_from_region);
    backward none, unless input_is_parallel=False (then the input is split here and its
    grad all-gathered).
    """

    def __init__(self, linear: nn.Linear, group, input_is_parallel: bool = True, unit: int = 1):
        super().__init__()
        self.group, self.unit, self.input_is_parallel = group, unit, input_is_parallel
        self.in_features, self.out_features = linear.in_features, linear.out_features
        world = group_size(group)
        if not input_is_parallel and not _is_even_split(self.in_features, world, unit):
            raise ValueError(
                f"splitting the input needs in_features ({self.in_features}) divisible by "
                f"parallel.tp ({world})"
            )
        index = ShardRule(TP, 1, 1, unit).index(self.in_features, group_rank(group), world)
        self.weight = _shard_param(linear.weight, 1, index)
        # the bias is replicated and added once, after the reduction
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.in_features_per_rank = len(index)

    def forward(self, x_TDl: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x_TDl = split_last_dim(x_TDl, self.group)
        y_TO = reduce_from_region(F.linear(x_TDl, self.weight), self.group)
        return y_TO if self.bias is None else y_TO + self.bias

    def extra_repr(self):
        return (f"in={self.in_features} (this rank {self.in_features_per_rank}), "
                f"out={self.out_features}, unit={self.unit}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows [vocab_start, vocab_end).

    Each rank looks up the ids it owns, writes zeros for the rest, and the rows are summed
    over TP. Communication: forward one all-reduce; backward none.
    """

    def __init__(self, embedding: nn.Embedding, group):
        super().__init__()
        if embedding.max_norm is not None or embedding.sparse or embedding.padding_idx is not None:
            raise ValueError("VocabParallelEmbedding supports no max_norm, sparse or padding_idx")
        self.group = group
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.vocab_start, self.vocab_end = shard_range(
            self.num_embeddings, group_rank(group), group_size(group)
        )
        index = ShardRule(TP, 0).index(self.num_embeddings, group_rank(group), group_size(group))
        self.weight = _shard_param(embedding.weight, 0, index)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        foreign = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(foreign, 0), self.weight)
        out = out.masked_fill(foreign.unsqueeze(-1), 0.0)
        return reduce_from_region(out, self.group)

    def extra_repr(self):
        rows = f"rows [{self.vocab_start}, {self.vocab_end})"
        return f"{self.num_embeddings}, {self.embedding_dim}, {rows}"


# ---------------------------------------------------------------- loss
class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocab-sharded logits, never materialising full V.

    Forward, two all-reduces over TP: (1) MAX of each row's local max, for stability;
    (2) SUM of [target logit (only its owner contributes), sum of exp] in one tensor.
    Backward: no communication: d loss / d logits_l = softmax_l - onehot_l(target).
    """

    @staticmethod
    def forward(ctx, logits_TVl, targets_T, vocab_start, group):
        x = logits_TVl.float() if logits_TVl.element_size() < 4 else logits_TVl
        row_max_T = x.amax(dim=-1)
        if group_size(group) > 1:
            comm_trace.all_reduce(row_max_T, dist.ReduceOp.MAX, group, CommTag("tp_ce_max"))
        shifted = x - row_max_T.unsqueeze(-1)
        local_T = targets_T - vocab_start
        owned_T = (local_T >= 0) & (local_T < x.shape[-1])
        idx_T = local_T.clamp(0, x.shape[-1] - 1)
        target_T = shifted.gather(-1, idx_T.unsqueeze(-1)).squeeze(-1)
        exp = shifted.exp_()  # reuse the buffer: shifted is no longer needed
        sums_2T = torch.stack([torch.where(owned_T, target_T, 0.0), exp.sum(-1)])
        if group_size(group) > 1:
            comm_trace.all_reduce(sums_2T, group=group, tag=CommTag("tp_ce_sums"))
        softmax = exp.div_(sums_2T[1].unsqueeze(-1))
        ctx.save_for_backward(softmax, idx_T, owned_T)
        ctx.in_dtype = logits_TVl.dtype
        return sums_2T[1].log() - sums_2T[0]

    @staticmethod
    def backward(ctx, grad_T):
        softmax, idx_T, owned_T = ctx.saved_tensors
        grad_T = grad_T.to(softmax.dtype)
        grad = softmax * grad_T.unsqueeze(-1)
        minus_one = torch.where(owned_T, -grad_T, 0.0).unsqueeze(-1)
        grad.scatter_add_(-1, idx_T.unsqueeze(-1), minus_one)
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits_TVl: torch.Tensor,
    targets_T: torch.Tensor,
    group: dist.ProcessGroup | None,
    vocab_start: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """F.cross_entropy for logits whose last dim is this rank's vocab shard.

    `vocab_start` is the first vocab id of this rank's shard; None assumes equal shards
    (rank * V_l). Targets equal to `ignore_index` add nothing (as in F.cross_entropy).
    The result is identical on every TP rank. Communication: two all-reduces forward.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction ({reduction!r}) must be one of ['mean', 'sum', 'none']")
    if vocab_start is None:
        vocab_start = group_rank(group) * logits_TVl.shape[-1]
    loss_T = _VocabParallelCE.apply(logits_TVl, targets_T, vocab_start, group)
    valid_T = targets_T != ignore_index
    loss_T = torch.where(valid_T, loss_T, 0.0)
    if reduction == "none":
        return loss_T
    if reduction == "sum":
        return loss_T.sum()
    return loss_T.sum() / valid_T.sum()


class VocabParallelCrossEntropy(nn.Module):
    """The model's criterion slot (MoETransformer.criterion) for a vocab-sharded head."""

    def __init__(self, group: dist.ProcessGroup | None, vocab_start: int):
        super().__init__()
        self.group, self.vocab_start = group, vocab_start

    def forward(self, logits_TVl: torch.Tensor, targets_T: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits_TVl, targets_T, self.group, self.vocab_start)

    def extra_repr(self):
        return f"vocab_start={self.vocab_start}"
