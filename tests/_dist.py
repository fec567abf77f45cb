"""Run a function on N real processes joined by a gloo process group (CPU).

    results = run_ranks(fn, world_size=4, args=(...))   # fn(rank, world_size, *args)

Ranks are forked (cheap: no re-import), join over a FileStore, run with one thread each,
and send back fn's return value (torch tensors allowed) or their traceback. The first
failing rank's traceback is raised in the parent; a rank that hangs past `timeout`
fails the test instead of hanging the suite.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import traceback

import torch
import torch._dynamo  # noqa: F401  (import once in the parent: forked ranks skip ~3 s)
import torch.distributed as dist


class RankFailed(AssertionError):
    pass


def _worker(rank, world_size, store_path, fn, args, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(result, buf)  # plain bytes: no shared-memory handles outlive the rank
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, args: tuple = (), timeout: float = 120.0) -> list:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, store_path, fn, args, queue), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results, failures = {}, []
        try:
            for _ in range(world_size):
                try:
                    rank, ok, payload = queue.get(timeout=timeout)
                except queue_mod.Empty:
                    missing = sorted(set(range(world_size)) - set(results) - {f[0] for f in failures})
                    raise RankFailed(f"ranks {missing} did not finish within {timeout:.0f}s") from None
                if ok:
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    failures.append((rank, payload))
                    break  # other ranks are likely blocked in a collective with this one
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
        if failures:
            rank, tb = failures[0]
            raise RankFailed(f"rank {rank} failed:\n{tb}")
        return [results[r] for r in range(world_size)]
