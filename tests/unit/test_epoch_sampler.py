"""Epoch sampler: every window once per epoch across DP ranks, rank-disjoint, resumable."""
import numpy as np
import pytest

from dmoe.data.sampler import epoch_batch, epoch_position, epoch_window_ids

N, SEQ, B, DP, SEED = 16 * 50 + 1, 16, 3, 4, 5  # 50 windows; 4 global batches of 12 per epoch


def test_each_window_once_per_epoch_across_ranks():
    for epoch in range(3):
        seen = [w for s in range(4 * epoch, 4 * epoch + 4) for r in range(DP)
                for w in epoch_window_ids(N, SEQ, B, SEED, s, r, DP)]
        assert len(seen) == len(set(seen)) == 48 and max(seen) < 50
    first = epoch_window_ids(N, SEQ, B, SEED, 0, 0, DP)
    assert not np.array_equal(first, epoch_window_ids(N, SEQ, B, SEED, 4, 0, DP))  # reshuffled


def test_resume_continues_where_it_stopped():
    assert epoch_position(N, SEQ, B, DP, 9) == (2, 1)
    tokens = np.arange(N, dtype=np.uint16)
    x, y = epoch_batch(tokens, B, SEQ, SEED, 9, 2, DP)
    starts = epoch_window_ids(N, SEQ, B, SEED, 9, 2, DP) * SEQ
    assert x[:, 0].tolist() == starts.tolist() and (y - x == 1).all()


def test_too_little_data_is_one_line():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epoch_window_ids(16 * 5 + 1, SEQ, B, SEED, 0, 0, DP)
