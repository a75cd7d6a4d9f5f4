"""Render benchmarks/results/end_to_end_*.json into the table section of benchmarks/README.md."""

from __future__ import annotations

import json
import os

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _fmt_size(row: dict) -> str:
    if not row.get("size_bytes"):
        return "-"
    return f"{row['size_bytes'] / 1e6:.1f} MB ({100 * row.get('size_ratio', 0):.0f}%)"


def render(data: dict) -> str:
    meta = data["meta"]
    flags = meta["cpu_flags"]
    have = ", ".join(k for k, v in flags.items() if k != "model" and v) or "?"
    lines = [
        f"### ISA: {meta['isa']}" + (f" ({', '.join(f'{k}={v}' for k, v in meta['env'].items())})"
                                     if meta.get("env") else ""),
        "",
        f"CPU: {flags.get('model', '?')}; flags: {have}. torch {meta['torch']}, {meta['threads']} threads, "
        f"median of {meta['reps']} interleaved repetitions, GLIBC_TUNABLES={meta['glibc_tunables']} "
        "for every "
        f"row; run took {meta['minutes']} min.",
        "",
        "| model | batch | row | ms | x fp32 eager | rel. L2 err vs fp32 | size (% fp32) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['row']} | failed | | | | {r['error']} |")
            continue
        err = f"{r['rel_l2']:.4f}" if r.get("rel_l2") is not None else "-"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['row']} | {r.get('ms', '-')} | "
            f"{r.get('speedup_vs_fp32', '-')} | {err} | {_fmt_size(r)} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def write_readme(here: str) -> None:
    parts = []
    for isa in ("native", "avx2"):
        path = os.path.join(here, "results", f"end_to_end_{isa}.json")
        if os.path.exists(path):
            with open(path) as f:
                parts.append(render(json.load(f)))
    readme = os.path.join(here, "README.md")
    text = open(readme).read() if os.path.exists(readme) else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = f"{head}{BEGIN}\n" + "\n\n".join(parts) + f"\n{END}{tail}"
    with open(readme + ".tmp", "w") as f:
        f.write(new)
    os.replace(readme + ".tmp", readme)
