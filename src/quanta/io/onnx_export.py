"""``quanta.export_onnx``: a quantized model as a QDQ ONNX graph for ONNX Runtime and others.

How: the quantized model is copied into an *export twin* in which every quantized module is
replaced by a float module that computes the same thing through explicit quantize /
dequantize steps, and every int8 call site (``x + y``, ``torch.cat``) is followed by one. The
twin is exported with torch's TorchScript exporter; the quantize/dequantize steps are
``autograd.Function``s whose ``symbolic`` emits ONNX ``QuantizeLinear``/``DequantizeLinear``
nodes, so their placement follows quanta's plan exactly (no graph pattern matching). The
graph carries quanta's own numbers: int8 weight initializers (7-bit where chosen) with
per-channel scales (``axis=0``), int32 biases at ``x_scale * w_scale``, and the calibrated
uint8 activation qparams. Ops quanta runs in float stay float.

Activations that quanta keeps int8 keep their quantize/dequantize pair in the graph: the
export forward remembers the qparams of every quantized activation (``_QParams``), follows
them through the ops a QTensor runs natively (reshapes, ReLU), quantizes again after pooling
(quanta rounds the integer mean of average pooling; max pooling then runs on uint8 in ORT),
and quantizes each input of an int8 call site (``x + y``) with the qparams the reference add
sees. Numerically these extra pairs are exact (dequantize then quantize with the same qparams
is the identity); they let ONNX Runtime fuse QLinearAdd and int8 pooling instead of running
those ops in float.

Weights are written so that every runtime adds them exactly (``weight_format``, default "auto"):
ONNX Runtime's MLAS, like oneDNN, multiplies uint8 x int8 on x86 without VNNI with a saturating
int16 pair sum (``vpmaddubsw``), exact only for |w| <= 64. "auto" writes a layer's weights as
int8 (zero point 0) when they fit, else as uint8 with zero point 128: ORT then takes its U8U8
kernels, which widen to int16 before multiplying and are exact on every CPU (measured: the
8-bit MNIST CNN bit-identical to the reference on AVX2 and VNNI, where int8 weights gave 0 %
identical outputs on AVX2), at about half the speed of U8S8 on a VNNI CPU. "int8" writes int8
weights as they are (fastest; exact only on VNNI/AMX/ARM when weights exceed 7 bits), "uint8"
always shifts them.

ONNX leaves the f32 rounding order of requantization open. quanta's reference uses ONNX
Runtime's: ``acc * f32(f32(s_x * s_w) / s_y)`` (one multiplier per channel) for Conv/MatMul and
f32 scale ratios with fused multiply-adds for Add, so an exported model reproduces the
reference bit for bit end to end in ORT (tested on the MNIST CNN, ResNet-18 and MobileNetV2).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from quanta.capture.callsites import canonical_op_name
from quanta.capture.record import batch_tensors
from quanta.errors import UnsupportedModelError
from quanta.io.atomic import atomic_write_bytes
from quanta.io.export_pool import _ExportAdaptiveAvgPool2d
from quanta.io.onnx_cleanup import drop_requantize_pairs
from quanta.io.save import converted_state
from quanta.kernels import cpu, reference
from quanta.modules.mapping import KEYED_OPS
from quanta.modules.quantized import QuantizedLinear, QuantizedModule, _QuantizedConvNd
from quanta.modules.state import numerics_of, site_module_key
from quanta.qtensor import _METADATA, _NATIVE, _avg_pool, _max_pool

OPSET = 17
WEIGHT_FORMATS = ("auto", "int8", "uint8")


def export_weights(w_q: torch.Tensor, weight_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored weights, per-channel zero points) as the export writes them: int8 with zero point
    0, or uint8 with zero point 128 (same values) where ``weight_format`` asks or, for "auto",
    where |w| > 64 would saturate u8 x s8 kernels on CPUs without VNNI."""
    channels = w_q.shape[0]
    wide = cpu.weight_magnitude(w_q) > cpu.NARROW_LIMIT
    shift = weight_format == "uint8" or (weight_format == "auto" and wide)
    if shift:
        return (w_q.to(torch.int16) + 128).to(torch.uint8), torch.full((channels,), 128, dtype=torch.uint8)
    return w_q.clone(), torch.zeros(channels, dtype=torch.int8)


class _QuantDequant(torch.autograd.Function):
    """uint8 per-tensor quantize then dequantize; exports as QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        # same arithmetic as reference.quantize_per_tensor, without its aliasing x.float()
        q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
        return (q - zero_point) * scale

    @staticmethod
    def symbolic(g: Any, x: Any, scale: float, zero_point: int) -> Any:
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class _Dequant(torch.autograd.Function):
    """Per-channel dequantization of a stored integer tensor; exports as DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        shape = [-1] + [1] * (q.dim() - 1)
        return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g: Any, q: Any, scale: Any, zero_point: Any) -> Any:
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=0)


class Steps:
    """How the export twin writes its steps: ONNX QuantizeLinear/DequantizeLinear here; the
    ExecuTorch export (``io/executorch_export.py``) writes torch ops through the same walk."""

    #: a layout op's int8 output is quantized again (not only pooling's)
    requantize_layout = False
    def quant_dequant(self, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        return _QuantDequant.apply(x, scale, zero_point)

    def requantized(self, x: torch.Tensor, noted: tuple[float, int] | None, scale: float,
                    zero_point: int) -> torch.Tensor:
        """An op's int8 input at (scale, zero_point); ``noted``: the qparams x already carries."""
        return self.quant_dequant(x, scale, zero_point)

    def clear(self) -> None:
        """Forget the tensors of one export forward."""

    def prepare(self, m: _ExportQuantized, q: QuantizedModule) -> None:
        """Adjust the stand-in's buffers after it is built (nothing for ONNX)."""

    def weight(self, m: _ExportQuantized) -> torch.Tensor:
        return _Dequant.apply(m.weight, m.weight_scale, m.weight_zero_point)

    def bias(self, m: _ExportQuantized) -> torch.Tensor | None:
        return _Dequant.apply(m.bias, m.bias_scale, m.bias_zero_point) if m.has_bias else None

    def activation(self, y: torch.Tensor, activation: str, out_zero_point: int | None) -> torch.Tensor:
        return _activation(y, activation, out_zero_point)

    def global_pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1)


class _QParams:
    """The uint8 qparams of the activations of one export forward, by tensor identity (the
    tensors are kept alive until ``clear`` so an id is never reused meanwhile)."""

    def __init__(self, steps: Steps | None = None) -> None:
        self._by_id: dict[int, tuple[torch.Tensor, float, int]] = {}
        self.steps = steps or Steps()

    def note(self, t: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        self._by_id[id(t)] = (t, scale, zero_point)
        return t

    def of(self, t: Any) -> tuple[float, int] | None:
        entry = self._by_id.get(id(t)) if isinstance(t, torch.Tensor) else None
        return None if entry is None or entry[0] is not t else entry[1:]

    def quant_dequant(self, y: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        return self.note(self.steps.quant_dequant(y, scale, zero_point), scale, zero_point)

    def clear(self) -> None:
        self._by_id.clear()
        self.steps.clear()


def _activation(y: torch.Tensor, activation: str, out_zero_point: int | None = None) -> torch.Tensor:
    """The fused activation; a ReLU followed by a quantize with zero point 0 is implied by the
    quantize's clamp at 0 (exactly), so it is left out and ORT can fuse the quantized op."""
    if activation == "relu" and out_zero_point == 0:
        return y
    return reference.apply_activation(y, activation)


class _ExportQuantized(nn.Module):
    """Float stand-in for a quantized Conv/Linear: Q/DQ on the input, DQ weights and bias,
    the float op, the fused activation, Q/DQ on the output when it stays int8."""

    def __init__(self, q: QuantizedModule, qparams: _QParams, weight_format: str = "auto") -> None:
        super().__init__()
        self._qparams = qparams
        channels = q.weight.shape[0]
        weight, zero_point = export_weights(q.weight, weight_format)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", q.weight_scale.float().clone())
        self.register_buffer("weight_zero_point", zero_point)
        self.has_bias = q.bias is not None
        if self.has_bias:
            # the scale the int32 bias lives at: x_scale * w_scale, as the kernels compute it
            self.register_buffer("bias", q.bias.clone())
            self.register_buffer("bias_scale", (q._in[0] * q.weight_scale.float()).float())
            self.register_buffer("bias_zero_point", torch.zeros(channels, dtype=torch.int32))
        self.input_qparams = q._in
        self.output_qparams = q._out if q.output_int8 else None
        self.activation = q.activation
        self.conv = None
        if isinstance(q, _QuantizedConvNd):
            self.conv = (F.conv1d if isinstance(q.rank, tuple) and q.rank == (3,) else F.conv2d,
                         q.stride, q.padding, q.dilation, q.groups)
        qparams.steps.prepare(self, q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self._qparams.steps
        x = steps.requantized(x, self._qparams.of(x), *self.input_qparams)
        w, b = steps.weight(self), steps.bias(self)
        if self.conv is None:
            y = F.linear(x, w, b)
        else:
            conv, stride, padding, dilation, groups = self.conv
            y = conv(x, w, b, stride, padding, dilation, groups)
        y = steps.activation(y, self.activation, self.output_qparams[1] if self.output_qparams else None)
        if self.output_qparams is not None:
            y = self._qparams.quant_dequant(y, *self.output_qparams)
        return y


class _ExportSiteMode(TorchFunctionMode):
    """During the export forward: ops a QTensor runs natively keep their input's qparams (average
    pooling quantizes again); an int8 call site quantizes its int8 inputs with their qparams,
    runs in float, then quantizes its output."""

    def __init__(self, tracker: Any, sites: dict[str, Any], qparams: _QParams) -> None:
        super().__init__()
        self.tracker, self.sites, self.qparams = tracker, sites, qparams

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        native = _NATIVE.get(func)
        if native is not None:
            return self._native(func, native, args, kwargs)
        tracker = self.tracker
        if tracker.leaf_depth or not tracker.stack:
            return func(*args, **kwargs)
        op = canonical_op_name(func)
        if op not in KEYED_OPS:
            return func(*args, **kwargs)
        site = self.sites.get(tracker.next_key(op))
        if site is None:
            return func(*args, **kwargs)
        if isinstance(site, _ExportQuantized):  # a weight op call site
            return site(args[0] if args else kwargs["input"])
        if op in ("add", "mul") and len(args) == 2 and not kwargs:
            args = tuple(self._requantized(a) for a in args)
        elif op == "cat" and args and isinstance(args[0], (list, tuple)):
            args = ([self._requantized(t) for t in args[0]], *args[1:])
        elif op == "matmul" and len(args) == 2 and not kwargs:  # an operand in float: the site's qparams
            in_qp = list(zip(site.input_scale.tolist(), site.input_zero_point.tolist(), strict=True))
            args = tuple(self._requantized(a) if self.qparams.of(a) is not None else
                         self.qparams.quant_dequant(a, *in_qp[i]) for i, a in enumerate(args))
            if not site.output_int8:
                return func(*args)
        y = func(*args, **kwargs)
        scale, zero_point = float(site.output_scale), int(site.output_zero_point)
        y = self.qparams.steps.activation(y, site.activation, zero_point)
        return self.qparams.quant_dequant(y, scale, zero_point)

    def _requantized(self, t: Any) -> Any:
        qp = self.qparams.of(t)
        return t if qp is None else self.qparams.steps.requantized(t, qp, *qp)

    def _native(self, func: Callable, native: Callable, args: tuple, kwargs: dict) -> Any:
        y = func(*args, **kwargs)
        qp = self.qparams.of(args[0]) if args else None
        if qp is None or not isinstance(y, torch.Tensor) or not y.is_floating_point():
            return y
        if native is _avg_pool or native is _max_pool or self.qparams.steps.requantize_layout:
            # average: quanta rounds the integer mean; max: exact, and lets ORT pool on uint8
            return self.qparams.quant_dequant(y, *qp)
        return self.qparams.note(y, *qp)


class _ExportWrapper(nn.Module):
    def __init__(self, twin: nn.Module, tracker: Any, sites: dict[str, Any], qparams: _QParams) -> None:
        super().__init__()
        self.twin = twin
        self._tracker, self._sites, self._qparams = tracker, sites, qparams

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with _ExportSiteMode(self._tracker, self._sites, self._qparams):
                return self.twin(*args, **kwargs)
        finally:
            self._qparams.clear()


def export_twin(model: nn.Module, weight_format: str = "auto",
                steps: Steps | None = None) -> tuple[nn.Module, Any]:
    """A float module whose export emits the QDQ graph of ``model`` (steps written by ``steps``,
    ONNX's by default), and its site tracker."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    state = converted_state(model)
    state.detach()
    try:
        twin = copy.deepcopy(model)
    finally:
        state.attach(model)
    twin_state = twin._quanta
    twin_state.detach()
    del twin._quanta
    qparams = _QParams(steps)
    for name, m in list(twin.named_modules()):
        parent, _, attr = name.rpartition(".")
        owner = twin.get_submodule(parent) if parent else twin
        if isinstance(m, QuantizedModule):
            if not isinstance(m, (QuantizedLinear, _QuantizedConvNd)):
                raise UnsupportedModelError(f"{name}: {type(m).__name__} has no QDQ export")
            setattr(owner, attr, _ExportQuantized(m, qparams, weight_format))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            setattr(owner, attr, _ExportAdaptiveAvgPool2d(m.output_size, qparams))
    sites = dict(twin_state.sites_by_key)
    op_sites = nn.ModuleDict()  # weight op call sites: the same float stand-in as modules
    for lp in twin_state.plan.op_sites():
        op_sites[site_module_key(lp.name)] = sites[lp.name] = _ExportQuantized(sites[lp.name], qparams,
                                                                                  weight_format)
    tracker = twin_state.tracker
    tracker.install(twin)
    wrapper = _ExportWrapper(twin.eval(), tracker, sites, qparams)
    wrapper.op_sites = op_sites
    return wrapper, tracker


def _as_args(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise UnsupportedModelError(
        f"example_inputs must be a Tensor, a tuple of inputs or a dict, got {type(example_inputs).__name__}"
    )


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                weight_format: str = "auto", dynamic_dims: tuple[int, ...] = (0,)) -> Path:
    """Write ``model`` (quantized by quanta) to ``path`` as a QDQ ONNX model, atomically.

    ``dynamic_dims``: the dimensions of every input and output left free in the file, by default
    the batch (dim 0); ``(0, 1)`` for a transformer's [batch, sequence, ...] tensors, so one file
    takes any sequence length (otherwise the example's is fixed). The graph is checked
    with ``onnx.checker`` before it is written. ``weight_format``: "auto" (default) writes
    weights every CPU's int8 kernels add exactly (int8 where |w| <= 64, else uint8 with zero
    point 128); "int8" always int8 (fastest, but exact only on VNNI/AMX/ARM CPUs when weights
    use 8 bits); "uint8" always uint8. The numbers are the same in every format.
    """
    import io

    import onnx

    numerics = numerics_of(model)
    if numerics != "onnxruntime":
        warnings.warn(f"the model was quantized with numerics={numerics!r} (for ExecuTorch); "
                      "ONNX Runtime quantizes float inputs and rounds int8 adds one LSB away on ~1e-6 / "
                      "~2e-5 of values. Quantize with numerics='onnxruntime' (the default) for a bit-exact "
                      ".onnx", stacklevel=2)
    wrapper, tracker = export_twin(model, weight_format)
    args, kwargs = _as_args(example_inputs)
    inputs = batch_tensors((args, kwargs))
    input_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    with torch.no_grad():
        outputs = batch_tensors(wrapper(*args, **kwargs))
    output_names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    tensors = dict(zip(input_names + output_names, [*inputs, *outputs], strict=True))
    for name, t in tensors.items():
        if any(not 0 <= d < t.dim() for d in dynamic_dims):
            raise ValueError(f"dynamic_dims={tuple(dynamic_dims)}: {name} has shape {tuple(t.shape)}; "
                             "each dynamic dimension must exist in every input and output")
    names = {0: "batch", 1: "sequence"}
    dynamic_axes = {name: {d: names.get(d, f"dim{d}") for d in dynamic_dims} for name in tensors}
    buffer = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper, args, buffer, kwargs=kwargs or None, dynamo=False, opset_version=OPSET,
                input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                do_constant_folding=False, autograd_inlining=False,
            )
    finally:
        tracker.remove()
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "quanta"
    drop_requantize_pairs(proto)  # exact; OpenVINO runs the file ~1.5x faster without them
    onnx.checker.check_model(proto, full_check=True)
    return atomic_write_bytes(path, proto.SerializeToString())
