"""Hugging Face families <-> dmoe options: what a config.json means in dmoe, and back.

    values = dmoe_values(hf_config, where)   # import: {"model": {...}, "moe": {...}}
    family = family_for(cfg)                 # export: the family that expresses cfg, or a
    config_json = hf_config(cfg, family)     #   one-line refusal naming the blocking option

Families: mixtral, qwen2_moe, qwen3_moe (MoE) and llama, qwen2, qwen3 (dense). Every
architecture option of dmoe is set explicitly on import, so a base --config can only bring
training, data and parallel settings. What cannot be expressed (sliding windows, scaled
rope, an attention bias without an MLP bias, ...) is refused with the config field named.
"""
from __future__ import annotations

import logging

from dmoe.config import Config
from dmoe.model.transformer import is_moe_block

from .errors import HFError

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
DEFAULT_THETA = {"mixtral": 1e6}  # transformers' default when config.json has none; else 1e4
SEQ_LEN_CAP = 4096  # model.seq_len on import: the training window (rotary tables are built
#                     for it), not the model's limit; override with --model.seq_len
EOT_ID = 0  # dmoe's document separator (dmoe.data.token_files.EOT_BYTE)


# ---------------------------------------------------------------- import: config.json -> dmoe
def _rope_theta(hf: dict, family: str, where: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    kind = params.get("rope_type") or params.get("type") or "default"
    if scaling or kind != "default":
        raise HFError(f"{where}: rope_scaling / rope_parameters ({scaling or params}) is not "
                      "supported: dmoe has plain rotary positions (rope_type default)")
    return float(params.get("rope_theta") or hf.get("rope_theta") or DEFAULT_THETA.get(family, 1e4))


def _check_plain(hf: dict, where: str, seq_len: int) -> None:
    """Options no dmoe model has: refused rather than silently dropped."""
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"{where}: hidden_act ({hf['hidden_act']!r}) is not supported: dmoe's "
                      "SwiGLU uses silu")
    if hf.get("quantization_config"):
        raise HFError(f"{where}: quantization_config is set; dmoe imports float weights only")
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window") or (hf.get("model_type") == "mixtral" and window
                                         and window < seq_len):
        raise HFError(f"{where}: sliding_window ({window}) is not supported: dmoe attends "
                      "over the whole sequence")


def _attention_bias(hf: dict, family: str, where: str) -> tuple[bool, bool]:
    """(model.qkv_bias, model.bias) of a family's attention/MLP bias fields."""
    if family in ("qwen2", "qwen2_moe"):
        return bool(hf.get("qkv_bias", True)), False
    if family == "llama":
        attn, mlp = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
        if attn != mlp:
            raise HFError(f"{where}: attention_bias ({attn}) with mlp_bias ({mlp}) is not "
                          "expressible: dmoe's model.bias sets both")
        return False, attn
    if hf.get("attention_bias"):
        raise HFError(f"{where}: attention_bias (true) is not expressible: dmoe's "
                      "model.qkv_bias leaves o_proj without a bias, model.bias adds MLP biases")
    return False, False


def _sparse_layers(hf: dict, n_layers: int, where: str) -> tuple[int, int]:
    """(moe.every, moe.first_dense_layers) giving the same MoE blocks as Qwen's
    decoder_sparse_step and mlp_only_layers."""
    step = int(hf.get("decoder_sparse_step") or 1)
    only = set(hf.get("mlp_only_layers") or [])
    wanted = [i for i in range(n_layers) if i not in only and (i + 1) % step == 0]
    for first_dense in range(n_layers + 1):
        if [i for i in range(n_layers) if i >= first_dense and (i + 1) % step == 0] == wanted:
            return step, first_dense
    raise HFError(f"{where}: mlp_only_layers ({sorted(only)}) with decoder_sparse_step ({step}) "
                  "is not expressible: dmoe's dense blocks (moe.first_dense_layers) come first")


def _moe_values(hf: dict, family: str, n_layers: int, where: str) -> dict:
    if family == "mixtral":
        experts, ffn, normalize = hf.get("num_local_experts"), hf.get("intermediate_size"), True
        every, first_dense = 1, 0
    else:
        experts = hf.get("num_experts") or hf.get("num_local_experts")
        ffn, normalize = hf.get("moe_intermediate_size"), bool(hf.get("norm_topk_prob", False))
        every, first_dense = _sparse_layers(hf, n_layers, where)
    top_k = hf.get("num_experts_per_tok")
    for key, value in (("experts", experts), ("num_experts_per_tok", top_k),
                       ("expert intermediate size", ffn)):
        if not isinstance(value, int) or value < 1:
            raise HFError(f"{where}: {key} ({value!r}) must be a positive integer")
    if top_k == 1 and normalize:
        raise HFError(f"{where}: num_experts_per_tok (1) with renormalised gates (gate 1) is not "
                      "expressible: dmoe's top-1 gate is the router probability")
    shared = int(hf.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
    return {
        "num_experts": experts, "top_k": top_k, "every": every, "first_dense_layers": first_dense,
        "expert_ffn_dim": ffn, "activation": "swiglu", "normalize_topk": normalize,
        "score_func": "softmax", "route_scale": 1.0, "num_groups": 1, "topk_groups": 1,
        "bias_update_rate": 0.0, "num_shared_experts": 1 if shared else 0,
        "shared_expert_ffn_dim": shared, "shared_expert_gate": bool(shared),
        "router_jitter": float(hf.get("router_jitter_noise") or 0.0),
        # HF's load-balance term counts per top-k slot: k times dmoe's (README, balance losses)
        "aux_loss_coef": float(hf.get("router_aux_loss_coef") or 0.0) * top_k,
        "z_loss_coef": 0.0, "seq_aux_loss_coef": 0.0,
    }


def dmoe_values(hf: dict, where: str) -> dict:
    """The dmoe config sections (model, moe) that reproduce an HF config.json."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise HFError(f"{where}: model_type {family!r} is not supported; supported: "
                      f"{', '.join(ARCHITECTURES)}")

    def need(key: str) -> int:
        value = hf.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HFError(f"{where}: {key} ({value!r}) must be a positive integer")
        return value

    d_model, heads = need("hidden_size"), need("num_attention_heads")
    layers = need("num_hidden_layers")
    head_dim = hf.get("head_dim") or d_model // heads
    max_pos = int(hf.get("max_position_embeddings") or SEQ_LEN_CAP)
    seq_len = min(max_pos, SEQ_LEN_CAP)
    if seq_len < max_pos:
        log.info("model.seq_len = %d (the training window; the model takes %d positions: "
                 "raise it with --model.seq_len)", seq_len, max_pos)
    _check_plain(hf, where, seq_len)
    qkv_bias, bias = _attention_bias(hf, family, where)
    model = {
        "vocab_size": need("vocab_size"), "d_model": d_model, "n_layers": layers, "n_heads": heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": 0 if head_dim * heads == d_model else int(head_dim),
        "seq_len": seq_len, "ffn_dim": need("intermediate_size"), "positions": "rotary",
        "dropout": 0.0, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm": "rmsnorm", "norm_eps": float(hf.get("rms_norm_eps") or 1e-6),
        "bias": bias, "qkv_bias": qkv_bias, "qk_norm": family in ("qwen3", "qwen3_moe"),
        "rope_theta": _rope_theta(hf, family, where), "mlp_activation": "swiglu",
    }
    dense_moe = {"every": 1, "first_dense_layers": layers, "num_shared_experts": 0}
    has_experts = family in MOE_FAMILIES and (hf.get("num_experts", 1) != 0)
    moe = _moe_values(hf, family, layers, where) if has_experts else dense_moe
    moe.update(capacity_factor=None, eval_capacity_factor=None)  # dropless, as HF runs
    return {"model": model, "moe": moe}


# ---------------------------------------------------------------- export: dmoe -> config.json
def _refuse(option: str, value, why: str) -> HFError:
    return HFError(f"no Hugging Face family expresses {option} ({value}): {why}")


def _check_expressible(cfg: Config, has_moe: bool, has_dense: bool) -> None:
    m, e = cfg.model, cfg.moe
    if m.positions != "rotary":
        raise _refuse("model.positions", m.positions, "they all use rotary positions")
    if m.norm != "rmsnorm":
        raise _refuse("model.norm", m.norm, "they all use rmsnorm")
    if has_dense and m.mlp_activation != "swiglu":
        raise _refuse("model.mlp_activation", m.mlp_activation, "their MLPs are SwiGLU")
    if not has_moe:
        return
    checks = [("moe.activation", e.activation, "swiglu", "their experts are SwiGLU"),
              ("moe.score_func", e.score_func, "softmax", "their routers are softmax"),
              ("moe.route_scale", e.route_scale, 1.0, "their gates are not scaled"),
              ("moe.num_groups", e.num_groups, 1, "they have no group-limited routing"),
              ("moe.bias_update_rate", e.bias_update_rate, 0.0,
               "their routers have no loss-free choice bias"),
              ("model.bias", m.bias, False, "the MoE families have no output or MLP biases")]
    for option, value, plain, why in checks:
        if value != plain:
            raise _refuse(option, value, why)
    if e.num_shared_experts and not e.shared_expert_gate:
        raise _refuse("moe.shared_expert_gate", False,
                      "qwen2_moe, the family with a shared expert, always gates it")


def family_for(cfg: Config) -> str:
    """The HF family whose model computes what cfg's does (raises HFError naming the
    blocking dmoe option when none does)."""
    m, e = cfg.model, cfg.moe
    moe_blocks = [is_moe_block(cfg, i) for i in range(m.n_layers)]
    has_moe, has_dense = any(moe_blocks), not all(moe_blocks)
    _check_expressible(cfg, has_moe, has_dense)
    if not has_moe:
        if m.qk_norm:
            if m.bias or m.qkv_bias:
                raise _refuse("model.qkv_bias / model.bias", True,
                              "qwen3 (qk_norm) has no qkv-only bias and no MLP bias")
            return "qwen3"
        if m.qkv_bias and not m.bias:
            return "qwen2"
        return "llama"
    if e.num_shared_experts:
        if m.qk_norm:
            raise _refuse("model.qk_norm", True, "qwen2_moe, the family with a shared expert, has "
                          "no q/k norm")
        return "qwen2_moe"
    if m.qk_norm:
        if m.qkv_bias:
            raise _refuse("model.qkv_bias", True,
                          "qwen3_moe's attention_bias would also bias o_proj")
        return "qwen3_moe"
    if m.qkv_bias:
        raise _refuse("model.qkv_bias", True, "qwen2_moe (qkv bias) needs a gated shared expert "
                      "(moe.num_shared_experts)")
    if not (e.normalize_topk and e.top_k > 1):
        raise _refuse("moe.normalize_topk", e.normalize_topk if e.top_k > 1 else "top_k 1",
                      "mixtral renormalises top-k > 1 gates; qwen2_moe / qwen3_moe would need a "
                      "shared expert / model.qk_norm")
    if has_dense:
        raise _refuse("moe.every / moe.first_dense_layers", f"{e.every} / {e.first_dense_layers}",
                      "mixtral has no dense blocks; qwen2_moe / qwen3_moe would need a shared "
                      "expert / model.qk_norm")
    return "mixtral"


def hf_config(cfg: Config, family: str, dtype: str, token_ids: dict | None = None) -> dict:
    """config.json for `family` (from family_for); token_ids: bos/eos/pad ids to keep."""
    m, e = cfg.model, cfg.moe
    theta = float(m.rope_theta)
    out = {
        "architectures": [ARCHITECTURES[family]], "model_type": family,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "head_dim": m.head_dim or m.d_model // m.n_heads, "hidden_act": "silu",
        "max_position_embeddings": m.seq_len, "rms_norm_eps": m.norm_eps,
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": m.tie_embeddings, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "dtype": dtype,
        "bos_token_id": None, "eos_token_id": EOT_ID, "pad_token_id": None,
    }
    out.update({k: v for k, v in (token_ids or {}).items() if k in out})
    moe = {"num_experts_per_tok": e.top_k, "output_router_logits": False,
           "router_aux_loss_coef": e.aux_loss_coef / e.top_k}
    if family == "mixtral":
        out.update(moe, intermediate_size=e.expert_ffn_dim, num_local_experts=e.num_experts,
                   router_jitter_noise=e.router_jitter, sliding_window=None)
    elif family in ("qwen2_moe", "qwen3_moe"):
        out.update(moe, intermediate_size=m.ffn_dim, moe_intermediate_size=e.expert_ffn_dim,
                   num_experts=e.num_experts, norm_topk_prob=e.normalize_topk,
                   decoder_sparse_step=e.every, mlp_only_layers=list(range(e.first_dense_layers)),
                   use_sliding_window=False, max_window_layers=m.n_layers)
        if family == "qwen2_moe":
            shared = e.num_shared_experts * (e.shared_expert_ffn_dim or e.expert_ffn_dim)
            out.update(shared_expert_intermediate_size=shared, qkv_bias=m.qkv_bias)
        else:
            out.update(attention_bias=False)
    else:
        out.update(intermediate_size=m.ffn_dim)
        if family == "llama":
            out.update(attention_bias=m.bias, mlp_bias=m.bias, pretraining_tp=1)
        else:
            out.update(use_sliding_window=False, max_window_layers=m.n_layers)
            if family == "qwen3":
                out.update(attention_bias=False)
    return out
