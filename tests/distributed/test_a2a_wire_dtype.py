"""Under bf16 autocast the expert-parallel all-to-alls carry bf16 rows (half the bytes of
the fp32 residual stream) and combine returns the tokens' dtype; without autocast nothing
changes."""
import pytest
import torch

from dmoe.moe.dispatcher import CapacitySettings
from dmoe.moe.layer import MoELayer
from dmoe.parallel import comm_trace
from dmoe.parallel.expert_parallel.apply import shard_moe_layer
from tests._dist import run_ranks


def _run(rank, world, dedup, chunks=1):
    sent = []
    real = comm_trace.all_to_all_single

    def spy(out, inp, *args, tag=None, **kw):
        if tag is not None and tag.name in ("a2a_dispatch", "a2a_combine"):
            sent.append((tag.name, inp.dtype))
        return real(out, inp, *args, tag=tag, **kw)

    comm_trace.all_to_all_single = spy
    torch.manual_seed(0)
    layer = shard_moe_layer(MoELayer(16, 4, 2, 32, CapacitySettings(None, None, 0, "position")), dedup=dedup,
                            chunks=chunks)
    x = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    y_ref, _ = layer(x)
    plain = list(sent)
    sent.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    y.float().sum().backward()
    err = float((y.float() - y_ref).abs().max() / y_ref.abs().max())
    return plain, sent, y.dtype, err


@pytest.mark.parametrize("dedup,chunks", [(False, 1), (True, 1), (False, 2)])
def test_bf16_autocast_sends_bf16(dedup, chunks):
    # chunks: the overlapped path (parallel.a2a_chunks) sends its chunks in bf16 too
    for plain, sent, y_dtype, err in run_ranks(_run, 2, args=(dedup, chunks), timeout=90):
        assert {d for _, d in plain} == {torch.float32}
        assert {n for n, _ in sent} == {"a2a_dispatch", "a2a_combine"}
        assert {d for _, d in sent} == {torch.bfloat16}
        assert y_dtype == torch.float32 and err < 3e-2
