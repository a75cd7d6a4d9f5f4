"""AdaRound: learned rounding of each int8 layer's weights (Nagel et al. 2020, "Up or Down?
Adaptive Rounding for Post-Training Quantization").

Rounding every weight to nearest minimizes the weight error, not the layer's output error. For
each int8 conv/linear AdaRound learns, weight by weight, whether to round up or down so that the
layer's output on the calibration inputs *as the int8 model delivers them* matches the float
model's output (both after the fused activation). Scales stay; int8 values move by at most one
step from floor. Conv outputs are sampled (``rows`` output positions per layer, read as patches),
so one optimization step is a batched matrix product. Layers run one at a time in execution
order, each one's inputs captured after every layer before it was rounded (a pass resumes where
the last one paused and pauses at the layer: :mod:`quanta.ptq.paused_forward`), within a
wall-time budget; a layer whose learned rounding does not lower its output error keeps
round-to-nearest, so the correction never makes a layer worse on the data it saw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from quanta.capture.plan import LayerPlan
from quanta.config import QuantSpec
from quanta.debug.compare import folded_float_layer, pre_activation_source
from quanta.debug.taps import tap_float
from quanta.kernels.reference import apply_activation
from quanta.modules.quantized import QuantizedLinear, QuantizedModule
from quanta.numerics.qparams import qrange
from quanta.progress import progress
from quanta.ptq.bias_correction import _first_tensor, correctable_layers, int8_inputs
from quanta.ptq.paused_forward import PausedForward

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's values)
_IMAGE_SEED = 1_000_003


@dataclass(frozen=True)
class RoundingResult:
    """One layer: output error (mean square over the sampled rows, relative to the float
    output's mean square) with round-to-nearest and with the learned rounding; the share of
    weights rounded the other way than nearest; whether the learned rounding was kept."""

    name: str
    iterations: int
    error_nearest: float
    error_learned: float
    flipped: float
    kept: bool


def _rows_of(layer: QuantizedModule, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows [images, positions, features]: conv patches (unfolded), or
    linear rows (one image holds all of its leading positions)."""
    if isinstance(layer, QuantizedLinear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if x.dim() == 3:  # conv1d as a 1 x L conv2d
        x = x.unsqueeze(2)
        k, d, p, s = (1, *layer.kernel_size), (1, *layer.dilation), (0, *layer.padding), (1, *layer.stride)
    else:
        k, d, p, s = layer.kernel_size, layer.dilation, layer.padding, layer.stride
    if isinstance(p, str):
        raise ValueError(f"{layer.layer_name}: AdaRound needs explicit conv padding, got {p!r}")
    return F.unfold(x, k, dilation=d, padding=p, stride=s).transpose(1, 2)


def _outputs_of(layer: QuantizedModule, y: torch.Tensor) -> torch.Tensor:
    """A layer's output as rows [images, positions, channels]."""
    if isinstance(layer, QuantizedLinear):
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2)


class _Sampler:
    """The same output positions of each image on the float and the int8 side."""

    def __init__(self, index: int, per_image: int) -> None:
        self.index, self.per_image, self.images = index, per_image, 0

    def reset(self) -> None:
        self.images = 0

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        out = []
        for image in rows:
            gen = torch.Generator().manual_seed(self.index * _IMAGE_SEED + self.images)
            pick = torch.randperm(image.shape[0], generator=gen)[: self.per_image]
            out.append(image[pick].float())
            self.images += 1
        return torch.cat(out)


def _float_targets(float_model: Any, qmodel: Any, layers: Sequence[tuple[LayerPlan, QuantizedModule]],
                   samplers: dict[str, _Sampler], batches: Sequence[Any], show_progress: bool) -> dict:
    """Per layer, the float model's output (after BatchNorm and the fused activation) at the
    sampled positions."""
    plan = qmodel._quanta.plan
    source, got = {}, {lp.name: [] for lp, _ in layers}
    by_name = {lp.name: layer for lp, layer in layers}
    for lp, _ in layers:
        source[pre_activation_source(lp, plan)] = lp

    def on_call(name: str, out: Any) -> None:
        lp, y = source[name], _first_tensor(out)
        if y is not None:
            rows = _outputs_of(by_name[lp.name], apply_activation(y.detach().float(), lp.activation))
            got[lp.name].append(samplers[lp.name].take(rows))

    float_model.eval()
    for batch in progress(batches, total=len(batches), description="AdaRound: float", enabled=show_progress):
        tap_float(float_model, plan, set(source), batch, on_call=on_call)
    return {name: torch.cat(rows) if rows else None for name, rows in got.items()}


def _int8_inputs(qmodel: Any, group: Sequence[tuple[LayerPlan, QuantizedModule]],
                 samplers: dict[str, _Sampler], batches: Sequence[Any], stop_after: str | None,
                 paused: PausedForward | None) -> dict[str, torch.Tensor | None]:
    got: dict[str, list[torch.Tensor]] = {lp.name: [] for lp, _ in group}
    for lp, _ in group:
        samplers[lp.name].reset()

    def on_input(name: str, layer: QuantizedModule, x: torch.Tensor) -> None:
        for i in range(x.shape[0]):  # one image at a time: unfolded patches are large
            got[name].append(samplers[name].take(_rows_of(layer, x[i:i + 1])))

    int8_inputs(qmodel, group, batches, on_input, stop_after, paused)
    return {name: torch.cat(rows) if rows else None for name, rows in got.items()}


def _grouped(layer: QuantizedModule, w: torch.Tensor) -> torch.Tensor:
    """Weights as [groups, outputs per group, features] to match the rows' feature order."""
    groups = getattr(layer, "groups", 1)
    return w.reshape(groups, w.shape[0] // groups, -1)


def _by_group(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows [R, groups * n] as [groups, R, n], contiguous: one batched matrix product per step
    then reads each group's rows in place (einsum on [R, groups, n] copied them every step: 6x
    slower for a 1,152-channel depthwise conv)."""
    return rows.reshape(rows.shape[0], groups, -1).transpose(0, 1).contiguous()


def _forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    """Grouped layer output [groups, R, outputs per group] from grouped rows ``x`` [groups, R,
    features], weights ``w`` [groups, outputs per group, features] and ``bias`` [groups, 1, outputs]."""
    return apply_activation(torch.bmm(x, w.transpose(1, 2)) + bias, activation)


def mean_squared_error(x: torch.Tensor, target: torch.Tensor, bias: torch.Tensor,
                       activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's mean squared output error on rows ``x`` as a function of its grouped weights.
    Without an activation the error is quadratic in the weights, so it is computed from
    X^T X and X^T (T - b), formed once: a step then costs outputs x features^2 per group instead
    of rows x features x outputs (the same function, summed in another order)."""
    count = target.numel()
    if activation == "none" and 2 * x.shape[2] <= x.shape[1]:
        residual = target - bias
        gram = torch.bmm(x.transpose(1, 2), x)  # [groups, features, features]
        cross = torch.bmm(residual.transpose(1, 2), x)  # [groups, outputs, features]
        constant = float(residual.double().pow(2).sum())

        def quadratic(w: torch.Tensor) -> torch.Tensor:
            return ((torch.bmm(w, gram) * w).sum() - 2 * (w * cross).sum() + constant) / count
        return quadratic

    def direct(w: torch.Tensor) -> torch.Tensor:
        return (_forward(x, w, bias, activation) - target).pow(2).sum() / count
    return direct


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


@dataclass(frozen=True)
class TimeShare:
    """Iterations for one layer from its share of the time left until ``deadline`` (monotonic
    clock), divided by the time of one step of that layer, within ``least``..``most``."""

    deadline: float
    layers_left: int
    least: int
    most: int

    def iterations(self, step_seconds: float) -> int:
        share = (self.deadline - time.monotonic()) / max(1, self.layers_left)
        return int(min(self.most, max(self.least, share / max(step_seconds, 1e-5))))


def round_layer(layer: QuantizedModule, w_float: torch.Tensor, x: torch.Tensor, target: torch.Tensor,
                activation: str, iterations: int | TimeShare, *, lr: float = 1e-2,
                weight: float = 1e-3) -> RoundingResult:
    """Learn the rounding of one layer's int8 weights (in place) on input rows ``x`` and float
    output rows ``target``, for ``iterations`` steps or as many as its time share allows (timed
    on one step); keep it only if it lowers the output error."""
    spec = QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=layer.weight_bits or 8)
    qmin, qmax = qrange(spec)
    scale = _grouped(layer, layer.weight_scale.float().reshape(-1, 1))
    w_div = _grouped(layer, w_float.detach().float()) / scale
    floor = torch.floor(w_div)
    _, bias = layer._float_params()
    groups = scale.shape[0]
    bias = torch.zeros(groups * scale.shape[1]) if bias is None else bias.float()
    bias = bias.reshape(groups, 1, -1)
    x, target = _by_group(x, groups), _by_group(target, groups)
    power = float(target.pow(2).mean()) or 1.0

    def error(w_int: torch.Tensor) -> float:
        with torch.no_grad():
            return float((_forward(x, w_int * scale, bias, activation) - target).pow(2).mean()) / power

    squared_error = mean_squared_error(x, target, bias, activation)
    nearest = torch.clamp(torch.round(w_div), qmin, qmax)
    # The weight that sets each channel's scale keeps its nearest code, so the codes imply the
    # scale they use: a later convert from the dequantized weights (range learning) then derives
    # the same scale and codes. Free, it moved to 126 or 128 in 1.5 % of channels.
    pinned = w_div.abs() >= w_div.abs().amax(dim=-1, keepdim=True)
    floor = torch.where(pinned, nearest, floor)
    free = (~pinned).float()
    rest = (w_div - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    if isinstance(iterations, TimeShare):
        t0 = time.monotonic()
        squared_error(torch.clamp(floor + _rectified_sigmoid(v) * free, qmin, qmax) * scale).backward()
        iterations = iterations.iterations(time.monotonic() - t0)
        v.grad = None
    warmup = iterations // 5
    for it in range(iterations):
        h = _rectified_sigmoid(v)
        loss = squared_error(torch.clamp(floor + h * free, qmin, qmax) * scale) / power
        if it >= warmup:  # push every h to 0 or 1, ever harder (beta 20 -> 2)
            beta = 2 + 18 * (1 - (it - warmup) / max(1, iterations - warmup))
            loss = loss + weight * (1 - (2 * h - 1).abs().pow(beta)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned = torch.clamp(floor + (v.detach() >= 0).float() * free, qmin, qmax)
    e_nearest, e_learned = error(nearest), error(learned)
    kept = e_learned < e_nearest
    if kept:
        with torch.no_grad():
            layer.weight.copy_(learned.reshape(layer.weight.shape).to(layer.weight.dtype))
        layer.set_backend(layer.backend, layer.forced)
    flipped = float((learned != nearest).float().mean())
    return RoundingResult(layer.layer_name, iterations, e_nearest, e_learned, flipped, kept)


def adaround(float_model: Any, qmodel: Any, batches: Sequence[Any], *, seconds: float = 300.0,
             iterations: int | None = None, rows: int = 2048, group: int = 1, min_iterations: int = 50,
             max_iterations: int = 1000, show_progress: bool = True) -> list[RoundingResult]:
    """AdaRound every int8 conv/linear of ``qmodel`` (in place) against ``float_model`` on
    ``batches`` within about ``seconds`` of wall time, or with exactly ``iterations`` per layer
    (then the result does not depend on the machine or its load). Returns each layer's result,
    in order."""
    start = time.monotonic()
    layers = correctable_layers(qmodel)
    images = sum(_first_tensor(b).shape[0] if _first_tensor(b) is not None else 1 for b in batches)
    per_image = max(1, math.ceil(rows / max(1, images)))
    samplers = {lp.name: _Sampler(i, per_image) for i, (lp, _) in enumerate(layers)}
    targets = _float_targets(float_model, qmodel, layers, samplers, batches, show_progress)
    layers = [(lp, layer) for lp, layer in layers if targets[lp.name] is not None]
    results: list[RoundingResult] = []
    plan = qmodel._quanta.plan
    done = 0
    bar = progress(range(len(layers)), total=len(layers), description="AdaRound", enabled=show_progress)
    calls = {lp.name: samplers[lp.name].images for lp, _ in layers}  # float-side images seen
    paused = PausedForward.build(qmodel, batches)
    for g in range(0, len(layers), group):
        members = layers[g:g + group]
        last = members[-1][0].name
        once = calls[last] == images  # called once per image: the pass can stop there
        inputs = _int8_inputs(qmodel, members, samplers, batches, last if once else None, paused)
        for lp, layer in members:
            next(bar, None)
            x, target = inputs[lp.name], targets[lp.name]
            if x is None or x.shape[0] != target.shape[0]:
                continue
            w_float = folded_float_layer(float_model, lp, plan).weight.detach().float()
            steps = iterations or TimeShare(start + seconds, len(layers) - done, min_iterations,
                                            max_iterations)
            results.append(round_layer(layer, w_float, x, target, lp.activation, steps))
            done += 1
    for _ in bar:
        pass
    return results
