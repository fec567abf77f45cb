"""A self-contained HTML report: inline SVG plots, no dependency, opens in any browser.

    html = page("dmoe profile", [section(...), ...]);  Path("report.html").write_text(html)
"""
from __future__ import annotations

import html as _html

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f")
W, H, PAD = 560, 260, 48


def esc(text) -> str:
    return _html.escape(str(text))


def _svg(body: list[str], title: str, w: int = W, h: int = H) -> str:
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">'
    cap = f'<text x="{w / 2}" y="14" text-anchor="middle" font-weight="bold">{esc(title)}</text>'
    return "".join([head, cap, *body, "</svg>"])


def _axes(xlabel: str, ylabel: str, ymax: float, w: int = W, h: int = H) -> list[str]:
    x0, y0, x1, y1 = PAD, h - PAD + 10, w - 12, 24
    out = [f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#333"/>',
           f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#333"/>',
           f'<text x="{(x0 + x1) / 2}" y="{h - 4}" text-anchor="middle">{esc(xlabel)}</text>',
           f'<text x="12" y="{(y0 + y1) / 2}" text-anchor="middle" transform="rotate(-90 12 {(y0 + y1) / 2})">'
           f'{esc(ylabel)}</text>']
    for frac in (0, 0.5, 1):
        y = y0 - frac * (y0 - y1)
        out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{_fmt(ymax * frac)}</text>')
        out.append(f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#ddd"/>')
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _legend(names: list[str], w: int = W) -> list[str]:
    out, x = [], PAD
    for i, name in enumerate(names):
        out.append(f'<rect x="{x}" y="20" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>')
        out.append(f'<text x="{x + 13}" y="29">{esc(name)}</text>')
        x += 18 + 7 * len(name)
    return out


def stacked_bars(labels: list, series: dict[str, list[float]], title: str, ylabel: str) -> str:
    """One bar per label, segments stacked in `series` order."""
    totals = [sum(vals[i] for vals in series.values()) for i in range(len(labels))]
    ymax = max(totals + [1e-12])
    x0, y0, plot_w, plot_h = PAD, H - PAD + 10, W - PAD - 12, H - PAD - 24 - 16
    bw = plot_w / max(len(labels), 1)
    body = _axes("step", ylabel, ymax)
    for i, label in enumerate(labels):
        y = y0
        for j, vals in enumerate(series.values()):
            hgt = vals[i] / ymax * plot_h
            y -= hgt
            body.append(f'<rect x="{x0 + i * bw + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" '
                        f'height="{hgt:.1f}" fill="{PALETTE[j]}"/>')
        if len(labels) <= 20 or i % (len(labels) // 10 + 1) == 0:
            body.append(f'<text x="{x0 + (i + 0.5) * bw:.1f}" y="{y0 + 12}" text-anchor="middle">{esc(label)}</text>')
    return _svg(body + _legend(list(series)), title)


def lines(xs: list[float], series: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
          marker_x: float | None = None) -> str:
    """Line plot of several series over shared xs; an optional vertical marker."""
    ys = [v for vals in series.values() for v in vals if v is not None]
    ymax = max(ys + [1e-12]) * 1.05
    xmin, xmax = min(xs), max(xs)
    x0, y0, plot_w, plot_h = PAD, H - PAD + 10, W - PAD - 12, H - PAD - 24 - 16

    def px(x):
        return x0 + (x - xmin) / ((xmax - xmin) or 1) * plot_w

    def py(y):
        return y0 - y / ymax * plot_h

    body = _axes(xlabel, ylabel, ymax)
    for x in xs:
        body.append(f'<text x="{px(x):.1f}" y="{y0 + 12}" text-anchor="middle">{_fmt(x)}</text>')
    for j, vals in enumerate(series.values()):
        pts = [(px(x), py(y)) for x, y in zip(xs, vals) if y is not None]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{PALETTE[j]}" stroke-width="2"/>')
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{PALETTE[j]}"/>' for x, y in pts]
    if marker_x is not None:
        body.append(f'<line x1="{px(marker_x):.1f}" y1="{y0}" x2="{px(marker_x):.1f}" y2="{y0 - plot_h}" '
                    'stroke="#e15759" stroke-dasharray="4 3"/>')
    return _svg(body + _legend(list(series)), title)


def heatmap(rows: list[list[float]], row_labels: list[str], title: str, xlabel: str = "expert") -> str:
    """Rows x columns of non-negative values; darker = larger share of the row's mean."""
    ncol = max((len(r) for r in rows), default=1)
    cell_w, cell_h = min(40, (W - PAD - 12) / ncol), 22
    h = 40 + cell_h * len(rows) + 30
    body = []
    for r, (vals, label) in enumerate(zip(rows, row_labels)):
        mean = sum(vals) / max(len(vals), 1) or 1
        y = 28 + r * cell_h
        body.append(f'<text x="{PAD - 4}" y="{y + 15}" text-anchor="end">{esc(label)}</text>')
        for c, v in enumerate(vals):
            shade = min(v / mean / 2, 1.0)  # 2x the mean load is full colour
            fill = f"rgb({int(255 - 200 * shade)},{int(255 - 150 * shade)},{int(255 - 60 * shade)})"
            body.append(f'<rect x="{PAD + c * cell_w:.1f}" y="{y}" width="{cell_w - 1:.1f}" height="{cell_h - 1}" '
                        f'fill="{fill}"><title>{esc(label)} expert {c}: {v:.0f} ({v / mean:.2f}x mean)</title></rect>')
            body.append(f'<text x="{PAD + (c + 0.5) * cell_w:.1f}" y="{y + 15}" text-anchor="middle" '
                        f'font-size="9">{v / mean:.1f}</text>')
    body.append(f'<text x="{PAD + ncol * cell_w / 2}" y="{h - 6}" text-anchor="middle">'
                f'{esc(xlabel)} (cell: load / mean load)</text>')
    return _svg(body, title, W, h)


def table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page(title: str, sections: list[str], subtitle: str = "") -> str:
    style = ("body{font-family:sans-serif;margin:20px;color:#222}h1{margin-bottom:2px}"
             "section{margin:18px 0}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}"
             ".plots{display:flex;flex-wrap:wrap;gap:12px}.note{color:#555}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body><h1>{esc(title)}</h1><p class='note'>{esc(subtitle)}</p>"
            + "".join(sections) + "</body></html>")


def plots(*svgs: str) -> str:
    return "<div class='plots'>" + "".join(svgs) + "</div>"
