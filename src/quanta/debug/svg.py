"""Inline SVG drawings for the HTML report: the dataflow graph, SQNR bars, histograms.

Plain strings, no JavaScript, no external resource: the page must render from the file alone.
"""

from __future__ import annotations

import html
import math
from typing import Any

COLORS = {"int8": "#2e7d32", "float": "#ef6c00", "native": "#0277bd", "folded": "#9e9e9e",
          "input": "#455a64", "": "#b0bec5"}
NODE_W, NODE_H, GAP_X, GAP_Y = 168, 26, 18, 22
SKIP_ROOM = 60  # room on the right for edges that skip ranks (residual connections)


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def graph(nodes: list[dict[str, Any]]) -> str:
    """A layered drawing of a DAG. ``nodes``: dicts with ``name``, ``op``, ``precision`` and
    ``inputs`` (indices of earlier nodes), in topological order."""
    rank: list[int] = []
    for node in nodes:
        rank.append(1 + max((rank[i] for i in node["inputs"]), default=-1))
    rows: dict[int, list[int]] = {}
    for i, r in enumerate(rank):
        rows.setdefault(r, []).append(i)
    width = max((len(v) for v in rows.values()), default=1) * (NODE_W + GAP_X) + GAP_X + 2 * SKIP_ROOM
    height = (max(rows, default=0) + 1) * (NODE_H + GAP_Y) + GAP_Y
    pos: dict[int, tuple[float, float]] = {}
    for r, members in rows.items():
        offset = (width - len(members) * (NODE_W + GAP_X) + GAP_X) / 2
        for k, i in enumerate(members):
            pos[i] = (offset + k * (NODE_W + GAP_X), GAP_Y + r * (NODE_H + GAP_Y))
    parts = [f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
             f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">']
    for i, node in enumerate(nodes):
        x, y = pos[i]
        for j in node["inputs"]:
            px, py = pos[j]
            if rank[i] - rank[j] > 1:  # a skip: around the right side, not through the nodes between
                x0, y0, x1, y1 = px + NODE_W, py + NODE_H / 2, x + NODE_W, y + NODE_H / 2
                bulge = max(x0, x1) + min(SKIP_ROOM - 6, 16 + 4 * (rank[i] - rank[j]))
                parts.append(f'<path d="M{x0:.0f},{y0:.0f} C{bulge:.0f},{y0:.0f} {bulge:.0f},{y1:.0f} '
                             f'{x1:.0f},{y1:.0f}" fill="none" stroke="#78909c" stroke-width="1.2"/>')
                continue
            x0, y0, x1, y1 = px + NODE_W / 2, py + NODE_H, x + NODE_W / 2, y
            mid = (y0 + y1) / 2
            parts.append(f'<path d="M{x0:.0f},{y0:.0f} C{x0:.0f},{mid:.0f} {x1:.0f},{mid:.0f} '
                         f'{x1:.0f},{y1:.0f}" fill="none" stroke="#90a4ae" stroke-width="1.2"/>')
    for i, node in enumerate(nodes):
        x, y = pos[i]
        color = COLORS.get(node["precision"], COLORS[""])
        label = _short(f'{node["name"]} · {node["op"]}')
        parts.append(f'<g class="node" data-precision="{_esc(node["precision"])}">'
                     f'<title>{_esc(node["name"])} ({_esc(node["op"])}): '
                     f'{_esc(node["precision"] or "not planned")}</title>'
                     f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="5" '
                     f'fill="{color}"/><text x="{x + 6:.0f}" y="{y + 17:.0f}" font-size="11" '
                     f'fill="#fff">{_esc(label)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def sqnr_bars(sites: list[Any], width: int = 760) -> str:
    """Horizontal bars of isolated and accumulated SQNR (dB) per site, in the given order."""
    finite = [v for s in sites for v in (s.isolated_sqnr, s.accumulated_sqnr)
              if v is not None and math.isfinite(v)]
    top = max(10.0, math.ceil(max(finite, default=40.0) / 10) * 10)
    label_w, bar_h, gap = 230, 9, 8
    plot_w = width - label_w - 60
    height = len(sites) * (2 * bar_h + gap) + 40
    parts = [f'<svg class="sqnr" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">']
    for tick in range(0, int(top) + 1, 10):
        x = label_w + plot_w * tick / top
        parts.append(f'<line x1="{x:.0f}" y1="14" x2="{x:.0f}" y2="{height - 6}" stroke="#eceff1"/>'
                     f'<text x="{x:.0f}" y="10" font-size="9" text-anchor="middle" '
                     f'fill="#607d8b">{tick} dB</text>')
    for k, s in enumerate(sites):
        y = 18 + k * (2 * bar_h + gap)
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h + 3}" font-size="11" text-anchor="end">'
                     f'{_esc(_short(s.name, 34))}</text>')
        bars = ((s.isolated_sqnr, "#c62828"), (s.accumulated_sqnr, "#1565c0"))
        for row, (value, color) in enumerate(bars):
            if value is None:
                continue
            length = plot_w if math.isinf(value) and value > 0 else plot_w * max(0.0, min(value, top)) / top
            parts.append(f'<rect class="bar" x="{label_w}" y="{y + row * bar_h}" width="{length:.1f}" '
                         f'height="{bar_h - 1}" fill="{color}"><title>{_esc(s.name)}: '
                         f'{"isolated" if row == 0 else "accumulated"} {value:.1f} dB</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(hist: dict[str, Any], width: int = 360, height: int = 150) -> str:
    """Bars of a site's float output values with the int8 range (dashed) of its qparams."""
    counts, lo, hi = hist["counts"], hist["lo"], hist["hi"]
    span = max(hi, hist.get("q_hi") or hi) - min(lo, hist.get("q_lo") or lo) or 1.0
    left = min(lo, hist.get("q_lo") or lo)
    top = max(max(counts), 1)
    plot_h = height - 24

    def x_of(v: float) -> float:
        return 8 + (width - 16) * (v - left) / span

    parts = [f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><rect width="{width}" height="{height}" fill="#fafafa"/>']
    step = (hi - lo) / len(counts)
    for k, c in enumerate(counts):
        x0, x1 = x_of(lo + k * step), x_of(lo + (k + 1) * step)
        h = plot_h * math.sqrt(c / top)  # square-root scale: tails stay visible
        parts.append(f'<rect x="{x0:.1f}" y="{4 + plot_h - h:.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                     f'height="{h:.1f}" fill="#5c6bc0"/>')
    for key in ("q_lo", "q_hi"):
        if hist.get(key) is not None:
            x = x_of(hist[key])
            parts.append(f'<line x1="{x:.1f}" y1="2" x2="{x:.1f}" y2="{plot_h + 4}" stroke="#d32f2f" '
                         'stroke-dasharray="4 3" stroke-width="1.5"/>')
    parts.append(f'<text x="8" y="{height - 6}" font-size="10" fill="#455a64">{lo:.3g}</text>'
                 f'<text x="{width - 8}" y="{height - 6}" font-size="10" text-anchor="end" '
                 f'fill="#455a64">{hi:.3g}</text></svg>')
    return "".join(parts)
