"""The combine's row blocks: L2-sized on CPU, one block on CUDA (kernel launches per layer)."""
import torch

from dmoe.moe.dispatcher import combine_block_rows, combine_rows


def test_block_rows_per_device():
    assert combine_block_rows(8192, 4096 * 4, "cpu") == 32  # 512 KiB of fp32 rows at D=4096
    assert combine_block_rows(8192, 4096 * 2, "cuda") == 8192
    assert combine_block_rows(0, 4096 * 2, "cuda") == 1
    assert combine_block_rows(10, 10**9, "cpu") == 1


def test_combine_matches_index_add_in_one_block(monkeypatch):
    import dmoe.moe.dispatcher as d

    torch.manual_seed(0)
    y, gate = torch.randn(50, 8, dtype=torch.double), torch.rand(50, dtype=torch.double)
    idx = torch.randint(0, 20, (50,))
    ref = torch.zeros(20, 8, dtype=torch.double).index_add_(0, idx, y * gate[:, None])
    monkeypatch.setattr(d, "combine_block_rows", lambda n, b, t: max(1, n))  # the CUDA choice
    torch.testing.assert_close(combine_rows(y, idx, gate, 20), ref)
