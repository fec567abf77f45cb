"""The HTML reports: matplotlib figures embedded, the tune report's warnings on crafted grids
(recommendation at an edge, a layer missing the target), its timed-runs heading, and the
bench-comm report."""
import base64
import io
import logging
import re
import types

import matplotlib.image
import pytest

from dmoe.config import load_config
from dmoe.tools import html_report as H
from dmoe.tools.bench_comm import report_html
from dmoe.tools.tune_report import sections, tune_warnings, write_outputs

FACTORS = [1.0, 1.25, 1.5, 2.0]


def _res(drop, per_layer, recommended, **extra):
    timed = {1.0: {"step_s": 0.02, "tokens_per_s": 5000.0, "measured_drop": 0.1},
             2.0: {"step_s": 0.03, "tokens_per_s": 4000.0, "measured_drop": 0.0}}
    return {"factors": FACTORS, "drop": drop, "drop_per_layer": per_layer, "recommended": recommended,
            "a2a_bytes_per_step": [1e6, 1.2e6, 1.4e6, 1.8e6], "eval_factor": 2.0, "eval_drop": 0.0,
            "eval_drop_grid": None, "records": 8, "recorded_factor": 1.25, "timed": timed, **extra}


def _images(html: str) -> list:
    return [matplotlib.image.imread(io.BytesIO(base64.b64decode(b)), format="png")
            for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]


def test_recommendation_inside_the_grid_has_no_warning():
    res = _res([0.2, 0.05, 0.005, 0.0], [[0.2, 0.2], [0.05, 0.05], [0.004, 0.006], [0, 0]], 1.5)
    assert tune_warnings(res, 0.01) == []


def test_recommendation_at_the_top_edge():
    res = _res([0.2, 0.1, 0.05, 0.004], [[0.2, 0.2], [0.1, 0.1], [0.05, 0.05], [0.004, 0.004]], 2.0)
    assert tune_warnings(res, 0.01) == [
        ("the recommended factor 2 is the largest in the grid: only it meets the target; add factors "
        "between 1.5 and 2 to find a smaller one")]


def test_recommendation_at_the_bottom_edge_and_a_layer_missing_the_target():
    res = _res([0.009, 0.004, 0.0, 0.0], [[0.002, 0.016], [0, 0.008], [0, 0], [0, 0]], 1.0)
    assert tune_warnings(res, 0.01) == [
        ("the recommended factor 1 is the smallest in the grid: a smaller factor may meet the target "
        "too; extend --factors downward"),
        "moe1 drops 1.60% at factor 1, above the target 1.00% (the overall drop meets it)"]


def test_no_factor_meets_the_target():
    res = _res([0.3, 0.2, 0.1, 0.05], [[0.3, 0.3], [0.2, 0.2], [0.1, 0.1], [0.05, 0.05]], None)
    assert tune_warnings(res, 0.01) == [
        ("no factor in the grid meets the target drop 1.00% (overall drop 5.00% at the largest, 2): "
        "extend --factors upward or train dropless (moe.capacity_factor=0)")]


def test_tune_report_html_has_figures_warning_and_model(tmp_path, caplog):
    res = _res([0.2, 0.1, 0.05, 0.004], [[0.2, 0.2], [0.1, 0.1], [0.05, 0.05], [0.004, 0.004]], 2.0,
               model="default.yaml: 4 layers", resumed_from={"checkpoint": "runs/x/checkpoints/step_000040",
                                                              "step": 40})
    args = types.SimpleNamespace(target_drop=0.01)
    html = "".join(sections(res, args))
    assert "is the largest in the grid" in html and "class='warn'" in html
    assert ("Timed runs: default.yaml: 4 layers, resumed from runs/x/checkpoints/step_000040 step 40"
            in html)
    assert "<tr class='hl'><td>2</td>" in html  # the recommended row is highlighted
    images = _images(html)
    assert len(images) == 3 and all(im.shape[0] > 150 and im.shape[1] > 300 for im in images)
    # write_outputs logs the warning too
    with caplog.at_level(logging.WARNING, logger="dmoe.tools.tune_report"):
        write_outputs(res, load_config(None, []), args, tmp_path)
    assert "tune-capacity: the recommended factor 2 is the largest in the grid" in caplog.text
    assert "Timed runs: default.yaml" in (tmp_path / "report.html").read_text()


def test_fresh_model_heading():
    res = _res([0.2, 0.05, 0.005, 0.0], [[0.2], [0.05], [0.005], [0]], 1.5, model="m")
    html = "".join(sections(res, types.SimpleNamespace(target_drop=0.01)))
    assert "Timed runs: m, a fresh model (measured drop)" in html


@pytest.mark.parametrize("experts", [8, 128, 256])
def test_heatmap_is_a_png_with_room_for_many_experts(experts):
    rows = [[(e * 7 + layer) % 11 + 1 for e in range(experts)] for layer in range(4)]
    (im,) = _images(H.heatmap(rows, [f"moe{i}" for i in range(4)], "load"))
    assert im.shape[1] >= (450 if experts <= 16 else 800)  # pixels: wider for many experts


def test_bench_comm_report():
    rows = [{"group_size": 2, "bytes": b, "time_us": 10.0 * b / 4096, "algbw_gbps": 0.4,
             "busbw_gbps": 0.2} for b in (4096, 16384, 65536)]
    html = report_html(rows, "gloo", 2)
    assert len(_images(html)) == 2 and "backend gloo, world size 2" in html and "64K" in html


@pytest.mark.parametrize("experts,cell_texts", [(8, 16), (16, 32), (17, 0), (128, 0)])
def test_heatmap_cell_numbers_only_for_few_experts(monkeypatch, experts, cell_texts):
    from matplotlib.axes import Axes

    calls = []
    original = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    H.heatmap([[1.0] * experts, [2.0] * experts], ["moe0", "moe1"], "load")
    assert len(calls) == cell_texts  # 2 layers x experts cells, or none above 16 experts
