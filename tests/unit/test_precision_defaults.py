"""train.precision=auto and moe.expert_dtype=auto: the choice from injected device facts
(no GPU needed), and bf16 experts that make no fp32 copy."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dmoe.config import load_config
from dmoe.model.transformer import MoETransformer
from dmoe.moe.experts import GroupedExperts
from dmoe.startup.precision import DeviceFacts, choose_precision, resolve_precision

H100 = DeviceFacts(cuda=True, bf16=True, name="NVIDIA H100")
V100 = DeviceFacts(cuda=True, bf16=False, name="Tesla V100")
CPU = DeviceFacts(cuda=False)


@pytest.mark.parametrize(
    "requested, facts, precision, tf32, words",
    [
        ("auto", H100, "bf16", False, "auto: NVIDIA H100 supports bf16"),
        ("auto", V100, "fp32", True, "TF32 matmuls (train.precision=auto: Tesla V100 has no bf16)"),
        ("auto", CPU, "fp32", False, "auto on the CPU"),
        ("fp32", H100, "fp32", False, "TF32 off"),
        ("fp32", CPU, "fp32", False, "precision fp32 (train.precision=fp32)"),
        ("bf16", V100, "bf16", False, "train.precision=bf16"),
        ("bf16", CPU, "bf16", False, "train.precision=bf16"),
    ],
)
def test_choose_precision(requested, facts, precision, tf32, words):
    got, got_tf32, why = choose_precision(requested, facts)
    assert (got, got_tf32) == (precision, tf32)
    assert words in why and why.startswith(f"precision {precision}")


def test_resolve_precision_sets_tf32_only_on_cuda():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert resolve_precision("auto", CPU)[0] == "fp32"
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert resolve_precision("auto", V100)[0] == "fp32"
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert resolve_precision("fp32", H100)[0] == "fp32"
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _model(*overrides):
    cfg = load_config(
        None,
        [
            "--model.d_model=16",
            "--model.n_layers=2",
            "--model.n_heads=2",
            "--model.seq_len=8",
            "--model.ffn_dim=32",
            "--model.vocab_size=32",
            "--moe.num_experts=4",
            "--moe.expert_ffn_dim=16",
            "--moe.every=1",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return MoETransformer(cfg)


def _experts(model):
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


@pytest.mark.parametrize(
    "overrides, dtype",
    [
        ([], torch.float32),  # train.precision auto = fp32 on the CPU
        (["--train.precision=bf16"], torch.bfloat16),
        (["--train.precision=fp32"], torch.float32),
        (["--train.precision=bf16", "--moe.expert_dtype=float32"], torch.float32),  # explicit kept
        (["--train.precision=fp32", "--moe.expert_dtype=bfloat16"], torch.bfloat16),
    ],
)
def test_expert_dtype_auto_follows_precision(overrides, dtype):
    experts = _experts(_model(*overrides))
    assert len(experts) == 2 and all(e.compute_dtype == dtype for e in experts)


class Float32Outputs(TorchDispatchMode):
    """Records every op that produces a float32 tensor."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in outs):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("expert_dtype, copies", [("auto", False), ("float32", True)])
@pytest.mark.filterwarnings("ignore:moe.expert_dtype=bfloat16")
def test_bf16_experts_make_no_fp32_copy(expert_dtype, copies):
    """Under DeepSpeed bf16 the weights are bf16 (module.bfloat16()) and so are the rows:
    auto computes in bf16 with no fp32 tensor anywhere in forward or backward; the old
    default (float32) upcasts weights and rows on every forward."""
    experts = _experts(_model("--train.precision=bf16", f"--moe.expert_dtype={expert_dtype}"))[0]
    experts.bfloat16()
    x = torch.randn(10, 16, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(10, 16, dtype=torch.bfloat16)
    with Float32Outputs() as seen:
        y = experts(x, [3, 0, 5, 2])
        (y * g).sum().backward()  # in bf16: the test itself makes no fp32 tensor
    assert y.dtype == torch.bfloat16 and experts.w1.grad.dtype == torch.bfloat16
    if copies:
        assert seen.ops.count("aten._to_copy.default") >= 3, seen.ops  # x, w1, w2 upcast
    else:
        assert seen.ops == [], seen.ops
