"""Batch samplers over a token array: random windows (data.sampler=random) and epochs of
non-overlapping windows across DP ranks (data.sampler=epoch). Both are pure functions of
(seed, step, rank) returning x, y int64 [batch, seq_len]: resumable, no loader state.

The training tokens are cut into non-overlapping windows of seq_len + 1 tokens. Each epoch
is a permutation of the windows (seeded by (seed, epoch)); step s of an epoch takes the
next batch * dp windows of it, and DP rank d takes its own `batch` of them. So every
window is used once per epoch across the ranks (the last partial global batch is
dropped), a rank reads only its windows, and the position is a pure function of the step:
resuming at step N continues exactly where the run stopped. No communication.
"""
from __future__ import annotations

import numpy as np
import torch


def epoch_position(n_tokens: int, seq_len: int, batch: int, dp: int, step: int) -> tuple[int, int]:
    """(epoch, batch index within the epoch) of a global step (0-based)."""
    windows = (n_tokens - 1) // seq_len
    per_epoch = windows // (batch * dp)
    if per_epoch < 1:
        raise ValueError(f"{windows} windows of model.seq_len ({seq_len}) are fewer than one "
                         f"global batch (train.micro_batch_size {batch} x dp {dp})")
    return divmod(step, per_epoch)


def epoch_window_ids(n_tokens: int, seq_len: int, batch: int, seed: int, step: int,
                     rank: int, dp: int) -> np.ndarray:
    """Indices of the windows DP rank `rank` trains on at `step`."""
    epoch, i = epoch_position(n_tokens, seq_len, batch, dp, step)
    order = np.random.default_rng([seed, epoch]).permutation((n_tokens - 1) // seq_len)
    first = (i * dp + rank) * batch
    return order[first:first + batch]


def epoch_batch(tokens: np.ndarray, batch: int, seq_len: int, seed: int, step: int, rank: int,
                dp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as sample_batch (x, y int64 of [batch, seq_len]), epoch order."""
    ids = epoch_window_ids(len(tokens), seq_len, batch, seed, step, rank, dp)
    window = np.stack([tokens[w * seq_len: w * seq_len + seq_len + 1] for w in ids]).astype(np.int64)
    return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])


def sample_batch(tokens: np.ndarray, batch: int, seq_len: int, seed: int, step: int, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows, a pure function of (seed, step, rank): resumable, no loader state."""
    g = np.random.default_rng([seed, step, rank])
    starts = g.integers(0, len(tokens) - seq_len - 1, size=batch)
    window = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    x = torch.from_numpy(window[:, :-1])
    y = torch.from_numpy(window[:, 1:])
    return x, y
