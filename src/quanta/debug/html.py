"""The report as one self-contained HTML page (inline CSS and SVG, no script, no network).

Sections: coverage and totals; the model's dataflow graph coloured by precision (from a capture
record of the float model; without one, the plan's layers in execution order with their int8
links); per-site SQNR bars and activation histograms of the worst sites (from
``quanta.debug.compare``); the per-layer table. Every site of the comparison has a table row
(``tr.site-row``), every layer of the report one ``tr.layer-row``.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from quanta.debug import svg
from quanta.io.atomic import atomic_write_bytes

WORST = 6  # histograms drawn

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#263238}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #cfd8dc}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #cfd8dc;padding:3px 6px;text-align:left}
th{background:#eceff1}td.num{text-align:right;font-variant-numeric:tabular-nums}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border-radius:4px;color:#fff}
.scroll{overflow:auto;max-height:900px;border:1px solid #eceff1}
.hists{display:flex;flex-wrap:wrap;gap:14px}.hists figure{margin:0}figcaption{font-size:12px}
.p-int8{color:#2e7d32;font-weight:600}.p-float{color:#ef6c00;font-weight:600}.p-native{color:#0277bd}
.muted{color:#78909c}
"""


def _esc(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _db(v: float | None) -> str:
    return "" if v is None else ("inf" if math.isinf(v) and v > 0 else f"{v:.1f}")


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f} %"


def _graph_nodes(report: Any, record: Any) -> tuple[list[dict[str, Any]], str]:
    precision = {r["name"]: r["precision"] for r in report.rows}
    ops = {r["name"]: r["op"] for r in report.rows}
    if record is not None:
        nodes = [{"name": n.name, "op": n.op, "inputs": list(n.inputs),
                  "precision": "input" if n.kind == "input" else precision.get(n.name, "")}
                 for n in record.nodes]
        return nodes, "dataflow of one forward of the float model (each call is a node)"
    index = {r["name"]: i for i, r in enumerate(report.rows)}
    nodes = [{"name": r["name"], "op": ops[r["name"]], "precision": r["precision"],
              "inputs": [index[r["input_from"]]] if r.get("input_from") in index else []}
             for r in report.rows]
    return nodes, ("layers in execution order; links show int8 data passed between int8 ops "
                   "(pass --model for the full dataflow)")


def render(report: Any, compare: Any = None, record: Any = None, title: str = "quanta report") -> str:
    """The HTML page for ``report`` (``quanta.report``), optionally with a ``compare`` result and
    the float model's capture ``record``."""
    out = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_esc(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"]
    if report.coverage is not None:
        out.append(f"<p>{_esc(report.coverage.headline()).replace(chr(10), '<br>')}</p>")
    s = report.summary
    out.append(f"<p class=muted>{report.mode} mode · int8 ops {s['int8']} · float ops {s['float']} · "
               f"int8-native {s['native']} · folded {s['folded']} · runtime: {_esc(report.runtime)}</p>")
    if compare is not None:
        out.append(_compare_sections(compare))
    nodes, caption = _graph_nodes(report, record)
    legend = "".join(f'<span style="background:{svg.COLORS[k]}">{k}</span>'
                     for k in ("int8", "float", "native", "folded", "input"))
    out.append(f"<h2>Model graph by precision</h2><p class=legend>{legend}</p>"
               f"<p class=muted>{_esc(caption)}</p><div class=scroll>{svg.graph(nodes)}</div>")
    out.append(_layer_table(report))
    out.append("</body></html>")
    return "".join(out)


def _compare_sections(compare: Any) -> str:
    sites = compare.sites
    out = [f"<h2>Per-site SQNR against float</h2><p class=muted>model output SQNR "
           f"{_db(compare.output_sqnr)} dB over {compare.batches} batch(es); worst isolated SQNR first. "
           '<span style="color:#c62828">■</span> isolated (float inputs into this int8 op alone) '
           '<span style="color:#1565c0">■</span> accumulated (the int8 model up to here)</p>',
           svg.sqnr_bars(sites)]
    worst = [s for s in sites if s.histogram][:WORST]
    if worst:
        out.append("<h2>Activation histograms of the worst sites</h2><p class=muted>float output values "
                   "(square-root scale); dashed red: the range the int8 output qparams represent</p>"
                   "<div class=hists>")
        for s in worst:
            out.append(f"<figure>{svg.histogram(s.histogram)}<figcaption>{_esc(s.name)} ({_esc(s.op)}): "
                       f"isolated {_db(s.isolated_sqnr)} dB, range clipped {_pct(s.clipped_range)}"
                       "</figcaption></figure>")
        out.append("</div>")
    cols = ("site", "op", "isolated dB", "accumulated dB", "weight dB", "range clipped", "values clipped",
            "input range clipped")
    out.append("<h2>Sites</h2><table class=sites><thead><tr>" + "".join(f"<th>{c}</th>" for c in cols)
               + "</tr></thead><tbody>")
    for s in sites:
        cells = (_db(s.isolated_sqnr), _db(s.accumulated_sqnr), _db(s.weight_sqnr), _pct(s.clipped_range),
                 _pct(s.clipped_values), _pct(s.input_clipped_range))
        out.append(f'<tr class=site-row data-site="{_esc(s.name)}"><td>{_esc(s.name)}</td>'
                   f"<td>{_esc(s.op)}</td>" + "".join(f"<td class=num>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _layer_table(report: Any) -> str:
    cols = ("name", "op", "precision", "activation", "weight bits", "backend", "reason")
    out = ["<h2>Layers</h2><table class=layers><thead><tr>" + "".join(f"<th>{c}</th>" for c in cols)
           + "</tr></thead><tbody>"]
    for r in report.rows:
        bits = "" if r["weight_bits"] is None or r["precision"] != "int8" else r["weight_bits"]
        out.append(f'<tr class=layer-row data-layer="{_esc(r["name"])}"><td>{_esc(r["name"])}</td>'
                   f'<td>{_esc(r["op"])}</td><td class="p-{_esc(r["precision"])}">{_esc(r["precision"])}</td>'
                   f'<td>{_esc(r["activation"])}</td><td class=num>{bits}</td><td>{_esc(r["backend"])}</td>'
                   f'<td>{_esc(r["reason"])}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def write_html(path: str | Path, report: Any, compare: Any = None, record: Any = None,
               title: str = "quanta report") -> Path:
    """Write :func:`render`'s page to ``path`` atomically."""
    path = Path(path)
    atomic_write_bytes(path, render(report, compare, record, title).encode("utf-8"))
    return path
