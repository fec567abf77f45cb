"""Tensor parallelism against unsharded references, on real gloo ranks.

Every rank builds the full module from one seed, runs it as the reference, shards a copy
and runs that on the same data; the TP output, input grad and the gathered weight grads
must equal the reference's (float64). World 4 runs TP=2 x DP=2: the two TP groups get
different data, and each is checked against the reference on its own data.
Each rank returns {check: max abs difference}; the parent asserts on every entry.
"""
import copy
import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dmoe.parallel.param_roles import is_tp_partial
from dmoe.parallel.plan import TP, ShardRule, shard_index, shard_range
from dmoe.parallel.tensor_parallel import collectives as C
from dmoe.parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from tests._dist import run_ranks

from .gather import all_gather_ragged, gather_full_tensors, unshard

log = logging.getLogger(__name__)
TOL = 1e-12


def tp_group(rank, world, tp):
    """Consecutive ranks form a TP group (TP varies fastest, as in dmoe.parallel.layout)."""
    mine = None
    for start in range(0, world, tp):
        group = dist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            mine = group
    return mine


def diff(a, b):
    return (a.detach() - b.detach()).abs().max().item()


def check(report, tol=TOL):
    worst = {}
    for rank_report in report:
        for name, value in rank_report.items():
            worst[name] = max(worst.get(name, 0.0), value)
    log.info("max abs differences: %s", worst)
    bad = {k: v for k, v in worst.items() if not v <= tol}
    assert not bad, f"differences above {tol}: {bad}"
    return worst


def randn(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), dtype=torch.double, generator=gen)


# ---------------------------------------------------------------- pure shard maths
def test_shard_range_is_balanced_in_units():
    assert [shard_range(11, r, 2) for r in range(2)] == [(0, 6), (6, 11)]
    assert [shard_range(12, r, 2, unit=4) for r in range(2)] == [(0, 8), (8, 12)]
    assert [shard_range(12, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]


def test_shard_index_splits_each_packed_chunk():
    # qkv of 2 heads of width 2: rank 1 owns head 1 of q, of k and of v
    assert shard_index(12, 1, 2, chunks=3, unit=2).tolist() == [2, 3, 6, 7, 10, 11]


def test_shard_errors_name_the_values():
    with pytest.raises(ValueError, match=r"size \(10\) must be a multiple of the shard unit \(4\)"):
        shard_range(10, 0, 2, unit=4)
    with pytest.raises(ValueError, match=r"cannot split 1 unit\(s\) of 4 over parallel.tp \(2\)"):
        shard_range(4, 0, 2, unit=4)


# ---------------------------------------------------------------- collectives
def _collectives(rank, world):
    g, out = dist.group.WORLD, {}
    g_all = randn(4, 6, seed=7)  # the same upstream grad on every rank
    cases = {
        # name: (fn, (x, xs, gs) -> (expected y, expected x.grad; None: g_all))
        "copy": (C.copy_to_region, lambda x, xs, gs: (x, sum(gs))),
        "reduce": (C.reduce_from_region, lambda x, xs, gs: (sum(xs), gs[rank])),
        "gather_last": (C.gather_last_dim, lambda x, xs, gs: (torch.cat(xs, -1), None)),
        "gather_first": (C.gather_first_dim, lambda x, xs, gs: (torch.cat(xs, 0), None)),
    }
    xs = [randn(4, 6, seed=10 + r) for r in range(world)]
    gs = [randn(4, 6, seed=20 + r) for r in range(world)]
    for name, (fn, expect) in cases.items():
        x = xs[rank].clone().requires_grad_()
        y = fn(x, g)
        upstream = gs[rank] if name in ("copy", "reduce") else g_all
        if name.startswith("gather"):
            upstream = torch.cat([g_all] * world, 0 if name.endswith("first") else -1)
        y.backward(upstream)
        y_ref, grad_ref = expect(x, xs, gs)
        if grad_ref is None:
            grad_ref = g_all
        out[f"{name}.fwd"], out[f"{name}.bwd"] = diff(y, y_ref), diff(x.grad, grad_ref)
    splits = (("split_last", C.split_last_dim, -1), ("split_first", C.split_first_dim, 0))
    for name, fn, dim in splits:
        x = xs[0].clone().requires_grad_()  # replicated input
        y = fn(x, g)
        y.backward(gs[rank][:2] if dim == 0 else gs[rank][:, :3])
        out[f"{name}.fwd"] = diff(y, x.chunk(world, dim)[rank])
        pieces = [gs[r][:2] if dim == 0 else gs[r][:, :3] for r in range(world)]
        out[f"{name}.bwd"] = diff(x.grad, torch.cat(pieces, dim))
    pieces = all_gather_ragged(torch.full((3 - 2 * rank, 2), float(rank)), 0, g)
    out["ragged"] = float(sum(diff(p, torch.full((n, 2), float(r)))
                              for r, (p, n) in enumerate(zip(pieces, [3, 1]))))
    return out


def test_collectives_forward_and_backward():
    check(run_ranks(_collectives, 2))


# ---------------------------------------------------------------- layers
def _grads_match(out, prefix, module_tp, module_ref, names, rule):
    for name in names:
        full = unshard(getattr(module_tp, name).grad, rule, module_tp.group)
        out[f"{prefix}.{name}.grad"] = diff(full, getattr(module_ref, name).grad)
        out[f"{prefix}.{name}"] = diff(unshard(getattr(module_tp, name).detach(), rule, module_tp.group),
                                       getattr(module_ref, name))


def _run_pair(ref_fn, tp_fn, x, target):
    results = []
    for fn in (ref_fn, tp_fn):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y * target).sum().backward()
        results.append((y, xi.grad))
    return results


def _mlp_case(group, seed, out, hidden, gather):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, hidden).double(), nn.Linear(hidden, 8).double()
    col = ColumnParallelLinear(fc1, group, gather_output=gather)
    row = RowParallelLinear(fc2, group, input_is_parallel=not gather)
    x, target = randn(3, 5, 8, seed=seed), randn(3, 5, 8, seed=seed + 1)
    (y_ref, gx_ref), (y, gx) = _run_pair(
        lambda v: fc2(F.gelu(fc1(v))), lambda v: row(F.gelu(col(v))), x, target
    )
    tag = f"mlp{hidden}{'.gathered' if gather else ''}"
    out[f"{tag}.y"], out[f"{tag}.x.grad"] = diff(y, y_ref), diff(gx, gx_ref)
    _grads_match(out, f"{tag}.fc1", col, fc1, ["weight", "bias"], ShardRule(TP, 0))
    _grads_match(out, f"{tag}.fc2", row, fc2, ["weight"], ShardRule(TP, 1))
    out[f"{tag}.fc2.bias.grad"] = diff(row.bias.grad, fc2.bias.grad)


def _attention(qkv, proj, x_BSD, head_dim):
    B, S, _ = x_BSD.shape
    q, k, v = qkv(x_BSD).view(B, S, 3, -1, head_dim).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return proj(y.transpose(1, 2).reshape(B, S, -1))


def _attention_case(group, seed, out, n_heads=3, head_dim=4):
    torch.manual_seed(0)
    d = n_heads * head_dim
    qkv, proj = nn.Linear(d, 3 * d, bias=False).double(), nn.Linear(d, d, bias=False).double()
    qkv_tp = ColumnParallelLinear(qkv, group, chunks=3, unit=head_dim)
    proj_tp = RowParallelLinear(proj, group, unit=head_dim)
    x, target = randn(2, 5, d, seed=seed), randn(2, 5, d, seed=seed + 1)
    (y_ref, gx_ref), (y, gx) = _run_pair(
        lambda v: _attention(qkv, proj, v, head_dim),
        lambda v: _attention(qkv_tp, proj_tp, v, head_dim), x, target,
    )
    out["attn.y"], out["attn.x.grad"] = diff(y, y_ref), diff(gx, gx_ref)
    _grads_match(out, "attn.qkv", qkv_tp, qkv, ["weight"], ShardRule(TP, 0, 3, head_dim))
    _grads_match(out, "attn.proj", proj_tp, proj, ["weight"], ShardRule(TP, 1, 1, head_dim))


def _embedding_case(group, seed, out, vocab=11):
    torch.manual_seed(0)
    emb = nn.Embedding(vocab, 6).double()
    emb_tp = VocabParallelEmbedding(emb, group)
    ids = torch.randint(0, vocab, (4, 7), generator=torch.Generator().manual_seed(seed))
    ids[0] = torch.arange(7)  # ids on both ranks' shards for sure
    target = randn(4, 7, 6, seed=seed + 1)
    y_ref, y = emb(ids), emb_tp(ids)
    (y_ref * target).sum().backward()
    (y * target).sum().backward()
    out["emb.y"] = diff(y, y_ref)
    _grads_match(out, "emb", emb_tp, emb, ["weight"], ShardRule(TP, 0))


def _layers(rank, world, tp):
    group, seed = tp_group(rank, world, tp), 100 * (rank // tp)  # data differs per DP index
    out = {}
    _mlp_case(group, seed, out, hidden=9, gather=False)  # uneven: 5 + 4 hidden units
    _mlp_case(group, seed, out, hidden=12, gather=True)
    _attention_case(group, seed, out)  # 3 heads on 2 ranks
    _embedding_case(group, seed, out)  # 11 rows on 2 ranks
    return out


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2)])
def test_layers_match_unsharded(world, tp):
    check(run_ranks(_layers, world, (tp,)))


def test_gather_output_needs_even_split():
    def build(rank, world):
        ColumnParallelLinear(nn.Linear(4, 9), dist.group.WORLD, gather_output=True)

    with pytest.raises(AssertionError, match=r"out_features \(9\) divisible by parallel.tp \(2\)"):
        run_ranks(build, 2, timeout=30)


# ---------------------------------------------------------------- cross-entropy
def _cross_entropy(rank, world, tp, vocab):
    group, seed = tp_group(rank, world, tp), 100 * (rank // tp)
    start, stop = shard_range(vocab, dist.get_rank(group), tp)
    logits = randn(20, vocab, seed=seed) * 30  # large: stability matters
    targets = torch.randint(0, vocab, (20,), generator=torch.Generator().manual_seed(seed))
    targets[:3] = -100
    out = {}
    for reduction in ("mean", "sum", "none"):
        full = logits.clone().requires_grad_()
        ref = F.cross_entropy(full, targets, reduction=reduction)
        local = logits[:, start:stop].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, group, start, reduction=reduction)
        upstream = randn(*ref.shape, seed=5)
        ref.backward(upstream)
        loss.backward(upstream)
        out[f"ce.{reduction}"] = diff(loss, ref)
        out[f"ce.{reduction}.grad"] = diff(local.grad, full.grad[:, start:stop])
    return out


@pytest.mark.parametrize("world,tp,vocab", [(2, 2, 11), (2, 2, 16), (4, 2, 13)])
def test_vocab_parallel_cross_entropy(world, tp, vocab):
    check(run_ranks(_cross_entropy, world, (tp, vocab)))


def _tied(rank, world, tp, vocab=10, d=6):
    group, seed = tp_group(rank, world, tp), 100 * (rank // tp)
    torch.manual_seed(0)
    emb, head = nn.Embedding(vocab, d).double(), nn.Linear(d, vocab, bias=False).double()
    head.weight = emb.weight
    emb_tp = VocabParallelEmbedding(emb, group)
    head_tp = ColumnParallelLinear(head, group)
    head_tp.weight = emb_tp.weight
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=gen)
    targets = torch.randint(0, vocab, (18,), generator=gen)
    ref = F.cross_entropy(head(torch.tanh(emb(ids))).flatten(0, 1), targets)
    logits = head_tp(torch.tanh(emb_tp(ids))).flatten(0, 1)
    loss = vocab_parallel_cross_entropy(logits, targets, group, emb_tp.vocab_start)
    ref.backward()
    loss.backward()
    out = {"tied.loss": diff(loss, ref)}
    _grads_match(out, "tied", emb_tp, emb, ["weight"], ShardRule(TP, 0))
    return out


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2)])
def test_tied_embedding_and_head(world, tp):
    check(run_ranks(_tied, world, (tp,)))


# ---------------------------------------------------------------- MoE token slicing
def _tp_sum_partial_grads(module, group):
    """What dmoe.parallel.grads does for params whose role is tp_partial."""
    for p in module.parameters():
        if is_tp_partial(p) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def _moe_layer(rank, world, cf):
    from dmoe.moe.dispatcher import CapacitySettings
    from dmoe.moe.layer import MoELayer
    from dmoe.parallel.tensor_parallel.apply import slice_moe_tokens

    group, T, D = dist.group.WORLD, 12, 6
    torch.manual_seed(0)
    layer = MoELayer(D, 4, 2, 10, CapacitySettings(cf, cf, 0, "position")).double()
    layer.experts.compute_dtype = torch.float64
    with torch.no_grad():
        layer.router.gate.weight[0] += 0.8  # skewed, so capacity bites
    ref = copy.deepcopy(layer)
    x, target = randn(2, T // 2, D, seed=1), randn(T, D, seed=2)

    # reference: the plain layer on each TP slice; aux and z are the slices' means
    x_ref = x.clone().requires_grad_()
    runs = [ref(h.unsqueeze(0)) for h in x_ref.reshape(T, D).chunk(world)]
    y_ref = torch.cat([y.reshape(-1, D) for y, _ in runs])
    aux_ref = torch.stack([s.aux_loss for _, s in runs]).mean()
    z_ref = torch.stack([s.z_loss for _, s in runs]).mean()
    ((y_ref * target).sum() + 0.5 * aux_ref + 0.3 * z_ref).backward()

    slice_moe_tokens(layer, group)
    x_tp = x.clone().requires_grad_()
    y, stats = layer(x_tp)
    ((y.reshape(T, D) * target).sum() + 0.5 * stats.aux_loss + 0.3 * stats.z_loss).backward()
    _tp_sum_partial_grads(layer, group)

    out = {"moe.y": diff(y.reshape(T, D), y_ref), "moe.x.grad": diff(x_tp.grad, x_ref.grad),
           "moe.aux": diff(stats.aux_loss, aux_ref), "moe.z": diff(stats.z_loss, z_ref)}
    for field in ("routed_E", "kept_E"):
        out[f"moe.{field}"] = diff(getattr(stats, field), sum(getattr(s, field) for _, s in runs))
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        out[f"moe.{name}.grad"] = diff(p.grad, p_ref.grad)
    return out


@pytest.mark.parametrize("cf", [None, 1.0])
def test_token_sliced_moe_matches_per_slice_reference(cf):
    check(run_ranks(_moe_layer, 2, (cf,)))


# ---------------------------------------------------------------- whole model
def _model_config(positions, tied):
    from dmoe.config import Config

    cfg = Config()
    m, e = cfg.model, cfg.moe
    m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.seq_len, m.ffn_dim = 32, 12, 3, 2, 8, 20
    m.positions, m.tie_embeddings, m.dropout = positions, tied, 0.0
    e.num_experts, e.top_k, e.every, e.expert_ffn_dim = 4, 2, 2, 8
    # dropless: token slicing then changes no routing decision. The load-balance loss of a
    # slice differs from the full batch's by design (tested above), so it is left out here.
    e.capacity_factor, e.aux_loss_coef, e.z_loss_coef = None, 0.0, 0.1
    return cfg


# GQA (2 kv heads on 4 query heads), qk-norm, RMSNorm, biases, SwiGLU dense MLP, a gated
# SwiGLU shared expert and a dense first block: every TP rule of the plan at once.
ARCH_OPTIONS = {"model": dict(d_model=16, n_heads=4, n_kv_heads=2, qk_norm=True, norm="rmsnorm",
                              bias=True, mlp_activation="swiglu", rope_theta=500.0, n_layers=3),
                "moe": dict(every=1, first_dense_layers=1, num_shared_experts=1,
                            shared_expert_ffn_dim=6, shared_expert_gate=True, activation="swiglu")}


def _model(rank, world, tp, positions, tied, options=None):
    from dmoe.model.transformer import MoETransformer
    from dmoe.parallel.tensor_parallel.apply import apply_tensor_parallel

    group, seed = tp_group(rank, world, tp), 100 * (rank // tp)
    cfg = _model_config(positions, tied)
    for section, values in (options or {}).items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    torch.manual_seed(0)
    model = MoETransformer(cfg).double()
    for m in model.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = torch.float64
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    idx, targets = (torch.randint(0, cfg.model.vocab_size, (2, 8), generator=gen) for _ in range(2))

    out_ref = ref(idx, targets)
    out_ref.loss.backward()
    apply_tensor_parallel(model, group)
    out_tp = model(idx, targets)
    out_tp.loss.backward()
    _tp_sum_partial_grads(model, group)

    start, stop = model.tok_emb.vocab_start, model.tok_emb.vocab_end
    out = {"loss": diff(out_tp.loss, out_ref.loss), "z_loss": diff(out_tp.z_loss, out_ref.z_loss),
           "logits": diff(out_tp.logits, out_ref.logits[..., start:stop])}
    grads, params = gather_full_tensors(model, group, grads=True), gather_full_tensors(model, group)
    ref_params = dict(ref.named_parameters())
    assert list(grads) == list(ref_params), "parameter names changed under TP"
    for name, p_ref in ref_params.items():
        out[f"{name}.grad"] = diff(grads[name], p_ref.grad)
        out[name] = diff(params[name], p_ref)
    return out


@pytest.mark.parametrize("world,tp,positions,tied", [
    (2, 2, "rotary", True), (2, 2, "learned", False), (4, 2, "learned", True),
])
def test_model_matches_single_process(world, tp, positions, tied):
    # float64 throughout (the router and cross-entropy compute in at least the input dtype)
    check(run_ranks(_model, world, (tp, positions, tied)))


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2)])
def test_architecture_options_match_single_process(world, tp):
    check(run_ranks(_model, world, (tp, "rotary", False, ARCH_OPTIONS)))


def _model_tp_ep(rank, world, tp, ep):
    """TP x EP through the real pipeline: layout groups, parallelize(), reduce_gradients()."""
    from dmoe.model.transformer import MoETransformer
    from dmoe.parallel.grads import global_grad_norm, reduce_gradients
    from dmoe.parallel.layout import ParallelLayout, build_process_groups
    from dmoe.parallel.parallelize import parallelize

    groups = build_process_groups(ParallelLayout(world, tp=tp, ep=ep))
    replica, replicas = rank // tp, world // tp  # TP groups are the data replicas
    cfg = _model_config("rotary", True)
    torch.manual_seed(0)
    model = MoETransformer(cfg).double()
    for m in model.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = torch.float64
    ref = copy.deepcopy(model)
    batches = []
    for r in range(replicas):
        gen = torch.Generator().manual_seed(100 * r)
        batches.append([torch.randint(0, cfg.model.vocab_size, (2, 8), generator=gen)
                        for _ in range(2)])
    ref_losses = [ref(*batch).loss for batch in batches]
    (sum(ref_losses) / replicas).backward()  # the DP-mean loss

    parallelize(model, groups)
    loss = model(*batches[replica]).loss
    loss.backward()
    reduce_gradients(list(model.parameters()), groups)

    ref_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    out = {"loss": diff(loss, ref_losses[replica]),
           "grad_norm": diff(global_grad_norm(list(model.parameters()), groups), ref_norm)}
    grads = gather_full_tensors(model, groups.tp, grads=True)
    experts_per_rank = cfg.moe.num_experts // ep
    rows = slice(groups.index("ep") * experts_per_rank, (groups.index("ep") + 1) * experts_per_rank)
    for name, p_ref in ref.named_parameters():
        expected = p_ref.grad[rows] if ".experts." in name else p_ref.grad
        out[f"{name}.grad"] = diff(grads[name], expected)
    return out


def test_model_tp2_ep2_matches_single_process():
    check(run_ranks(_model_tp_ep, 4, (2, 2)))
