"""dmoe.model.memory: activations against what autograd actually saves for backward (a
saved-tensors hook summing distinct storages), parameters per rank against the counts."""
import pytest
import torch

from dmoe.config import load_config
from dmoe.model.flops import count_params
from dmoe.model.memory import activation_bytes, estimate_memory, params_per_rank
from dmoe.model.transformer import MoETransformer
from dmoe.parallel.layout import ParallelLayout
from dmoe.startup.precision import DeviceFacts


def _saved_bytes(cfg) -> int:
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    idx = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(saved.values())


@pytest.mark.parametrize("preset", ["default", "mixtral-tiny", "deepseek-tiny"])
def test_activation_estimate_within_15_percent_of_saved_tensors(preset):
    cfg = load_config(preset, ["--train.micro_batch_size=2", "--model.seq_len=64"])
    measured, estimate = _saved_bytes(cfg), activation_bytes(cfg)
    assert abs(estimate - measured) <= 0.15 * measured, (estimate, measured)


def test_params_per_rank_follow_the_layout():
    cfg = load_config("default")
    counts = count_params(cfg)
    assert params_per_rank(cfg, ParallelLayout(1)) == (counts.dense, counts.expert)
    dense, expert = params_per_rank(cfg, ParallelLayout(4, ep=2))
    assert (dense, expert) == (counts.dense, counts.expert // 2)
    dense_tp, _ = params_per_rank(cfg, ParallelLayout(2, tp=2))
    assert counts.dense // 2 < dense_tp < counts.dense  # norms and the router stay whole


def test_zero_splits_optimizer_state_and_grads():
    cfg = load_config("default", ["--train.zero_stage=2"])
    layout = ParallelLayout(4, ep=2)  # dp 4, edp 2
    torch_engine, ds = estimate_memory(cfg, layout, "torch"), estimate_memory(cfg, layout, "deepspeed")
    n = torch_engine.dense_params + torch_engine.expert_params
    assert torch_engine.optimizer == 8 * n and torch_engine.grads == 4 * n
    split = torch_engine.dense_params / 4 + torch_engine.expert_params / 2
    assert ds.optimizer == int(12 * split) and ds.grads == int(4 * split)


@pytest.mark.parametrize("facts,resolved", [
    (DeviceFacts(cuda=True, bf16=True, name="H100"), "bf16"),
    (DeviceFacts(cuda=True, bf16=False, name="V100"), "fp32"),
    (DeviceFacts(cuda=False), "fp32"),
])
def test_auto_precision_estimated_as_the_run_resolves_it(facts, resolved):
    auto = load_config("default", ["--train.precision=auto"])
    explicit = load_config("default", [f"--train.precision={resolved}"])
    unlike = "fp32" if resolved == "bf16" else "bf16"
    other = load_config("default", [f"--train.precision={unlike}"])
    layout = ParallelLayout(2)
    assert activation_bytes(auto, facts=facts) == activation_bytes(explicit, facts=facts)
    assert activation_bytes(auto, facts=facts) != activation_bytes(other, facts=facts)
    est = estimate_memory(auto, layout, "deepspeed", facts=facts)
    assert est == estimate_memory(explicit, layout, "deepspeed", facts=facts)
