"""The outcome of an accuracy-targeted quantization: what was kept float, why, and what it cost.

``quanta.quantize(model, data, eval_fn=..., max_drop=...)`` attaches a :class:`TargetResult` to
the model it returns; :func:`target_of` reads it back (None for a model quantized without a target).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn


@dataclass
class KeptSite:
    name: str
    op: str
    macs: int
    share: float  # of all conv/linear MACs
    why: str


@dataclass
class TargetResult:
    """Metrics are ``eval_fn``'s (higher is better); ``target = metric_float - max_drop``."""

    max_drop: float
    metric_float: float
    metric_int8: float  # every site int8
    metric: float  # the returned model
    met: bool
    kept: list[KeptSite] = field(default_factory=list)
    float_mac_share: float = 0.0  # share of conv/linear MACs kept float by the target
    evaluations: int = 0  # eval_fn calls on quantized variants
    order: str = "sensitivity"
    message: str = ""

    @property
    def target(self) -> float:
        return self.metric_float - self.max_drop

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = self.target
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False, color_system=None)
        console.print(self.message, markup=False)
        console.print(f"metric: float {self.metric_float:.4g}, all int8 {self.metric_int8:.4g}, returned "
                      f"{self.metric:.4g} (target >= {self.target:.4g}); {self.evaluations} evaluations, "
                      f"order: {self.order}", markup=False)
        if self.kept:
            table = Table(title="kept float by the accuracy target", title_justify="left")
            for col in ("site", "op", "MACs", "share", "why"):
                justify = "right" if col in ("MACs", "share") else "left"
                table.add_column(col, overflow="fold", justify=justify)
            for k in self.kept:
                table.add_row(k.name, k.op, f"{k.macs:,}", f"{100 * k.share:.1f} %", k.why)
            console.print(table)
        return buf.getvalue().rstrip()

    def __repr__(self) -> str:
        return str(self)


def target_of(model: nn.Module) -> TargetResult | None:
    """The accuracy-target result attached to a model ``quanta.quantize(max_drop=...)`` returned."""
    state = getattr(model, "_quanta", None)
    return None if state is None else state.__dict__.get("target")


def attach(model: nn.Module, result: TargetResult) -> None:
    model._quanta.__dict__["target"] = result
