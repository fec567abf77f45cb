"""The CUDA side of the expert matmuls, checked on CPU: what impl="auto" picks on CUDA,
torch._grouped_mm offsets on the rows' device, its row padding, moe.experts_impl."""
from types import SimpleNamespace

import pytest
import torch

from dmoe.config import ConfigError, load_config
from dmoe.model.transformer import MoETransformer
from dmoe.moe import experts as ex


def test_auto_on_cuda_picks_grouped_mm_for_bf16_on_sm90():
    w = (64, 128, 256)
    assert ex.pick_impl("cuda", torch.bfloat16, 512, 8, w, (9, 0)) == "torch_grouped_mm"
    assert ex.pick_impl("cuda", torch.bfloat16, 512, 8, w, (10, 0)) == "torch_grouped_mm"
    assert ex.pick_impl("cuda", torch.bfloat16, 512, 8, w, (8, 0)) == "loop"
    assert ex.pick_impl("cuda", torch.float32, 512, 8, w, (9, 0)) == "loop"
    assert ex.pick_impl("cuda", torch.bfloat16, 0, 8, w, (9, 0)) == "loop"
    assert ex.pick_impl("cuda", torch.bfloat16, 512, 8, (60, 128, 256), (9, 0)) == "loop"


def test_resolve_impl_asks_the_rows_device_capability(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: seen.append(d) or (9, 0))
    experts = ex.GroupedExperts(4, 64, 128)
    rows = SimpleNamespace(device=torch.device("cuda", 3), shape=(256, 64))
    assert experts.resolve_impl(rows, [64] * 4, torch.bfloat16) == "torch_grouped_mm"
    assert experts.resolve_impl(rows, [64] * 4, torch.float32) == "loop"
    assert seen[0] == torch.device("cuda", 3)


def test_grouped_mm_offsets_on_the_rows_device(monkeypatch):
    calls = []

    def fake(x, w, offs):
        calls.append((offs.device, offs.dtype, offs.tolist() if offs.device.type == "cpu" else None))
        return x.new_empty(x.shape[0], w.shape[2])

    monkeypatch.setattr(torch, "_grouped_mm", fake)
    x, w = torch.empty(10, 8, device="meta"), torch.empty(3, 8, 16, device="meta")
    assert ex.torch_grouped_mm(x, w, [3, 0, 7], row_multiple=8).shape == (10, 16)
    assert calls[-1][:2] == (torch.device("meta"), torch.int32)
    ex.torch_grouped_mm(torch.randn(10, 8), torch.randn(3, 8, 16), [3, 0, 7], row_multiple=8)
    assert calls[-1] == (torch.device("cpu"), torch.int32, [8, 8, 16])  # padded cumulative ends


@pytest.mark.parametrize("counts", [[3, 0, 7, 6], [8, 8, 0, 0], [1, 1, 1, 13]])
def test_padded_grouped_mm_matches_the_loop(counts):
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 8, requires_grad=True)
    w = torch.randn(len(counts), 8, 16, requires_grad=True)
    y = ex.torch_grouped_mm(x, w, counts, row_multiple=8)
    ref = ex.grouped_mm(x, w, counts)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def _model(*extra):
    cfg = load_config(None, ["--model.vocab_size=32", "--model.d_model=16", "--model.n_heads=4",
                             "--model.n_layers=2", "--moe.num_experts=4", "--moe.expert_ffn_dim=16",
                             *extra])
    return MoETransformer(cfg)


def test_experts_impl_config_key_reaches_the_experts():
    impls = {m.impl for m in _model("--moe.experts_impl=loop").modules()
             if isinstance(m, ex.GroupedExperts)}
    assert impls == {"loop"}
    assert {m.impl for m in _model().modules() if isinstance(m, ex.GroupedExperts)} == {"auto"}
    with pytest.raises(ConfigError):
        load_config(None, ["--moe.experts_impl=cuda"])
