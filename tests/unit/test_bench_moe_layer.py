"""bench/moe_layer.py's peer handling and device plumbing (no timing is asserted)."""
import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import moe_common
import moe_layer


def test_torchtitan_absent_is_one_line_and_none(monkeypatch, tmp_path, capsys):
    if importlib.util.find_spec("torchtitan") is not None:
        pytest.skip("torchtitan importable without the peers dir")
    monkeypatch.setattr(moe_common, "PEERS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert moe_common.import_torchtitan() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "install_peers.sh" in err[0]


def test_probe_drops_a_raising_peer_off_the_cpu(capsys):
    def boom():
        raise RuntimeError("grouped_mm: no kernel for this dtype\nsecond line")

    fns = {"dmoe": lambda: None, "torchtitan": boom, "limit_linear": lambda: None}
    params = {name: [] for name in fns}
    errors = moe_layer.probe_peers(fns, params, torch.device("cuda"))
    assert errors == {"torchtitan": "RuntimeError: grouped_mm: no kernel for this dtype"}
    assert set(fns) == {"dmoe", "limit_linear"}
    assert "torchtitan: dropped" in capsys.readouterr().err
    # on the CPU nothing is probed (every peer is known to run there)
    fns["torchtitan"], params["torchtitan"] = boom, []
    assert moe_layer.probe_peers(fns, params, torch.device("cpu")) == {}


def test_timed_syncs_around_every_rep():
    events = []
    fns = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    _, _, _, reps = moe_layer.timed(fns, {"a": [], "b": []}, warmup=1, budget_s=0.0,
                                    min_reps=2, max_reps=2, sync=lambda: events.append("sync"))
    assert reps == 2
    calls = [e for e in events if e != "sync"]
    assert len(calls) == 6  # (1 warm-up + 2 reps) x 2
    for i, e in enumerate(events):  # every call is between two syncs
        if e != "sync":
            assert events[i - 1] == "sync" and events[i + 1] == "sync"


def test_device_flag_in_help_as_gpu_check_expects(capsys):
    with pytest.raises(SystemExit):
        moe_layer.main(["--help"])
    assert "--device" in capsys.readouterr().out


@pytest.mark.parametrize("k", [1, 2])
def test_torchtitan_peer_computes_what_dmoe_does(k):
    """Same router and expert weights, dropless: same outputs and weight gradients."""
    if moe_common.import_torchtitan() is None:
        pytest.skip("torchtitan (a benchmark-only peer, bench/install_peers.sh) not installed")
    torch.manual_seed(0)
    layer = moe_common.build_dmoe(8, k, None, d_ff=64)
    titan = moe_common.build_torchtitan(layer, k)
    x = torch.randn(1, 64, moe_common.D_MODEL, generator=torch.Generator().manual_seed(1))
    grad = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = moe_common.layer_step(layer, x1, grad, False)
    y2 = moe_common.layer_step(titan, x2, grad, "titan")
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    inner = titan.routed_experts.inner_experts
    torch.testing.assert_close(layer.experts.w1.grad, inner.w1_EFD.grad.transpose(1, 2),
                               rtol=1e-4, atol=1e-5)


def test_saved_bytes_counts_distinct_storages_kept_for_backward():
    a = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)

    def step():  # mm keeps a and w (left out), exp keeps its output once, mul keeps it again
        e = (a @ w).exp()
        (e * e).sum().backward()

    assert moe_common.saved_bytes(step, [a, w]) == 4 * 16 * 4
    assert moe_common.saved_bytes(step, []) == (4 * 8 + 8 * 16 + 4 * 16) * 4
