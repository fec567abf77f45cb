"""Pure split arithmetic of the chunked (overlapped) all-to-all pipeline: no tensors, no groups.

Shape legend: S ranks of the EP group, L local experts per rank.

Each (sender, receiver) block of rows is cut into `chunks` pieces by row position,
piece i = rows [n*i // chunks, n*(i+1) // chunks) of a block of n rows, and chunk i moves
piece i of every block in one all-to-all. Both sides know every block's n after the
count exchange, so they cut identically without further communication. A piece may
straddle local experts: `recv_counts_SL` says how many of its rows each expert owns.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    send_splits: list[int]  # rows this rank sends to each rank in this chunk
    recv_splits: list[int]  # rows it receives from each rank
    recv_counts_SL: list[list[int]]  # received rows per (source, local expert)
    send_ranges: list[tuple[int, int]]  # per destination: [start, end) in the sent (unchunked) order


def piece(n: int, i: int, chunks: int) -> tuple[int, int]:
    """Rows [start, end) of piece i of a block of n rows."""
    return n * i // chunks, n * (i + 1) // chunks


def _cut_counts(counts_L: list[int], start: int, end: int) -> list[int]:
    """Rows of [start, end) that fall in each expert's run of a block ordered by expert."""
    out, first = [], 0
    for n in counts_L:
        out.append(max(0, min(end, first + n) - max(start, first)))
        first += n
    return out


def plan_chunks(send_SL: list[list[int]], recv_SL: list[list[int]], chunks: int) -> list[Chunk]:
    """send_SL[j][l]: rows this rank sends to rank j's local expert l (in that order);
    recv_SL[s][l]: rows it receives from rank s for its own local expert l."""
    if chunks < 1:
        raise ValueError(f"parallel.a2a_chunks ({chunks}) must be >= 1")
    send_n = [sum(row) for row in send_SL]
    recv_n = [sum(row) for row in recv_SL]
    offsets = [sum(send_n[:j]) for j in range(len(send_n))]
    plan = []
    for i in range(chunks):
        sends = [piece(n, i, chunks) for n in send_n]
        recvs = [piece(n, i, chunks) for n in recv_n]
        plan.append(Chunk(
            send_splits=[b - a for a, b in sends],
            recv_splits=[b - a for a, b in recvs],
            recv_counts_SL=[_cut_counts(row, a, b) for row, (a, b) in zip(recv_SL, recvs)],
            send_ranges=[(off + a, off + b) for off, (a, b) in zip(offsets, sends)],
        ))
    return plan
