"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before calibration.

A Linear's input often has a few channels far larger than the rest (transformers' GELU outputs
and LayerNorm outputs do), and one uint8 scale per tensor spends its levels on them. For a
positive per-input-channel factor ``s``, ``linear(x) == linear_s(x / s)`` where ``linear_s``'s
weight columns are multiplied by ``s``: with ``s_j = max|x_j| ** alpha / max|W_:,j| ** (1 -
alpha)`` the input's channel ranges even out and the weight, quantized per output channel,
takes the spread. Each smoothed Linear becomes a :class:`SmoothedLinear`: a per-channel multiply
by ``1 / s`` (a float op, kept in the model as data) followed by the rescaled Linear, which is
quantized as any other.

``alpha`` is chosen per layer when not given: for each candidate on :data:`ALPHAS` (and "no
smoothing"), the layer's output on the calibration inputs is computed with a uint8 input
(min/max of the smoothed input) and int8 per-channel weights, and the candidate with the least
error against the float output is kept, so a layer smoothing would hurt stays as it was.
Works before static calibration and before dynamic quantization alike. Rewrites a copy of the
model (``quanta.quantize`` passes it one); measured in docs/ptq.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from quanta.api import _set_module
from quanta.capture.weightops import tied_parameters
from quanta.config import QuantConfig
from quanta.progress import progress
from quanta.ptq.layer_inputs import feed_layer_inputs

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)  # searched per layer when QuantConfig.smoothquant_alpha is None
_MAX_ROWS = 8192  # calibration rows (tokens) kept per layer for the search: the first ones


class SmoothedLinear(nn.Module):
    """``linear(x * inverse_scale)``: the smoothed form of a Linear (``inverse_scale`` is 1 / s
    over the input's last dimension; ``linear``'s weight columns carry s)."""

    def __init__(self, inverse_scale: torch.Tensor, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("inverse_scale", inverse_scale.detach().clone())
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inverse_scale)


@dataclass(frozen=True)
class SmoothedLayer:
    name: str
    alpha: float | None  # None: left unsmoothed (no candidate beat plain quantization)
    error_plain: float  # relative L2 error of the layer's output, plain int8 / smoothed int8
    error_smoothed: float
    input_range_ratio: float  # largest channel range / median channel range of the input, before


@dataclass
class SmoothingResult:
    layers: list[SmoothedLayer] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)  # Linears left alone: their weight is shared

    def summary(self) -> str:
        done = [lay for lay in self.layers if lay.alpha is not None]
        if not self.layers:
            return "SmoothQuant: no Linear layer to smooth"
        gain = sum(lay.error_plain for lay in done) / max(1e-30, sum(lay.error_smoothed for lay in done))
        alphas = sorted({lay.alpha for lay in done})
        tied = f"; {len(self.tied)} left alone, their weight tied to another module's" if self.tied else ""
        return (f"SmoothQuant: {len(done)} of {len(self.layers)} Linear layers smoothed (alpha "
                f"{', '.join(f'{a:g}' for a in alphas) or '-'}; their output error on the calibration "
                f"rows {gain:.2f}x lower{tied})")


def _fake_quant_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 over the range of the whole input. Dynamic mode's per-row inputs are simulated this
    way too: simulating them per row chose lower alphas and SmolLM2's dynamic int8 perplexity
    went from +1.49 % (plain) to +2.92 %, where this search gives +0.47 % (measured)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-12)
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def smoothing_factor(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel factor, clamped away from zero for dead channels."""
    return (x_absmax.clamp_min(1e-5) ** alpha / w_absmax.clamp_min(1e-5) ** (1 - alpha)).clamp(1e-4, 1e4)


def _choose(x: torch.Tensor, linear: nn.Linear, alphas: Sequence[float], bits: int, may_decline: bool
            ) -> tuple[float | None, float, float, torch.Tensor | None]:
    """(alpha, error without, error with, s) of the candidate with the least output error; with
    ``may_decline``, no smoothing at all when that is better still."""
    w = linear.weight.detach().float()  # float32: ranks the candidates as float64 did, 3x faster
    reference = x @ w.T
    norm = float(reference.norm()) or 1.0

    def error(xq: torch.Tensor, wq: torch.Tensor) -> float:
        return float((xq @ wq.T - reference).norm()) / norm

    plain = error(_fake_quant_input(x), _fake_quant_weight(w, bits))
    start = plain if may_decline else float("inf")
    best: tuple[float | None, float, torch.Tensor | None] = (None, start, None)
    x_absmax, w_absmax = x.abs().amax(0), w.abs().amax(0)
    for alpha in alphas:
        s = smoothing_factor(x_absmax, w_absmax, alpha)
        e = error(_fake_quant_input(x / s), _fake_quant_weight(w * s, bits))
        if e < best[1]:
            best = (alpha, e, s)
    return best[0], plain, best[1], best[2]


def smooth(model: nn.Module, batches: Sequence[Any], config: QuantConfig, *, alpha: float | None = None,
           weight_bits: int = 8, show_progress: bool = False) -> SmoothingResult:
    """Smooth, in place, every ``nn.Linear`` of ``model`` that ``config`` quantizes, from its
    inputs on ``batches`` (``alpha`` applied to every layer, or when None chosen per layer, where
    no smoothing is a candidate too). A Linear whose weight is tied to another module's is left
    alone (listed in ``result.tied``)."""
    # tied weights (an LM head and its embedding): smoothing one user's columns would change the other
    shared = {id(model.get_parameter(group[0])) for group in tied_parameters(model)}
    candidates = {name: m for name, m in model.named_modules()
                  if type(m) is nn.Linear and not config.for_module(name, m)[0]}
    targets = {name: m for name, m in candidates.items() if id(m.weight) not in shared}
    result = SmoothingResult(tied=sorted(set(candidates) - set(targets)))
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in targets}

    kept = dict.fromkeys(targets, 0)

    def keep(name: str, x: torch.Tensor) -> None:
        if kept[name] < _MAX_ROWS:
            rows = x.reshape(-1, x.shape[-1])[:_MAX_ROWS - kept[name]].float()
            inputs[name].append(rows)  # at most _MAX_ROWS per layer: memory stays bounded
            kept[name] += rows.shape[0]

    feed_layer_inputs(model, batches, targets, keep)
    alphas = ALPHAS if alpha is None else (alpha,)
    for name in progress(list(targets), total=len(targets), description="SmoothQuant", enabled=show_progress):
        if not inputs[name]:
            continue  # not called on the calibration data
        x = torch.cat(inputs[name])
        linear = targets[name]
        chosen, plain, smoothed, s = _choose(x, linear, alphas, weight_bits, may_decline=alpha is None)
        ranges = x.abs().amax(0)
        ratio = float(ranges.max() / ranges.median().clamp_min(1e-12))
        result.layers.append(SmoothedLayer(name, chosen, plain, smoothed, ratio))
        if s is None:
            continue
        with torch.no_grad():
            linear.weight.mul_(s.to(linear.weight.dtype))
        _set_module(model, name, SmoothedLinear((1.0 / s).to(linear.weight.dtype), linear))
    return result
