"""A self-contained HTML report: matplotlib figures embedded as base64 PNG, one file that
opens in any browser.

    html = page("dmoe profile", [section("Plots", plots(lines(...), heatmap(...)))])
    Path("report.html").write_text(html)

Figures use matplotlib's object API (Figure, no pyplot: no global backend or state) and
stay readable from a handful to hundreds of experts: heatmaps get a colour bar, cell text
only up to CELL_TEXT_MAX columns, and thinned ticks beyond that.
"""
from __future__ import annotations

import base64
import html as _html
import io

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f")
CELL_TEXT_MAX = 16  # more columns than this: no numbers inside heatmap cells
LEGEND_MAX = 10  # more series than this: thin grey lines, no legend entries for each
DPI = 100


def esc(text) -> str:
    return _html.escape(str(text))


def _png(fig: Figure, title: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img class='fig' alt='{esc(title)}' src='data:image/png;base64,{data}'/>"


def _figure(w: float = 6.4, h: float = 3.4) -> tuple[Figure, object]:
    fig = Figure(figsize=(w, h))
    ax = fig.add_subplot()
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def stacked_bars(labels: list, series: dict[str, list[float]], title: str, ylabel: str,
                 xlabel: str = "step") -> str:
    """One bar per label, segments stacked in `series` order."""
    fig, ax = _figure()
    xs = list(range(len(labels)))
    bottom = [0.0] * len(labels)
    for j, (name, vals) in enumerate(series.items()):
        ax.bar(xs, vals, bottom=bottom, color=PALETTE[j % len(PALETTE)], label=name, width=0.8)
        bottom = [b + v for b, v in zip(bottom, vals)]
    step = max(1, len(labels) // 12)
    ax.set_xticks(xs[::step], [str(x) for x in labels[::step]])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8, ncols=min(len(series), 4), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _png(fig, title)


def lines(xs: list[float], series: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
          marker_x: float | None = None, marker_label: str = "", hline: float | None = None,
          hline_label: str = "", xlog: bool = False, ylog: bool = False, bold: tuple = (),
          percent: bool = False, xtick_labels: list[str] | None = None) -> str:
    """Line plot of several series over shared xs. `marker_x`: a highlighted vertical line
    (e.g. the recommended factor); `hline`: a horizontal reference (e.g. the target drop);
    `bold`: series drawn thick (the others thin grey when there are more than LEGEND_MAX);
    `xtick_labels`: one label per x (e.g. "64K")."""
    fig, ax = _figure()
    many = len(series) > LEGEND_MAX
    for j, (name, vals) in enumerate(series.items()):
        pts = [(x, y) for x, y in zip(xs, vals) if y is not None]
        if not pts:
            continue
        px, py = zip(*pts)
        if name in bold:  # the first bold series solid black, the next dashed purple
            k = bold.index(name)
            ax.plot(px, py, color=("#222", "#7b3294")[k % 2], linestyle=("-", "--")[k % 2], linewidth=2.4,
                    marker="os"[k % 2], markersize=4, label=name, zorder=3)
        elif many:
            ax.plot(px, py, color="#9aa7b8", linewidth=0.8, alpha=0.7,
                    label=f"{len(series) - len(bold)} layers" if j == 0 else None)
        else:
            ax.plot(px, py, color=PALETTE[j % len(PALETTE)], linewidth=1.6, marker="o", markersize=3,
                    label=name)
    if hline is not None:
        ax.axhline(hline, color="#e15759", linestyle="--", linewidth=1.4, label=hline_label or None)
    if marker_x is not None:
        ax.axvline(marker_x, color="#2ca02c", linewidth=2.0, alpha=0.8, label=marker_label or None)
    if xlog:
        ax.set_xscale("log", base=2)
    if ylog:
        ax.set_yscale("log")
    if xtick_labels is not None:
        ax.set_xticks(xs, xtick_labels)
        ax.minorticks_off()
    if percent:
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}" if v >= 0.01 or v == 0 else f"{v:.1%}")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8, ncols=min(len(ax.get_legend_handles_labels()[0]), 4) or 1, loc="upper center",
              bbox_to_anchor=(0.5, -0.18))
    return _png(fig, title)


def heatmap(rows: list[list[float]], row_labels: list[str], title: str, xlabel: str = "expert") -> str:
    """Rows x columns of non-negative values, each shown as a share of its row's mean (1 =
    balanced); a colour bar; numbers in the cells only up to CELL_TEXT_MAX columns."""
    ncol = max((len(r) for r in rows), default=1)
    rel = [[v / ((sum(r) / len(r)) or 1) for v in r] for r in rows]
    w = min(14.0, max(6.4, 0.42 * ncol + 2.5)) if ncol <= CELL_TEXT_MAX else min(14.0, max(8.0, 0.06 * ncol + 4))
    fig, ax = _figure(w, max(2.2, 0.38 * len(rows) + 1.4))
    ax.grid(False)
    top = max((max(r) for r in rel if r), default=2.0)
    vmax = min(max(2.0, top), 4.0)  # one hot expert must not darken all the others
    im = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, pad=0.02, extend="max" if top > vmax else "neither")
    cbar.set_label("load / row mean")
    ax.set_yticks(range(len(rows)), row_labels)
    if len(rows) > 24:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    if ncol <= 32:
        ax.set_xticks(range(ncol))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.tick_params(labelsize=8)
    if ncol <= CELL_TEXT_MAX and len(rows) <= 24:
        for r, vals in enumerate(rel):
            for c, v in enumerate(vals):
                ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if v < vmax * 0.6 else "black")
    ax.set(title=title, xlabel=f"{xlabel} id")
    return _png(fig, title)


def warnings(items: list[str]) -> str:
    """A highlighted block of warning lines (empty when there are none)."""
    if not items:
        return ""
    return "<div class='warn'>" + "".join(f"<p>&#9888; {esc(w)}</p>" for w in items) + "</div>"


def table(headers: list[str], rows: list[list], highlight: int | None = None) -> str:
    """`highlight`: index of a row to mark (e.g. the recommended factor)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(("<tr class='hl'>" if i == highlight else "<tr>")
                   + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page(title: str, sections: list[str], subtitle: str = "") -> str:
    style = ("body{font-family:sans-serif;margin:20px;color:#222;max-width:1500px}h1{margin-bottom:2px}"
             "section{margin:18px 0}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}"
             "tr.hl td{background:#e3f4e1;font-weight:bold}"
             ".plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.note{color:#555}"
             ".fig{max-width:100%;height:auto;border:1px solid #eee}"
             ".warn{background:#fff4e5;border-left:4px solid #f28e2b;padding:4px 12px;margin:10px 0}"
             ".warn p{margin:6px 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body><h1>{esc(title)}</h1><p class='note'>{esc(subtitle)}</p>"
            + "".join(sections) + "</body></html>")


def plots(*figs: str) -> str:
    return "<div class='plots'>" + "".join(figs) + "</div>"
