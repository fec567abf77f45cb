"""impl="auto" on CPU: nearest measured shape, fastest allowed formulation (hand-made tables,
so the rule is tested apart from this machine's measurements)."""
import torch

from dmoe.moe import experts as ex
from dmoe.moe import impl_table

TABLE = {  # (rows per expert, experts, d_model, d_ff) -> ms of (fused, loop, torch_grouped_mm)
    (64, 128, 256, 1024): (30.0, 20.0, 10.0),
    (1024, 8, 256, 1024): (10.0, 20.0, 30.0),
    (256, 32, 256, 256): (20.0, 10.0, 30.0),
}


def test_nearest_shape_and_allowed(monkeypatch):
    monkeypatch.setattr(impl_table, "CPU_TABLE", TABLE)
    near = impl_table.nearest_cpu_impl
    assert near(64, 128, 256, 1024) == "torch_grouped_mm"
    assert near(48, 96, 256, 1024) == "torch_grouped_mm"  # nearest: (64, 128)
    assert near(2048, 8, 256, 1024) == "fused"
    assert near(1024, 4, 256, 1024) == "fused"
    assert near(256, 32, 256, 256) == "loop"
    assert near(256, 32, 256, 320) == "loop"  # the d_ff 256 bucket is nearer
    # rows and experts are matched within the nearest bucket only: (256, 32, 256, 256) is
    # nearer in those two but lies in another bucket; the two d_ff 1024 entries tie (4 vs 4)
    # and the first listed wins
    assert near(256, 32, 256, 1024) == "torch_grouped_mm"
    assert near(64, 128, 256, 1024, ("fused", "loop")) == "loop"


def test_pick_impl_uses_the_table_on_cpu(monkeypatch):
    monkeypatch.setattr(impl_table, "CPU_TABLE", TABLE)
    w = (256, 1024, 1024)
    assert ex.pick_impl("cpu", torch.float32, 64 * 128, 128, w) == "torch_grouped_mm"
    assert ex.pick_impl("cpu", torch.float32, 1024 * 8, 8, w) == "fused"
    assert ex.pick_impl("cpu", torch.float64, 64 * 128, 128, w) == "loop"  # no fp64 _grouped_mm
    assert ex.pick_impl("cpu", torch.float32, 64 * 128, 128, (60, 1024, 1024)) == "loop"  # unaligned
    assert ex.pick_impl("cpu", torch.float32, 0, 128, w) == "fused"  # _grouped_mm refuses empty


def test_table_is_well_formed():
    assert impl_table.CPU_TABLE and impl_table.MEASURED_ON
    for shape, times in impl_table.CPU_TABLE.items():
        assert len(shape) == 4 and len(times) == len(impl_table.IMPL_ORDER)
        assert all(t > 0 for t in times)
