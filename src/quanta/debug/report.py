"""Per-layer report: which layer runs in which precision, with which qparams, and why.

Reads only the plan attached to a prepared or quantized model; works for static, dynamic and
QAT-converted models alike and after ``quanta.load``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from quanta.capture.plan import LayerPlan, Plan
from quanta.debug.coverage import Coverage, coverage
from quanta.errors import UnsupportedModelError

_COLUMNS = ("name", "op", "quantized as", "precision", "act", "input qparams", "output", "w bits",
            "backend", "reason")


def _qp(qparams: tuple[float, int] | None) -> str:
    return "" if qparams is None else f"s={qparams[0]:.4g} zp={qparams[1]}"


def _row(lp: LayerPlan, mode: str) -> dict[str, Any]:
    quantized = lp.quantized_type if lp.precision == "int8" else ""
    output = ""
    if lp.precision == "int8":
        output = "float32" if mode == "dynamic" or not lp.output_int8 else f"int8 ({_qp(lp.output_qparams)})"
    reason = lp.reason
    if lp.fused:
        reason = (reason + "; " if reason else "") + "fused: " + ", ".join(lp.fused)
    backend_reason = getattr(lp, "backend_reason", "")
    if backend_reason and lp.precision == "int8":
        reason = (reason + "; " if reason else "") + f"{lp.backend}: {backend_reason}"
    return {
        "name": lp.name, "kind": lp.kind, "op": lp.float_type, "quantized_type": quantized,
        "precision": lp.precision, "activation": lp.activation if lp.precision == "int8" else "",
        "input_qparams": list(lp.input_qparams) if lp.input_qparams else None,
        "input_from": lp.input_from,
        "output_qparams": list(lp.output_qparams) if lp.output_qparams else None,
        "output_int8": lp.output_int8, "weight_bits": lp.weight_bits, "backend": lp.backend,
        "backend_reason": backend_reason, "reason": reason, "_output": output,
    }


@dataclass
class Report:
    """Rows (one per module and functional call site) and totals; ``str()`` is a table."""

    mode: str
    rows: list[dict[str, Any]]
    summary: dict[str, int]
    runtime: str = ""  # graph runtime or eager mode, and why (quanta.modules.graph.runtime_status)
    cpu: str = ""  # what this CPU's int8 kernels use and add exactly (quanta.kernels.cpu.isa_summary)
    coverage: Coverage | None = None  # share of conv/linear MACs that run int8 (debug.coverage)

    def to_dict(self) -> dict[str, Any]:
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.rows]
        return {"mode": self.mode, "coverage": self.coverage.to_dict() if self.coverage else None,
                "layers": rows, "summary": dict(self.summary), "runtime": self.runtime, "cpu": self.cpu}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"quanta report ({self.mode})", title_justify="left")
        for col in _COLUMNS:
            table.add_column(col, overflow="fold")
        style = {"int8": "green", "float": "yellow", "native": "cyan", "folded": "dim"}
        for r in self.rows:
            table.add_row(
                r["name"], r["op"], r["quantized_type"], f"[{style.get(r['precision'], '')}]{r['precision']}",
                r["activation"], "" if r["precision"] != "int8" else (
                    f"from {r['input_from']}" if r["input_from"] else _qp(r["input_qparams"])),
                r["_output"], "" if r["weight_bits"] is None or r["precision"] != "int8"
                else str(r["weight_bits"]), r["backend"], r["reason"],
            )
        buf = io.StringIO()
        console = Console(file=buf, width=200, force_terminal=False, color_system=None)
        if self.coverage is not None:
            console.print(self.coverage.headline(), markup=False)
        console.print(table)
        s = self.summary
        console.print(
            f"int8 ops: {s['int8']}  float ops: {s['float']}  int8-native ops: {s['native']}  "
            f"folded: {s['folded']}  quantize boundaries: {s['quantize']}  "
            f"dequantize boundaries: {s['dequantize']}"
        )
        if self.runtime:
            console.print(f"runtime: {self.runtime}")
        if self.cpu:
            console.print(f"cpu: {self.cpu}")
        return buf.getvalue().rstrip()

    def __repr__(self) -> str:
        return str(self)


def runtime_status(model: nn.Module) -> str:
    """Which runtime ``model`` uses in eval mode and why (see :mod:`quanta.modules.graph`)."""
    from quanta.modules import graph

    return graph.runtime_status(model)


def plan_of(model: nn.Module) -> Plan:
    state = getattr(model, "_quanta", None)
    plan = getattr(state, "plan", None)
    if not isinstance(plan, Plan):
        raise UnsupportedModelError(
            f"{type(model).__name__} was not prepared or quantized by quanta: nothing to report"
        )
    return plan


def report(model: nn.Module) -> Report:
    """The per-layer report of a prepared or quantized model."""
    plan = plan_of(model)
    rows = [_row(lp, plan.mode) for lp in plan.layers.values()]
    int8 = [lp for lp in plan.layers.values() if lp.precision == "int8"]
    summary = {
        "int8": len(int8),
        "float": sum(lp.precision == "float" for lp in plan.layers.values()),
        "native": sum(lp.precision == "native" for lp in plan.layers.values()),
        "folded": sum(lp.precision == "folded" for lp in plan.layers.values()),
        # a float tensor entering an int8 op is quantized; an int8 op emitting float is a dequantize
        "quantize": sum(lp.kind == "module" and not lp.input_from for lp in int8),
        "dequantize": sum(not lp.output_int8 for lp in int8),
    }
    from quanta.kernels import cpu

    return Report(plan.mode, rows, summary, runtime_status(model), cpu.isa_summary(), coverage(plan))
