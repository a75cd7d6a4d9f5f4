"""Empirical bias correction: the mean output error of each int8 conv/linear, measured on the
calibration data, moved into its int32 bias.

Rounding weights and clipping activations are not zero-mean over a channel: each output channel
of an int8 layer drifts by a constant, and every layer downstream inherits the drift. For each
int8 conv/linear, the per-channel mean of its pre-activation output in the float model (after
a folded BatchNorm) is compared with the same mean in the int8 model (its inputs as the int8
model delivers them, through its dequantized weights and bias), and the difference is added to
the int32 bias. Layers are corrected one at a time in execution order, the int8 model
re-measured before each (a pass stops at the layer measured), so each layer sees every
correction upstream of it and no drift is corrected twice. (The "empirical" variant of
Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction".)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from quanta.capture.plan import LayerPlan
from quanta.capture.record import call_with
from quanta.debug.compare import pre_activation_source
from quanta.debug.taps import tap_float
from quanta.modules import graph, opsites
from quanta.modules.quantized import QuantizedConv1d, QuantizedConv2d, QuantizedLinear, QuantizedModule
from quanta.progress import progress
from quanta.ptq.paused_forward import Pause, PausedForward
from quanta.qtensor import QTensor

_CORRECTABLE = (QuantizedConv1d, QuantizedConv2d, QuantizedLinear)


@dataclass(frozen=True)
class BiasShift:
    """One layer's correction: root mean square over channels of the shift added to its bias,
    and of its float pre-activation output (the shift relative to the signal)."""

    name: str
    channels: int
    shift_rms: float
    output_rms: float

    @property
    def relative(self) -> float:
        return self.shift_rms / self.output_rms if self.output_rms > 0 else math.inf


class _ChannelMean:
    """Running per-channel mean of tensors whose channels are on dimension ``dim``."""

    def __init__(self, dim: int) -> None:
        self.dim, self.sum, self.square, self.count, self.calls = dim, None, None, 0, 0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().double().movedim(self.dim, -1)
        rows = t.reshape(-1, t.shape[-1])
        s, q = rows.sum(0), rows.pow(2).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.square = q if self.square is None else self.square + q
        self.count += rows.shape[0]
        self.calls += 1

    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def rms(self) -> float:
        return float((self.square.sum() / (self.count * self.square.numel())).sqrt())


def correctable_layers(qmodel: nn.Module) -> list[tuple[LayerPlan, QuantizedModule]]:
    """The int8 conv/linear layers of a converted model, in execution order."""
    state = qmodel._quanta
    out = []
    for lp in state.plan.layers.values():
        if lp.precision != "int8" or lp.weight_only:
            continue
        layer = state.sites_by_key.get(lp.name) if lp.kind == "site" else qmodel.get_submodule(lp.name)
        if isinstance(layer, _CORRECTABLE):
            out.append((lp, layer))
    return out


def _channel_dim(layer: QuantizedModule) -> int:
    return -1 if isinstance(layer, QuantizedLinear) else 1


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, QTensor):
        return out.dequantize()
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    return None


def float_means(float_model: nn.Module, qmodel: nn.Module,
                layers: Sequence[tuple[LayerPlan, QuantizedModule]], batches: Sequence[Any],
                show_progress: bool = True) -> dict[str, _ChannelMean]:
    """Per layer, the per-channel mean of the float model's pre-activation output (after a
    folded BatchNorm: the value the int8 layer computes before its fused activation)."""
    plan = qmodel._quanta.plan
    source: dict[str, str] = {}
    means: dict[str, _ChannelMean] = {}
    for lp, layer in layers:
        source[pre_activation_source(lp, plan)] = lp.name
        means[lp.name] = _ChannelMean(_channel_dim(layer))

    def on_call(name: str, out: Any) -> None:
        t = _first_tensor(out)
        if t is not None and name in source:
            means[source[name]].add(t)

    float_model.eval()
    for batch in progress(batches, total=len(batches), description="bias correction: float",
                          enabled=show_progress):
        tap_float(float_model, plan, set(source), batch, on_call=on_call)
    return means


def int8_inputs(qmodel: nn.Module, layers: Sequence[tuple[LayerPlan, QuantizedModule]],
                batches: Sequence[Any], on_input: Callable[[str, QuantizedModule, torch.Tensor], None],
                stop_after: str | None = None, paused: PausedForward | None = None) -> None:
    """Run the int8 model eagerly on ``batches`` and pass each call of ``layers`` to
    ``on_input(name, layer, x)`` with ``x`` the float value its int8 op sees (dequantized).
    ``stop_after``: a layer called once per forward, after which the forward stops.
    ``paused``: the forward of ``batches`` paused where the last such pass stopped, resumed
    there instead of run from the input (same values, linear in depth)."""
    handles = []
    for lp, layer in layers:
        def pre_hook(module: QuantizedModule, args: tuple, name: str = lp.name) -> None:
            with torch._C.DisableTorchFunction():
                on_input(name, module, module.dequantized_input(args[0]))
            if name == stop_after:
                raise Pause
        handles.append(layer.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad(), graph.eager_runtime(qmodel):
            if paused is not None:
                paused.run([layer for _, layer in layers])
                return
            for batch in batches:
                try:
                    call_with(qmodel, batch)
                except Pause:
                    pass
    finally:
        for h in handles:
            h.remove()


def _quantized_means(qmodel: nn.Module, group: Sequence[tuple[LayerPlan, QuantizedModule]],
                     batches: Sequence[Any], stop_after: str | None = None,
                     paused: PausedForward | None = None) -> dict[str, _ChannelMean]:
    """Per layer of ``group``: the per-channel mean of its pre-activation output in the int8 model."""
    means = {lp.name: _ChannelMean(_channel_dim(layer)) for lp, layer in group}

    def on_input(name: str, layer: QuantizedModule, x: torch.Tensor) -> None:
        means[name].add(layer.float_op(x, *layer._float_params()))

    int8_inputs(qmodel, group, batches, on_input, stop_after, paused)
    return means


def add_to_bias(layer: QuantizedModule, shift: torch.Tensor) -> None:
    """Add a float per-channel ``shift`` to an int8 layer's int32 bias (at scale input x weight)."""
    scale = float(layer.input_scale) * layer.weight_scale.double()
    step = torch.round(shift.double() / scale)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(step)
    layer.bias = (bias + step).clamp(-(2**31), 2**31 - 1).to(torch.int32)
    layer.set_backend(layer.backend, layer.forced)  # drops the float and packed caches


def correct_bias(float_model: nn.Module, qmodel: nn.Module, batches: Sequence[Any], *,
                 group: int = 1, show_progress: bool = True) -> list[BiasShift]:
    """Correct, in place, the biases of ``qmodel``'s int8 conv/linear layers so that their mean
    outputs on ``batches`` match ``float_model``'s. Returns each layer's shift, in order.

    ``group`` layers are measured per pass of the int8 model (1: each layer sees every
    correction upstream; more: fewer passes, but a layer's measurement misses the corrections
    of the layers before it in its group)."""
    if group < 1:
        raise ValueError(f"bias correction needs group >= 1, got {group}")
    layers = correctable_layers(qmodel)
    if not layers or not batches:
        return []
    ref = float_means(float_model, qmodel, layers, batches, show_progress)
    layers = [(lp, layer) for lp, layer in layers if ref[lp.name].count > 0]  # not reached: unchanged
    shifts: dict[str, BiasShift] = {}
    groups = [layers[i:i + group] for i in range(0, len(layers), group)]
    paused = PausedForward.build(qmodel, batches)
    for members in progress(groups, total=len(groups), description="bias correction", enabled=show_progress):
        last = members[-1][0].name
        once = ref[last].calls == len(batches)  # called once per forward: stop the pass there
        got = _quantized_means(qmodel, members, batches, last if once else None, paused)
        for lp, layer in members:
            want = ref[lp.name].mean()
            if got[lp.name].count == 0 or got[lp.name].mean().shape != want.shape:
                continue
            shift = want - got[lp.name].mean()
            add_to_bias(layer, shift)
            shifts[lp.name] = BiasShift(lp.name, int(shift.numel()), float(shift.pow(2).mean().sqrt()),
                                        ref[lp.name].rms())
    state = qmodel._quanta
    opsites.share_parameters(qmodel, state.plan, {lp.name: state.sites_by_key[lp.name]
                                                   for lp in state.plan.op_sites()})
    return [shifts[lp.name] for lp, _ in layers if lp.name in shifts]
