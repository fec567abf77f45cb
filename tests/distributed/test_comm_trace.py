"""The comm recorder on a real 2-rank EP run: byte counts equal what the routing implies.

Each rank routes different tokens through the same MoE layer (float32, D=6). The kept
rows each rank sends to peer j are the kept rows of j's experts (kept_E reshaped by owner),
so the dispatch all-to-all must record exactly kept_rows_j * D * 4 bytes to peer j, the
combine the mirror image, and backward the same two with directions swapped.
"""
import torch
import torch.distributed as dist

from dmoe.moe.dispatcher import CapacitySettings
from dmoe.moe.layer import MoELayer
from dmoe.parallel import comm_trace
from dmoe.parallel.comm_trace import CommRecorder
from dmoe.parallel.expert_parallel.apply import shard_moe_layer
from tests._dist import run_ranks

T, D, E = 40, 6, 4


def _run(rank, world):
    torch.manual_seed(0)
    layer = MoELayer(D, E, 2, 8, CapacitySettings(1.0, 1.0, 0, "position"))
    with torch.no_grad():
        layer.router.gate.weight[0] += 0.5  # skewed: capacity drops something
    shard_moe_layer(layer, None)
    layer.dispatcher.layer_id = 3
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(10 + rank), requires_grad=True)
    y_off, _ = layer(x)
    rec = CommRecorder(measure_wait=True)
    with comm_trace.recording(rec):
        rec.start_step(7)
        y, stats = layer(x)
        y.sum().backward()
        events = rec.end_step()
    kept_all = [torch.zeros_like(stats.kept_E) for _ in range(world)]
    dist.all_gather(kept_all, stats.kept_E)
    return {"events": [e.to_dict() for e in events], "kept_E": stats.kept_E, "routed_E": stats.routed_E,
            "kept_all": kept_all, "same": torch.equal(y_off, y)}


def test_byte_counts_match_routing():
    results = run_ranks(_run, world_size=2)
    for rank, r in enumerate(results):
        assert r["same"]  # recording changes nothing
        assert r["routed_E"].sum() > r["kept_E"].sum()  # capacity dropped rows
        send_rows = r["kept_E"].view(2, 2).sum(1).tolist()  # rows to owner of experts 0-1, 2-3
        recv_rows = [other["kept_E"].view(2, 2).sum(1)[rank].item() for other in results]
        ev = {(e["name"], e["phase"]): e for e in r["events"]}
        assert all(e["step"] == 7 and e["layer"] == 3 and e["group"] == "world" for e in r["events"])
        d = ev[("a2a_dispatch", "fwd")]
        assert d["send_bytes"] == [n * D * 4 for n in send_rows]
        assert d["recv_bytes"] == [n * D * 4 for n in recv_rows]
        assert d["size_bytes"] == sum(send_rows) * D * 4 and d["seconds"] > 0
        c = ev[("a2a_combine", "fwd")]
        assert c["send_bytes"] == d["recv_bytes"] and c["recv_bytes"] == d["send_bytes"]
        assert ev[("a2a_dispatch", "bwd")]["send_bytes"] == d["recv_bytes"]
        assert ev[("a2a_combine", "bwd")]["send_bytes"] == d["send_bytes"]
        # per peer: 2 local experts' counts + the 4-field header (layer id, D, dtype, local
        # experts) that every rank checks before rows move; int64
        assert ev[("a2a_counts", "fwd")]["send_bytes"] == [(2 + 4) * 8, (2 + 4) * 8]
        waits = [e for e in r["events"] if e["op"] == "barrier"]
        assert len(waits) == 5  # before counts, dispatch, combine and the two backward ones


def test_no_recorder_records_nothing():
    assert comm_trace.active() is None
    rec = CommRecorder()
    with comm_trace.recording(rec):
        assert comm_trace.active() is rec
        with comm_trace.paused():
            assert comm_trace.active() is None
    assert comm_trace.active() is None
