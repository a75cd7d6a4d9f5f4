"""Sensitivity: what each int8 site costs the model's output, alone and in company.

For every int8 site, two variants of the model (``quanta.variants``: the usual ``QuantConfig``
skip list, one shared calibration) are run on the same batches and their output compared with
the float model's:
- **only this site int8** (every other site kept float): the error this site makes by itself;
- **all but this site int8**: what keeping just this site float wins back.
Figures are output SQNR in dB (higher is better); ``gain_db`` is "all but this" minus fully int8.
Most sensitive (largest gain) first.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from quanta.capture.record import call_with
from quanta.config import QuantConfig
from quanta.debug.compare import db
from quanta.debug.taps import tensors
from quanta.progress import progress
from quanta.variants import Variants


@dataclass
class SiteSensitivity:
    name: str
    op: str
    macs: int
    only_sqnr: float | None  # output SQNR with only this site int8
    all_but_sqnr: float | None  # output SQNR with every int8 site but this one
    gain_db: float | None  # all_but_sqnr minus the fully int8 model's output SQNR


@dataclass
class SensitivityResult:
    sites: list[SiteSensitivity]  # most sensitive first
    full_sqnr: float  # output SQNR of the fully int8 model

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return "inf" if isinstance(v, float) and math.isinf(v) else v

        return {"full_sqnr": clean(self.full_sqnr),
                "sites": [{k: clean(v) for k, v in asdict(s).items()} for s in self.sites]}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def order(self) -> list[str]:
        return [s.name for s in self.sites]

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="quanta sensitivity: output SQNR vs float (fully int8: "
                      f"{_f(self.full_sqnr)} dB), most sensitive first", title_justify="left")
        for col in ("site", "op", "MACs", "only this int8 dB", "all but this int8 dB", "gain dB"):
            table.add_column(col, justify="left" if col in ("site", "op") else "right")
        for s in self.sites:
            table.add_row(s.name, s.op, f"{s.macs:,}", _f(s.only_sqnr), _f(s.all_but_sqnr), _f(s.gain_db))
        buf = io.StringIO()
        Console(file=buf, width=150, force_terminal=False, color_system=None).print(table)
        return buf.getvalue().rstrip()

    def __repr__(self) -> str:
        return str(self)


def _f(v: float | None) -> str:
    return "" if v is None else ("inf" if math.isinf(v) else f"{v:.1f}")


class OutputError:
    """Output SQNR of a model against the float model's outputs on fixed batches."""

    def __init__(self, float_model: nn.Module, batches: list[Any]) -> None:
        self.batches = batches
        with torch.no_grad():
            self.reference = [torch.cat(tensors(call_with(float_model.eval(), b))).double() for b in batches]
        self.signal = sum(float(r.pow(2).sum()) for r in self.reference)

    def __call__(self, model: nn.Module) -> float:
        noise = 0.0
        with torch.no_grad():
            for batch, ref in zip(self.batches, self.reference, strict=True):
                noise += float((torch.cat(tensors(call_with(model, batch))).double() - ref).pow(2).sum())
        return db(self.signal, noise)


def sensitivity(model: nn.Module, data: Iterable[Any] | None = None, config: QuantConfig | None = None, *,
                variants: Variants | None = None, eval_batches: int = 2, only: bool = True,
                all_but: bool = True, show_progress: bool = True) -> SensitivityResult:
    """Per-site sensitivity of ``model`` (float) quantized with ``config``, calibrated on ``data``
    (or reuse ``variants``). Errors are measured on the first ``eval_batches`` calibration batches.
    ``only``/``all_but`` choose which of the two variants per site to build."""
    if variants is None:
        if data is None:
            raise ValueError("sensitivity() needs calibration data (or variants=)")
        variants = Variants(model, data, config, show_progress=show_progress)
    error = OutputError(model, variants.data[:max(1, eval_batches)])
    sites = variants.sites()
    names = [lp.name for lp in sites]
    full = error(variants.build())
    rows = []
    for lp in progress(sites, total=len(sites), description="sensitivity", enabled=show_progress):
        only_db = error(variants.build([n for n in names if n != lp.name])) if only else None
        all_but_db = error(variants.build([lp.name])) if all_but else None
        gain = None if all_but_db is None else all_but_db - full
        rows.append(SiteSensitivity(lp.name, lp.float_type, lp.macs, only_db, all_but_db, gain))
    rows.sort(key=_rank)
    return SensitivityResult(rows, full)


def _rank(s: SiteSensitivity) -> tuple[float, int, str]:
    """Largest gain from keeping it float first (else lowest SQNR alone); then fewer MACs, name."""
    if s.gain_db is not None:
        return -s.gain_db, s.macs, s.name
    return (s.only_sqnr if s.only_sqnr is not None else math.inf), s.macs, s.name
