"""Which node of a traced graph becomes which step of a native program (:mod:`.native_program`).

The rules mirror :mod:`.lowering` for the ops that have native kernels: a static int8
conv/linear on the oneDNN backend runs its kept primitive (quantizing the float input first when
it reads the model's input), int8 call-site adds run the native add loop (or its lookup table),
an int8 value times an int8 channel gate runs the gate kernel, ReLU-like clamps, max and
global-average pooling run their uint8 kernels, and views that keep the memory order alias their
input's buffer. Each rule reads the concrete values of the building call, so every step's
shapes are known; any other node refuses the program with a reason (it then runs as generated
Python, unchanged).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from quanta.capture.activations import is_dropout, returns_its_input
from quanta.capture.trace import op_callable
from quanta.kernels import eltwise, native, reference
from quanta.kernels.pooling import _global_window, _pair, _pool_size
from quanta.modules.lowering import _CLAMP_MODULES, _CLAMPS
from quanta.modules.native_program import INPUT, Kind, NativeProgram, Refused, Tape, Value
from quanta.modules.quantized import QuantizedConv2d, QuantizedLinear, QuantizedModule
from quanta.qtensor import QTensor, clamp_bounds

_VIEWS = frozenset({"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous"})
_VIEW_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_METADATA = frozenset({"size", "dim", "numel"})


def build(graph: fx.Graph, values: dict[fx.Node, Any], keys: dict[fx.Node, str], sites: dict[str, Any],
          model: nn.Module) -> NativeProgram:
    """Plan the steps of ``graph`` (concrete values of the building call in ``values``); raises
    Refused naming the first node that has no native step."""
    return _Builder(values, keys, sites, model).build(graph)


class _Builder:
    """Walks the graph once, appending each node's steps to a :class:`Tape`."""

    def __init__(self, values: dict[fx.Node, Any], keys: dict[fx.Node, str], sites: dict[str, Any],
                 model: nn.Module) -> None:
        self.values, self.keys, self.sites, self.model = values, keys, sites, model
        self.lib = native.load()
        self.tape = Tape()
        self.tensors: dict[fx.Node, Value] = {}
        self.keep: list = []
        self.dropouts: list[nn.Module] = []
        self.input: fx.Node | None = None

    def build(self, graph: fx.Graph) -> NativeProgram:
        for node in graph.nodes:
            self.tape.label = node.name
            try:
                self._node(node)
            except Refused:
                raise
            except Exception as exc:  # noqa: BLE001 - any surprise in planning: no program
                raise Refused(f"{node.name}: {type(exc).__name__}: {exc}") from exc
        if self.input is None:
            raise Refused("no tensor input")
        return self.tape.finish(self.output, tuple(self.values[self.input].shape), self.keep, self.dropouts)

    def _arg(self, a: Any, padded_ok: bool = False) -> Value:
        if not isinstance(a, fx.Node) or a not in self.tensors:
            raise Refused(f"argument {a} is not a tensor of the program")
        if self.tensors[a].pad is not None and not padded_ok:
            raise Refused(f"{a.name}: the padded float input is read by more than an int8 layer")
        return self.tensors[a]

    def _alias(self, node: fx.Node, src: Value, value: Any) -> None:
        t = value.int_data if isinstance(value, QTensor) else value
        src_t = self._concrete(node.args[0] if node.args else None)
        if isinstance(t, torch.Tensor) and src_t is not None and t.data_ptr() != src_t.data_ptr() \
                and t.dtype == src.dtype == torch.uint8 and src_t.dim() == 4 and t.is_contiguous() \
                and src_t.is_contiguous(memory_format=torch.channels_last) \
                and torch.equal(t, src_t.contiguous().reshape(t.shape)):  # NHWC data flattened as NCHW
            dst = self.tape.new(t, src.qparams)
            n, c, h, w = src_t.shape
            self.tape.step(Kind.TO_NCHW, dst, src, ints=(n, c, h * w))
            self.tensors[node] = dst
            return
        if not isinstance(t, torch.Tensor) or src_t is None or t.data_ptr() != src_t.data_ptr() \
                or t.dtype != src.dtype:
            raise Refused(f"{node.name}: not a view of its input")
        same_order = (t.is_contiguous() and src_t.is_contiguous()) \
            or (t.shape == src_t.shape and t.stride() == src_t.stride())
        if not same_order:
            raise Refused(f"{node.name}: a view that reorders memory")
        self.tensors[node] = Value(src.buffer, t, src.qparams)

    def _concrete(self, node: Any) -> torch.Tensor | None:
        v = self.values.get(node) if isinstance(node, fx.Node) else None
        return v.int_data if isinstance(v, QTensor) else v if isinstance(v, torch.Tensor) else None

    def _node(self, node: fx.Node) -> None:
        value = self.values.get(node)
        if node.op == "placeholder":
            if isinstance(value, torch.Tensor):
                if self.input is not None:
                    raise Refused("more than one tensor input")
                if value.dtype != torch.float32 or not value.is_contiguous():
                    raise Refused("the input is not a contiguous float32 tensor")
                self.input = node
                self.tensors[node] = Value(INPUT, value, None)
            return
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise Refused("the forward returns more than one value")
            v = self._arg(out)
            if v.qparams is not None:  # the planner hands float to the caller; never seen so far
                raise Refused("the forward returns int8 data")
            self.output = v
            return
        if node.op == "get_attr":  # a weight op call site's weight; any rule reading it as data refuses
            return
        if not isinstance(value, (torch.Tensor, QTensor)):
            if (node.op == "call_method" and node.target in _METADATA) \
                    or (node.target is getattr and node.args[1:] in (("shape",), ("ndim",))):
                return  # shapes are fixed for the program
            raise Refused(f"{node.name}: computes a {type(value).__name__} at run time")
        site = self.sites.get(self.keys.get(node))
        if node.op == "call_module":
            self._module(node, self.model.get_submodule(node.target), value)
        elif isinstance(site, QuantizedModule):
            self._layer(node, site, node.args[0] if node.args else node.kwargs.get("input"), value)
        elif site is not None:
            self._site(node, site, value)
        else:
            self._function(node, op_callable(node), value)

    def _module(self, node: fx.Node, mod: nn.Module, value: Any) -> None:
        if isinstance(mod, QuantizedModule):
            if node.kwargs or len(node.args) != 1:
                raise Refused(f"{node.name}: a quantized layer called with extra arguments")
            return self._layer(node, mod, node.args[0], value)
        x = self._arg(node.args[0] if len(node.args) == 1 and not node.kwargs else None)
        kind = type(mod)
        if is_dropout(mod):
            self.dropouts.append(mod)  # the identity in eval mode; checked per call
        if kind is nn.Flatten or is_dropout(mod) or returns_its_input(mod):
            return self._alias(node, x, value)
        if kind in _CLAMP_MODULES:
            return self._clamp(node, x, value, *_CLAMP_MODULES[kind])
        if kind is nn.ZeroPad2d:
            return self._pad(node, x, value, mod.padding)
        if kind is nn.MaxPool2d and not mod.return_indices and _pair(mod.dilation) == (1, 1):
            stride = mod.stride if mod.stride is not None else mod.kernel_size
            return self._max_pool(node, x, value, mod.kernel_size, stride, mod.padding, mod.ceil_mode)
        if kind is nn.AdaptiveAvgPool2d or (kind is nn.AvgPool2d and _global_window(
                x.shape[2:], (mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                              mod.divisor_override), {})):
            return self._avg_pool(node, x, value)
        raise Refused(f"{node.name}: {kind.__name__} has no native step")

    def _function(self, node: fx.Node, func: Any, value: Any) -> None:
        x = self._arg(node.args[0] if node.args else None)
        held: list[fx.Node] = []
        fx.node.map_arg((node.args[1:], node.kwargs), held.append)
        if any(n in self.tensors for n in held):
            raise Refused(f"{node.name}: {getattr(func, '__name__', func)} of two tensors")
        name = getattr(func, "__name__", "")
        if func in _CLAMPS and set(node.kwargs) <= {"inplace"}:  # as lowering.py: a new tensor
            return self._clamp(node, x, value, *_CLAMPS[func])
        if (node.op == "call_method" and name in _VIEWS) or func in _VIEW_FUNCTIONS:
            return self._alias(node, x, value)
        if func is F.adaptive_avg_pool2d:
            return self._avg_pool(node, x, value)
        if func is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            if mode == "constant" and isinstance(pad, (list, tuple)) and all(isinstance(v, int) for v in pad):
                return self._pad(node, x, value, pad)
        if func in (F.max_pool2d, torch.max_pool2d):
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            a = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
                 **dict(zip(names, node.args[1:], strict=False)), **node.kwargs}
            stride = a["stride"] if a["stride"] not in (None, [], ()) else a["kernel_size"]
            if not a["return_indices"] and _pair(a["dilation"]) == (1, 1):
                return self._max_pool(node, x, value, a["kernel_size"], stride, a["padding"], a["ceil_mode"])
        raise Refused(f"{node.name}: {name or func} has no native step")

    def _int8_result(self, node: fx.Node, value: Any) -> tuple[torch.Tensor, tuple[float, int]]:
        if not isinstance(value, QTensor) or value.int_data.dtype != torch.uint8:
            raise Refused(f"{node.name}: not a uint8 result")
        return value.int_data, (value.scale, value.zero_point)

    def _clamp(self, node: fx.Node, x: Value, value: Any, lo: float | None, hi: float | None) -> None:
        t, qp = self._int8_result(node, value)
        if x.qparams != qp:
            raise Refused(f"{node.name}: a clamp of a float value")
        qmin, qmax = clamp_bounds(lo, hi, qp[0], qp[1], torch.uint8)
        if qmin is None and qmax is None:
            self.tensors[node] = x
            return
        dst = self.tape.new(t, qp)
        bounds = (0 if qmin is None else qmin, 255 if qmax is None else qmax)
        self.tape.step(Kind.CLAMP, dst, x, ints=(t.numel(), *bounds))
        self.tensors[node] = dst

    def _pool_input(self, node: fx.Node, x: Value, value: Any) -> torch.Tensor:
        t, qp = self._int8_result(node, value)
        src = self._concrete(node.args[0])
        if x.qparams != qp or len(x.shape) != 4 or not src.is_contiguous(memory_format=torch.channels_last) \
                or not t.is_contiguous(memory_format=torch.channels_last):
            raise Refused(f"{node.name}: pooling off NHWC uint8 data")
        return t

    def _pad(self, node: fx.Node, x: Value, value: Any, pad: Any) -> None:
        """Constant padding of NHWC uint8 data with the zero point (the integer meaning 0.0); of
        the float input, deferred to its quantization (a padded zero quantizes to the zero point)."""
        left, right, top, bottom = (tuple(pad) + (0, 0))[:4] if len(pad) in (2, 4) else (-1,) * 4
        if x.buffer == INPUT and x.qparams is None and x.pad is None and len(x.shape) == 4 \
                and isinstance(value, torch.Tensor) and min(left, right, top, bottom) >= 0 \
                and value.dtype == torch.float32 and value.is_contiguous():
            self.tensors[node] = Value(INPUT, value, None, (top, bottom, left, right))
            return
        t = self._pool_input(node, x, value)
        n, c, h, w = x.shape
        if min(left, right, top, bottom) < 0 or tuple(t.shape) != (n, c, h + top + bottom, w + left + right) \
                or not torch.equal(t[:, :, top:top + h, left:left + w], self._concrete(node.args[0])):
            raise Refused(f"{node.name}: a padding the native step does not take")
        dst = self.tape.new(t, x.qparams)
        self.tape.step(Kind.PAD, dst, x, ints=(n, c, h, w, top, bottom, left, right, x.qparams[1]))
        self.tensors[node] = dst

    def _max_pool(self, node: fx.Node, x: Value, value: Any, kernel: Any, stride: Any, padding: Any,
                  ceil_mode: bool) -> None:
        t = self._pool_input(node, x, value)
        (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
        n, c, h, w = x.shape
        oh, ow = _pool_size(h, kh, sh, ph, ceil_mode), _pool_size(w, kw, sw, pw, ceil_mode)
        if (n, c, oh, ow) != tuple(t.shape) or 2 * ph > kh or 2 * pw > kw:
            raise Refused(f"{node.name}: a max pool the native kernel does not take")
        dst = self.tape.new(t, x.qparams)
        self.tape.step(Kind.MAX_POOL, dst, x, ints=(n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow))
        self.tensors[node] = dst

    def _avg_pool(self, node: fx.Node, x: Value, value: Any) -> None:
        t = self._pool_input(node, x, value)
        n, c, h, w = x.shape
        dst = self.tape.new(t, x.qparams)
        self.tape.step(Kind.AVG_POOL, dst, x, ints=(n, c, h, w, t.shape[2], t.shape[3], x.qparams[1]))
        self.tensors[node] = dst

    def _layer(self, node: fx.Node, mod: QuantizedModule, arg: Any, value: Any) -> None:
        """An int8 conv/linear, quantizing the float input first when it reads the input."""
        x = self._arg(arg, padded_ok=True)
        if x.pad is not None and not isinstance(mod, QuantizedConv2d):
            raise Refused(f"{node.name}: the padded float input is read by a Linear")
        if mod.backend != "onednn" or type(mod) not in (QuantizedConv2d, QuantizedLinear):
            raise Refused(f"{node.name}: a {type(mod).__name__} on the {mod.backend} backend")
        packed = mod._packed_kernel()
        if packed.native is None or getattr(packed, "is_1d", False):
            raise Refused(f"{node.name}: no native kernel")
        out_scale, out_zp = mod.out_args()
        if mod.output_int8:
            y, _ = self._int8_result(node, value)
        elif isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            y = value
        else:
            raise Refused(f"{node.name}: an unexpected result")
        conv = isinstance(mod, QuantizedConv2d)
        src, quantized_input = self._concrete(arg), x.qparams is not None
        if x.qparams is None:  # the float input: quantized here, as mod.quantize_input does
            if x.buffer != INPUT or (conv and not mod.channels_last_input):
                raise Refused(f"{node.name}: quantizes a float value other than the input")
            inv = reference.reciprocal(mod._in[0]) if mod.numerics == "xnnpack" else 0.0
            if conv:
                n, c, h, w = self.values[self.input].shape if x.pad else x.shape
                q = torch.empty((n, c, h, w), dtype=torch.uint8, memory_format=torch.channels_last)
                dims, to_cl = (n, c, h * w), 1
            else:
                q = torch.empty(x.shape, dtype=torch.uint8)
                dims, to_cl = (1, 1, q.numel()), 0
            xq = self.tape.new(q, mod._in)
            self.tape.step(Kind.QUANTIZE, xq, x, ints=(*dims, mod._in[1], to_cl), floats=(mod._in[0], inv))
            if x.pad is not None:  # then the deferred zero padding, with the zero point
                top, bottom, left, right = x.pad
                padded = torch.empty(x.shape, dtype=torch.uint8, memory_format=torch.channels_last)
                xp = self.tape.new(padded, mod._in)
                self.tape.step(Kind.PAD, xp, xq, ints=(n, c, h, w, top, bottom, left, right, mod._in[1]))
                xq, q = xp, padded
            x, src = xq, q
        elif x.qparams != mod._in:
            raise Refused(f"{node.name}: its input arrives at other qparams")
        if conv:
            if len(x.shape) != 4 or not src.is_contiguous(memory_format=torch.channels_last):
                raise Refused(f"{node.name}: a conv input not in NHWC")
            op, out_shape, dst_scale = packed.native.primitive(torch.Size(x.shape), mod.activation, out_scale,
                                                               out_zp)
            expect = (out_shape[0], out_shape[3], out_shape[1], out_shape[2])
            ok = tuple(y.shape) == expect and y.is_contiguous(memory_format=torch.channels_last)
        else:
            rows = src.numel() // mod.in_features
            wins = mod.forced or (len(x.shape) >= 2 and mod.int8_wins_rows(rows, quantized_input))
            if not wins or not src.is_contiguous():
                raise Refused(f"{node.name}: this Linear runs its float path at {rows} rows")
            op, dst_scale = packed.native.primitive(rows, mod.activation, out_scale, out_zp)
            ok = tuple(y.shape) == (*x.shape[:-1], mod.out_features) and y.is_contiguous()
        if not ok:
            raise Refused(f"{node.name}: the kernel's output layout differs from eager mode's")
        self.keep.append(op)
        dst = self.tape.new(y, mod._out if mod.output_int8 else None)
        self.tape.step(Kind.OP, dst, x, op=op.handle, ints=(packed.native.x_zero_point, out_zp),
                       floats=(dst_scale,))
        self.tensors[node] = dst

    def _cat(self, node: fx.Node, site: Any, value: Any) -> None:
        if site.activation != "none":
            raise Refused(f"{node.name}: a cat with a fused activation")
        _cat_parts(self, node, value)

    def _site(self, node: fx.Node, site: Any, value: Any) -> None:
        """An int8 add of two int8 values, or an int8 value times an int8 channel gate."""
        if site.op == "cat" and site.backend == "onednn":
            return self._cat(node, site, value)
        if site.op not in ("add", "mul") or node.kwargs or len(node.args) != 2 or site.backend != "onednn":
            raise Refused(f"{node.name}: call site {site.key} ({site.op}) has no native step")
        a, b = (self._arg(n) for n in node.args)
        if a.qparams is None or b.qparams is None:
            raise Refused(f"{node.name}: {site.op} of a float value")
        y, qp = self._int8_result(node, value)
        ta, tb = (self._concrete(n) for n in node.args)
        dst = self.tape.new(y, qp)
        if site.op == "mul":
            n, c, h, w = ta.shape if ta.dim() == 4 else (0, 0, 0, 0)
            gate = eltwise.ChannelGate(*a.qparams, *b.qparams, *qp, site.activation)
            if ta.dim() != 4 or tb.dim() != 4 or not ta.is_contiguous(memory_format=torch.channels_last) \
                    or tuple(tb.shape) not in ((n, c, 1, 1), (1, c, 1, 1)) or not eltwise._dense(tb) \
                    or y.stride() != ta.stride():
                raise Refused(f"{node.name}: a mul that is not a channel gate")
            sa, za, sg, zg, sy, zy, lo, hi = gate.args
            self.tape.step(Kind.GATE, dst, a, b, ints=(n, h * w, c, c if tb.shape[0] > 1 else 0, za, zg, zy),
                       floats=(sa, sg, sy, lo, hi))
        else:
            if ta.shape != tb.shape or ta.stride() != tb.stride() or y.stride() != ta.stride() \
                    or not eltwise._dense(ta):
                raise Refused(f"{node.name}: an add of two layouts")
            args = (*a.qparams, *b.qparams, *qp, site.activation, site.numerics)
            found = eltwise._native_add(*args)
            if found is not None:
                fn, consts = found
                fixed = fn is self.lib.qk_add_fixed_u8
                if fixed:
                    self.tape.step(Kind.ADD_FIXED, dst, a, b, ints=(ta.numel(), *consts))
                else:
                    self.tape.step(Kind.ADD, dst, a, b, ints=(ta.numel(),), floats=consts)
            elif site.numerics != "onnxruntime" or ta.numel() <= eltwise._SMALL_NUMEL \
                    or site.activation not in ("none", "relu"):
                table = np.ascontiguousarray(eltwise.add_table(*args))
                self.keep.append(table)
                self.tape.step(Kind.ADD_TABLE, dst, a, b, op=table.ctypes.data, ints=(ta.numel(),))
            else:
                raise Refused(f"{node.name}: this add runs oneDNN's sum, not a native loop")
        self.tensors[node] = dst


def _cat_parts(builder: _Builder, node: fx.Node, value: Any) -> None:
    """An int8 ``torch.cat`` (each part requantized to the output's qparams by its 256-entry
    table, as the call site does) over one layout: every part and the result contiguous, or all
    NHWC joined along channels; each output row is then the parts' rows in turn."""
    args = node.args
    tensors, dim = args[0], args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    y, qp = builder._int8_result(node, value)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or set(node.kwargs) - {"dim"}:
        raise Refused(f"{node.name}: a cat the native step does not take")
    values = [builder._arg(t) for t in tensors]
    concrete = [builder._concrete(t) for t in tensors]
    dim = dim % y.dim()
    nhwc = y.dim() == 4 and dim == 1 and y.is_contiguous(memory_format=torch.channels_last) \
        and all(t.is_contiguous(memory_format=torch.channels_last) for t in concrete)
    if not (nhwc or (y.is_contiguous() and all(t.is_contiguous() for t in concrete))) \
            or any(v.qparams is None for v in values):
        raise Refused(f"{node.name}: a cat of float values or mixed layouts")
    rows = y.numel() // (y.shape[1] if nhwc else int(np.prod(y.shape[dim:])))
    parts = []
    for v, t in zip(values, concrete, strict=True):
        lut = None if v.qparams == qp else np.ascontiguousarray(
            eltwise.requantize_uint8(torch.arange(256, dtype=torch.uint8), *v.qparams, *qp).numpy())
        parts.append((v, t.numel() // rows, lut))
    dst = builder.tape.new(y, qp)
    builder.keep.extend(builder.tape.cat_step(dst, parts, rows))
    builder.tensors[node] = dst
