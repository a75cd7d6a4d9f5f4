"""Int8 coverage: the share of a model's conv/linear multiply-accumulates that run int8.

An accuracy figure means nothing without it: a model can "match float" because nothing was
quantized. The MACs of every weight op (a module's or a call site's) are recorded on the
example input when the model is prepared (``LayerPlan.macs``); a layer counts as int8 only where
an int8 kernel runs it on that input: not where it stays float, takes the float fallback
(weights wider than the CPU adds exactly), or where a small Linear call takes the float path
(``LayerPlan.float_macs``, set with the backend). Dynamic mode has no example forward, so
there the weights' sizes stand in for MACs (every row of the input meets every weight once).
Reads only the plan, so it works on a saved file without the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from quanta.capture.plan import LayerPlan, Plan

WARN_BELOW = 0.5  # quantize/convert warn when less than this share runs int8


@dataclass
class Coverage:
    int8_macs: int
    total_macs: int
    basis: str  # what the MACs are counted on
    float_layers: list[dict[str, Any]] = field(default_factory=list)  # largest first

    @property
    def share(self) -> float | None:
        return self.int8_macs / self.total_macs if self.total_macs else None

    def to_dict(self) -> dict[str, Any]:
        return {"int8_macs": self.int8_macs, "total_macs": self.total_macs, "share": self.share,
                "basis": self.basis, "float_layers": self.float_layers}

    def headline(self, top: int = 5) -> str:
        if self.share is None:
            return "int8 coverage: no conv/linear multiply-accumulates recorded"
        percent = math.floor(1000 * self.share) / 10  # never shows 100.0 while anything runs float
        text = f"int8 coverage: {percent:.1f} % of {_count(self.total_macs)} conv/linear MACs ({self.basis})"
        if self.float_layers:
            shown = "; ".join(f"{f['name']} {_count(f['macs'])} ({f['reason']})"
                              for f in self.float_layers[:top])
            more = len(self.float_layers) - top
            text += f"\nfloat, largest first: {shown}" + (f"; and {more} more" if more > 0 else "")
        return text


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def float_macs(lp: LayerPlan) -> int:
    """The MACs of ``lp`` that run in float on the example input."""
    return lp.macs if lp.precision != "int8" or lp.weight_only else min(lp.float_macs, lp.macs)


def coverage(plan: Plan) -> Coverage:
    layers = plan.weight_layers()
    total = sum(lp.macs for lp in layers)
    floats = [(lp, float_macs(lp)) for lp in layers if float_macs(lp) > 0]
    floats.sort(key=lambda item: -item[1])
    basis = ("weight sizes: dynamic mode records no example forward" if plan.mode == "dynamic"
             else "on the example input")
    return Coverage(
        total - sum(m for _, m in floats), total, basis,
        [{"name": lp.name, "op": lp.float_type, "macs": m, "reason": _why(lp)} for lp, m in floats],
    )


def _why(lp: LayerPlan) -> str:
    if lp.precision == "int8" and lp.backend == "onednn":
        return "float is faster for calls this small (per-call choice)"
    if lp.precision == "int8":
        return lp.backend_reason or lp.backend
    return lp.reason or "float"


def warning_text(plan: Plan) -> str | None:
    """The warning ``convert`` gives when less than half of the MACs run int8, else None."""
    cov = coverage(plan)
    if cov.share is None or cov.share >= WARN_BELOW:
        return None
    return (f"only {100 * cov.share:.1f} % of the conv/linear multiply-accumulates run int8; "
            + cov.headline(top=3).split("\n", 1)[-1])
