"""dmoe parameter names <-> Hugging Face tensor names, and the reshapes between them.

    links = links_for(cfg, family, fused=False)   # one Link per dmoe parameter
    full = to_dmoe(link, [hf tensors...])         # import
    parts = to_hf(link, full)                     # export (same order as link.hf)

Shape legend: E experts, D model dim, F expert ffn dim, H query heads, G key/value heads,
R head dim. HF linears are [out, in]; dmoe's stacked experts are the transpose
(w1_EDH with H = 2F packing [gate | up], w2_EFD).

    dmoe                                  HF (layer prefix model.layers.{i}.)
    tok_emb.weight                        model.embed_tokens.weight
    blocks.i.ln1 / ln2.weight             input_layernorm / post_attention_layernorm.weight
    blocks.i.attn.qkv.weight (and .bias)  self_attn.q_proj ; k_proj ; v_proj  (rows H*R, G*R, G*R)
    blocks.i.attn.proj.weight (.bias)     self_attn.o_proj
    blocks.i.attn.q_norm / k_norm.weight  self_attn.q_norm / k_norm.weight        (qwen3)
    blocks.i.ffn.fc1.weight (dense)       mlp.gate_proj ; mlp.up_proj            (rows F, F)
    blocks.i.ffn.fc2.weight (dense)       mlp.down_proj
    blocks.i.ffn.router.gate.weight       mlp.gate.weight (mixtral on disk: block_sparse_moe.gate)
    blocks.i.ffn.experts.w1[e]            cat(gate_e, up_e).T   experts.{e}.gate_proj/up_proj
                                          (mixtral: block_sparse_moe.experts.{e}.w1 / w3)
    blocks.i.ffn.experts.w2[e]            down_e.T              experts.{e}.down_proj (mixtral w2)
    blocks.i.shared_expert.mlp.fc1/fc2    mlp.shared_expert.gate_proj ; up_proj / down_proj
    blocks.i.shared_expert.gate.weight    mlp.shared_expert_gate.weight           (qwen2_moe)
    ln_f.weight / lm_head.weight          model.norm.weight / lm_head.weight (absent when tied)

Per-expert names are what transformers' save_pretrained writes (and vLLM reads); the
fused layout of transformers 5 in memory (mlp.experts.gate_up_proj [E, 2F, D],
mlp.experts.down_proj [E, D, F]) is read too (fused=True).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dmoe.config import Config
from dmoe.model.transformer import is_moe_block

COPY, ROWS, EXPERTS_W1, EXPERTS_W2, FUSED_W1, FUSED_W2 = (
    "copy", "rows", "experts_w1", "experts_w2", "fused_w1", "fused_w2")


@dataclass(frozen=True)
class Link:
    dmoe: str
    hf: tuple[str, ...]
    kind: str = COPY
    rows: tuple[int, ...] = ()  # ROWS: each HF tensor's dim-0 size, in order


def _expert_names(prefix: str, family: str, num_experts: int) -> tuple[tuple, tuple]:
    """(w1 sources [gate_0, up_0, gate_1, ...], w2 sources [down_0, ...]), per expert."""
    if family == "mixtral":
        gate, up, down = "w1", "w3", "w2"
    else:
        gate, up, down = "gate_proj", "up_proj", "down_proj"
    w1 = tuple(f"{prefix}experts.{e}.{n}.weight" for e in range(num_experts) for n in (gate, up))
    return w1, tuple(f"{prefix}experts.{e}.{down}.weight" for e in range(num_experts))


def _attention(cfg: Config, b: str, p: str) -> list[Link]:
    m = cfg.model
    r = m.head_dim or m.d_model // m.n_heads
    rows = (m.n_heads * r, (m.n_kv_heads or m.n_heads) * r, (m.n_kv_heads or m.n_heads) * r)
    qkv = tuple(f"{p}self_attn.{x}_proj" for x in "qkv")
    links = [Link(f"{b}attn.qkv.weight", tuple(f"{n}.weight" for n in qkv), ROWS, rows)]
    if m.qkv_bias or m.bias:
        links.append(Link(f"{b}attn.qkv.bias", tuple(f"{n}.bias" for n in qkv), ROWS, rows))
    links.append(Link(f"{b}attn.proj.weight", (f"{p}self_attn.o_proj.weight",)))
    if m.bias:
        links.append(Link(f"{b}attn.proj.bias", (f"{p}self_attn.o_proj.bias",)))
    if m.qk_norm:
        links += [Link(f"{b}attn.{x}_norm.weight", (f"{p}self_attn.{x}_norm.weight",))
                  for x in "qk"]
    return links


def _mlp(dmoe: str, hf: str, width: int, bias: bool) -> list[Link]:
    """A SwiGLU MLP: fc1 = [gate; up] rows, fc2 = down."""
    links = [Link(f"{dmoe}fc1.weight", (f"{hf}gate_proj.weight", f"{hf}up_proj.weight"), ROWS,
                  (width, width)),
             Link(f"{dmoe}fc2.weight", (f"{hf}down_proj.weight",))]
    if bias:
        links += [Link(f"{dmoe}fc1.bias", (f"{hf}gate_proj.bias", f"{hf}up_proj.bias"), ROWS,
                       (width, width)),
                  Link(f"{dmoe}fc2.bias", (f"{hf}down_proj.bias",))]
    return links


def _moe(cfg: Config, family: str, fused: bool, b: str, p: str) -> list[Link]:
    e = cfg.moe
    moe = f"{p}block_sparse_moe." if family == "mixtral" and not fused else f"{p}mlp."
    links = [Link(f"{b}ffn.router.gate.weight", (f"{moe}gate.weight",))]
    if fused:
        links += [Link(f"{b}ffn.experts.w1", (f"{moe}experts.gate_up_proj",), FUSED_W1),
                  Link(f"{b}ffn.experts.w2", (f"{moe}experts.down_proj",), FUSED_W2)]
    else:
        w1, w2 = _expert_names(moe, family, e.num_experts)
        links += [Link(f"{b}ffn.experts.w1", w1, EXPERTS_W1),
                  Link(f"{b}ffn.experts.w2", w2, EXPERTS_W2)]
    if e.num_shared_experts:
        width = e.num_shared_experts * (e.shared_expert_ffn_dim or e.expert_ffn_dim)
        links += _mlp(f"{b}shared_expert.mlp.", f"{p}mlp.shared_expert.", width, cfg.model.bias)
        if e.shared_expert_gate:
            links.append(Link(f"{b}shared_expert.gate.weight",
                              (f"{p}mlp.shared_expert_gate.weight",)))
    return links


def links_for(cfg: Config, family: str, fused: bool = False) -> list[Link]:
    """Every dmoe parameter of cfg's model with its HF sources, in named_parameters order."""
    m = cfg.model
    links = [Link("tok_emb.weight", ("model.embed_tokens.weight",))]
    for i in range(m.n_layers):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        links.append(Link(f"{b}ln1.weight", (f"{p}input_layernorm.weight",)))
        links.append(Link(f"{b}ln2.weight", (f"{p}post_attention_layernorm.weight",)))
        links += _attention(cfg, b, p)
        if is_moe_block(cfg, i):
            links += _moe(cfg, family, fused, b, p)
        else:
            links += _mlp(f"{b}ffn.", f"{p}mlp.", m.ffn_dim, m.bias)
    links.append(Link("ln_f.weight", ("model.norm.weight",)))
    if not m.tie_embeddings:
        links.append(Link("lm_head.weight", ("lm_head.weight",)))
    return links


def hf_shapes(link: Link, shape: list[int]) -> list[list[int]]:
    """The shape of each of link.hf for a dmoe parameter of `shape`."""
    if link.kind == ROWS:
        return [[r, *shape[1:]] for r in link.rows]
    if link.kind == EXPERTS_W1:
        experts, d_model, width = shape
        return [[width // 2, d_model]] * (2 * experts)
    if link.kind == EXPERTS_W2:
        experts, d_ff, d_model = shape
        return [[d_model, d_ff]] * experts
    if link.kind in (FUSED_W1, FUSED_W2):
        return [[shape[0], shape[2], shape[1]]]
    return [list(shape)]


def to_dmoe(link: Link, parts: list[torch.Tensor]) -> torch.Tensor:
    """The dmoe parameter from its HF tensors (exact: concatenations and transposes)."""
    if link.kind == ROWS:
        return torch.cat(parts, 0)
    if link.kind == EXPERTS_W1:  # w1_EDH[e] = [gate_e; up_e].T
        return torch.stack([torch.cat(parts[i:i + 2], 0).T for i in range(0, len(parts), 2)])
    if link.kind == EXPERTS_W2:  # w2_EFD[e] = down_e.T
        return torch.stack([down_DF.T for down_DF in parts])
    if link.kind in (FUSED_W1, FUSED_W2):  # [E, out, in] -> [E, in, out]
        return parts[0].transpose(1, 2)
    return parts[0]


def to_hf(link: Link, full: torch.Tensor) -> list[torch.Tensor]:
    """The HF tensors of a dmoe parameter, in the order of link.hf (inverse of to_dmoe)."""
    if link.kind == ROWS:
        return list(torch.split(full, list(link.rows), 0))
    if link.kind == EXPERTS_W1:
        d_ff = full.shape[2] // 2
        return [w_HD for e in range(full.shape[0])
                for w_HD in (full[e, :, :d_ff].T, full[e, :, d_ff:].T)]
    if link.kind == EXPERTS_W2:
        return [full[e].T for e in range(full.shape[0])]
    if link.kind in (FUSED_W1, FUSED_W2):
        return [full.transpose(1, 2)]
    return [full]
