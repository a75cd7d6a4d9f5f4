"""GPTQ (Frantar et al. 2023): each Linear's weights rounded so that its output error is least.

Round-to-nearest rounds every weight on its own. GPTQ rounds a Linear's columns one at a time and
moves each column's rounding error into the columns not rounded yet, weighted by the inverse of
``H = X^T X``, the second moment of the layer's inputs on calibration data: the error it leaves
is the one those inputs see least. Columns go in order of decreasing ``H[j, j]`` (the most used
inputs first, "act order"), in blocks of 128 with lazy updates (the same result as one column at
a time, :func:`gptq_codes_reference`, with matrix products instead of rank-1 updates).

The rounding grid is the one conversion will use: scales (and int4 offsets) come from the
original weights, and the element that fixes each row's or group's scale (its largest magnitude;
its minimum and maximum for asymmetric int4) keeps its round-to-nearest code, so the rounded
weights, written back as float values on that grid, convert to exactly the chosen codes with the
same scales. :func:`gptq` checks this on every layer (a row that would convert differently keeps
its original weights) and reports each layer's output error on the calibration inputs,
``trace(D H D^T) / trace(W H W^T)`` for the weight error ``D``, for round-to-nearest and for GPTQ.

For dynamic and weight-only modes (static mode has AdaRound); ``quanta.quantize`` runs it after
the rotation and SmoothQuant. Measured in docs/ptq.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from quanta.capture.weightops import tied_parameters
from quanta.config import QuantSpec
from quanta.errors import CalibrationError, UnsupportedModelError
from quanta.kernels import weight_only as weight_only_kernels
from quanta.modules.quantized import quantize_weight
from quanta.progress import progress
from quanta.ptq.layer_inputs import feed_layer_inputs

BLOCK = 128  # columns per lazy-update block
DAMPING = 0.01  # fraction of H's mean diagonal added to it before inverting (GPTQ's default)


@dataclass(frozen=True)
class Grid:
    """Where a weight may go: ``offset + code * scale`` with ``low <= code <= high`` (all [N, K]
    except the bounds); ``nearest`` are the original weights' round-to-nearest codes, which the
    ``pinned`` elements (those that fix each row's/group's qparams) keep."""

    scale: torch.Tensor
    offset: torch.Tensor
    low: int
    high: int
    pinned: torch.Tensor
    nearest: torch.Tensor

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        return self.offset + codes * self.scale


def _expand(per_group: torch.Tensor, group: int, k: int) -> torch.Tensor:
    return per_group.repeat_interleave(group, dim=1)[:, :k]


def _group_argmax(values: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] bool: the first largest element of each group of ``group`` columns of each row."""
    n, k = values.shape
    padded = weight_only_kernels.padded_groups(values, group)  # pads with the last column: never a new max
    first = torch.zeros_like(padded, dtype=torch.bool)
    first.scatter_(2, padded.argmax(dim=2, keepdim=True), True)
    return first.reshape(n, -1)[:, :k]


def _convert(weight: torch.Tensor, spec: QuantSpec, mode: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``mode``'s conversion computes for ``weight`` under ``spec``: (codes int64 [N, K],
    scales, offsets): int4 scales and offsets per group [N, G]; int8 scales per row [N], offsets 0."""
    if spec.bits == 4:
        packed, scale, offset = weight_only_kernels.quantize_int4(weight, spec.group_size or weight.shape[1],
                                                                  spec.symmetric)
        return weight_only_kernels.unpack_int4(packed)[:, :weight.shape[1]].long(), scale, offset
    if mode == "weight_only":
        codes, scale = weight_only_kernels.quantize_int8(weight)
    else:
        codes, scale = quantize_weight(weight, spec)
    return codes.long(), scale, torch.zeros_like(scale)


def converted_codes(weight: torch.Tensor, spec: QuantSpec, mode: str) -> torch.Tensor:
    """The integer codes ``mode``'s conversion stores for ``weight`` under ``spec`` (int64 [N, K]):
    signed int8 values, or int4 codes 0..15."""
    return _convert(weight, spec, mode)[0]


def grid_for(weight: torch.Tensor, spec: QuantSpec, mode: str) -> Grid:
    """The grid ``mode``'s conversion puts ``weight`` on (``spec.bits`` resolved)."""
    w = weight.detach().float()
    n, k = w.shape
    codes, scale, offset = _convert(w, spec, mode)
    if spec.bits == 4:
        group = spec.group_size or k
        scale, offset = _expand(scale, group, k), _expand(offset, group, k)
        if spec.symmetric:  # codes 1..15 are -7..7 steps: the group's largest magnitude is 7 steps
            pinned, low = _group_argmax(w.abs(), group), 1
        else:  # offset = the group's minimum, codes 0..15
            pinned, low = _group_argmax(w, group) | _group_argmax(-w, group), 0
        high = 15
    else:
        half = 2 ** (spec.bits - 1) - 1
        scale, offset = scale.float()[:, None].expand(n, k), offset.float()[:, None].expand(n, k)
        # not -half - 1: that code would widen the row's scale
        pinned, low, high = _group_argmax(w.abs(), k), -half, half
    return Grid(scale.double(), offset.double(), low, high, pinned, codes.double())


def _inverse_factor(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (H damped, dead inputs made harmless); more damping if H is
    singular."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # an input the data never reaches: its column's error costs nothing
    mean = float(h.diagonal().mean())
    for damping in (DAMPING, 0.1, 1.0):
        damped = h + damping * mean * torch.eye(h.shape[0], dtype=h.dtype)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    raise CalibrationError("the inputs' second moment is not positive definite even damped (NaN inputs?)")


def _round_column(w: torch.Tensor, grid: Grid, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, rounded values) of column ``j`` of the current weights ``w`` (column vector)."""
    codes = ((w - grid.offset[:, j]) / grid.scale[:, j]).round().clamp(grid.low, grid.high)
    codes = torch.where(grid.pinned[:, j], grid.nearest[:, j], codes)
    return codes, grid.offset[:, j] + codes * grid.scale[:, j]


def _act_order(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, ...]:
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    permuted = Grid(grid.scale[:, order], grid.offset[:, order], grid.low, grid.high, grid.pinned[:, order],
                    grid.nearest[:, order])
    return order, weight.double()[:, order].clone(), hessian[order][:, order], permuted


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, block: int = BLOCK) -> torch.Tensor:
    """GPTQ's codes for ``weight`` [N, K] on ``grid`` given its inputs' ``hessian`` [K, K]
    (blocked, lazy updates; equal to :func:`gptq_codes_reference` up to float rounding)."""
    order, w, h, g = _act_order(weight, hessian, grid)
    n, k = w.shape
    u = _inverse_factor(h)
    codes = torch.empty(n, k, dtype=torch.float64)
    for start in range(0, k, block):
        end = min(start + block, k)
        wb, ub = w[:, start:end], u[start:end, start:end]
        errors = torch.empty_like(wb)
        for i in range(end - start):
            codes[:, start + i], rounded = _round_column(wb[:, i], g, start + i)
            errors[:, i] = (wb[:, i] - rounded) / ub[i, i]
            wb[:, i:] -= errors[:, i:i + 1] * ub[i:i + 1, i:]
        w[:, end:] -= errors @ u[start:end, end:]
    return codes[:, torch.argsort(order)].long()


def gptq_codes_reference(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The plain form: one column at a time, the whole rest of ``weight`` updated after each."""
    order, w, h, g = _act_order(weight, hessian, grid)
    u = _inverse_factor(h)
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        codes[:, j], rounded = _round_column(w[:, j], g, j)
        w[:, j:] -= ((w[:, j] - rounded) / u[j, j])[:, None] * u[j:j + 1, j:]
    return codes[:, torch.argsort(order)].long()


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace(D H D^T) / trace(W H W^T)``: the layer's relative squared output error on the
    inputs ``hessian`` summarizes, for the weight error ``D = rounded - weight``."""
    w, d, h = weight.double(), rounded.double() - weight.double(), hessian.double()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-300))


@dataclass(frozen=True)
class RoundedLinear:
    """GPTQ on one Linear: its output error with round-to-nearest and with GPTQ (relative,
    squared, on the calibration inputs); ``rows_kept``: rows left at round-to-nearest because
    their GPTQ weights would not convert to the chosen codes (0 expected)."""

    name: str
    error_nearest: float
    error_gptq: float
    rows_kept: int = 0


@dataclass
class GPTQResult:
    layers: list[RoundedLinear] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)  # Linears given their own copy of a shared weight
    not_called: list[str] = field(default_factory=list)  # never ran on the calibration data: nearest
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.layers:
            return ("GPTQ: no Linear layer was called on the calibration data" if self.not_called else
                    "GPTQ: no Linear layer to round (none is quantized)")
        nearest = sum(r.error_nearest for r in self.layers)
        rounded = sum(r.error_gptq for r in self.layers)
        extra = f"; {len(self.untied)} untied from a shared weight" if self.untied else ""
        extra += f"; {len(self.not_called)} not called, rounded to nearest" if self.not_called else ""
        kept = sum(r.rows_kept for r in self.layers)
        extra += f"; {kept} rows left at nearest (they would not convert exactly)" if kept else ""
        return (f"GPTQ: {len(self.layers)} Linear layers rounded (their output error on the calibration "
                f"inputs {nearest / max(rounded, 1e-300):.2f}x lower than round-to-nearest{extra}; "
                f"{self.seconds:.0f} s)")


class _SecondMoments:
    """Forward pre-hooks summing ``x^T x`` of each target Linear's input (float32, as GPTQ's own
    code; every sum is held until the rounding: ``in_features^2 * 4`` bytes each, 0.4 GB for
    SmolLM2-135M). Linears that read the same tensor (query/key/value, gate/up) share one sum;
    which share is fixed by the first batch."""

    def __init__(self, names: Sequence[str]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self.names = names

    def add(self, name: str, x: torch.Tensor) -> None:
        """Count ``x``, an input of Linear ``name``."""
        key = self._last[1] if self._last is not None and self._last[0] is x else name
        if self.owner.setdefault(name, key) != key:
            raise CalibrationError(f"GPTQ: {name} shared its input with {self.owner[name]} on one "
                                   "calibration batch and not on another")
        if key == name:
            rows = x.reshape(-1, x.shape[-1]).float()
            if name in self.sums:
                self.sums[name].addmm_(rows.T, rows)
            else:
                self.sums[name] = rows.T @ rows
            self._last = (x, name)

    def end_batch(self) -> None:
        self._last = None  # a tensor of the next batch never counts as this one's

    def of(self, name: str) -> torch.Tensor | None:
        owner = self.owner.get(name)
        return None if owner is None else self.sums[owner]


def gptq(model: nn.Module, batches: Sequence[Any], targets: dict[str, QuantSpec], mode: str, *,
         show_progress: bool = False) -> GPTQResult:
    """Round, in place, the weights of the ``nn.Linear`` modules named in ``targets`` (name ->
    weight spec with bits resolved) by GPTQ from their inputs on ``batches``, onto the grid
    ``mode``'s conversion uses. A weight shared with another module is first copied (untied)."""
    start = time.monotonic()
    result = GPTQResult()
    shared = {name for group in tied_parameters(model) for name in group}
    moments = _SecondMoments(list(targets))
    modules = {name: model.get_submodule(name) for name in targets}
    for name, m in modules.items():
        if m.weight.dtype != torch.float32:  # the grid's values would round again in that dtype
            raise UnsupportedModelError(f"GPTQ: {name} has {str(m.weight.dtype).removeprefix('torch.')} "
                                        "weights; it writes float32 values on the int8/int4 grid: quantize "
                                        "model.float() with gptq=True")
    feed_layer_inputs(model, batches, modules, moments.add, after_batch=moments.end_batch,
                      description="GPTQ inputs", show_progress=show_progress)
    for name in progress(list(targets), total=len(targets), description="GPTQ", enabled=show_progress):
        hessian = moments.of(name)
        if hessian is None:
            result.not_called.append(name)
            continue
        linear, spec = modules[name], targets[name]
        weight = linear.weight.detach()
        grid = grid_for(weight, spec, mode)
        codes = gptq_codes(weight, hessian, grid)
        rounded = grid.values(codes.double()).to(weight.dtype)
        wrong = (converted_codes(rounded, spec, mode) != codes).any(dim=1)
        rounded[wrong] = weight[wrong]  # (never seen) convert as round-to-nearest would
        result.layers.append(RoundedLinear(name, output_error(weight, grid.values(grid.nearest), hessian),
                                           output_error(weight, rounded, hessian), int(wrong.sum())))
        if f"{name}.weight" in shared:
            linear.weight = nn.Parameter(rounded.clone(), requires_grad=linear.weight.requires_grad)
            result.untied.append(name)
        else:
            with torch.no_grad():
                linear.weight.copy_(rounded)
    result.seconds = time.monotonic() - start
    model.__dict__["_quanta_gptq"] = result  # what quantize_dynamic / quantize_weight_only check
    return result
