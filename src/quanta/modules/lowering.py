"""Lowering rules of the graph runtime: graph nodes that run a kernel straight on uint8 data.

Each rule reproduces what eager mode does for that node through ``QTensor`` and the call-site
mode, minus the wrappers: a static int8 module on the oneDNN backend calls its packed kernel,
an int8 call-site add calls the uint8 add, and ReLU-like clamps, pooling and layout ops run on
the integer data with the input's qparams. A rule applies only where the concrete run agreed
(the node produced a QTensor at the expected qparams); every other node stays generic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from quanta.capture.activations import is_dropout, returns_its_input
from quanta.capture.trace import TraceFailed, op_callable
from quanta.kernels import eltwise, reference
from quanta.kernels.pooling import avg_pool_data, max_pool_data
from quanta.modules.quantized import QuantizedLinear, QuantizedModule
from quanta.qtensor import (
    _NATIVE,
    QTensor,
    _avg_pool,
    _max_pool,
    _on_data,
    _pad,
    _view,
    clamp_bounds,
    dequantize_any,
    view_data,
)

_CLAMPS: dict[Callable, tuple[float | None, float | None]] = {
    F.relu: (0.0, None), torch.relu: (0.0, None), torch.Tensor.relu: (0.0, None), torch.relu_: (0.0, None),
    torch.Tensor.relu_: (0.0, None), F.relu6: (0.0, 6.0),
}
_CLAMP_MODULES: dict[type, tuple[float | None, float | None]] = {nn.ReLU: (0.0, None), nn.ReLU6: (0.0, 6.0)}
_METADATA_METHODS = frozenset({"size", "dim", "numel"})
_METADATA_ATTRS = frozenset({"shape", "ndim"})


class Raw(str):
    """A source fragment passed through ``Codegen.call`` unchanged (int8 data, not a QTensor)."""


def _dq(data: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return data.to(torch.float32).sub_(zero_point).mul_(scale)


class Codegen:
    """Python source for one graph: variables per node, constants in a globals dict."""

    def __init__(self) -> None:
        self.glob: dict[str, Any] = {"QTensor": QTensor, "_dq": _dq, "dequantize_any": dequantize_any}
        self.lines: list[str] = []
        self.q: dict[fx.Node, tuple[float, int]] = {}  # node -> qparams of its int8 data

    def const(self, value: Any, hint: str = "c") -> str:
        name = f"{hint}{len(self.glob)}"
        self.glob[name] = value
        return name

    def var(self, node: fx.Node) -> str:
        return f"v_{node.name}"

    def expr(self, a: Any, dequantize: bool = False) -> str:
        """Source for an argument: int8 values wrapped as QTensors (or dequantized)."""
        if isinstance(a, Raw):
            return str(a)
        if isinstance(a, fx.Node):
            qp = self.q.get(a)
            if qp is None:
                return self.var(a)
            fn = "_dq" if dequantize else "QTensor"
            return f"{fn}({self.var(a)}, {qp[0]!r}, {qp[1]!r})"
        if not _has_node(a):
            if a is None or isinstance(a, (bool, int, str)):
                return repr(a)
            return self.const(a)
        if type(a) is tuple:  # a namedtuple holding graph values is refused below
            return "(" + "".join(self.expr(x, dequantize) + ", " for x in a) + ")"
        if isinstance(a, list):
            return "[" + ", ".join(self.expr(x, dequantize) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{self.expr(k)}: {self.expr(v, dequantize)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            return f"slice({self.expr(a.start)}, {self.expr(a.stop)}, {self.expr(a.step)})"
        raise TraceFailed(f"cannot pass a {type(a).__name__} holding graph values")

    def call(self, fn: str, args: tuple, kwargs: dict) -> str:
        parts = [self.expr(a) for a in args] + [f"{k}={self.expr(v)}" for k, v in kwargs.items()]
        return f"{fn}({', '.join(parts)})"


def _has_node(a: Any) -> bool:
    found = []
    fx.node.map_arg(a, found.append)
    return bool(found)


def _data(y: Any) -> Any:
    return y.int_data if isinstance(y, QTensor) else y


def _int8_kernel(mod: QuantizedModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod`` on uint8 input at its input qparams: the packed kernel (a Linear whose call is
    too small for int8 to win runs its float path, as in eager mode)."""
    act, out, packed, x_qparams = mod.activation, mod.out_args(), mod._packed_kernel, mod._in
    if isinstance(mod, QuantizedLinear) and not mod.forced:
        n_in = mod.in_features

        def run_linear(x: torch.Tensor) -> torch.Tensor:
            if mod.int8_wins_rows(x.numel() // n_in, True):
                return packed()(x, act, *out)
            return _data(mod(QTensor(x, *x_qparams)))
        return run_linear
    if isinstance(mod, QuantizedLinear):
        return lambda x: packed()(x, act, *out)
    return packed().bound(act, *out)  # a conv: its primitive kept per input shape


def float_input_kernel(mod: QuantizedModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod`` on a float input: its own input check and quantization, then the kernel."""
    act, out, packed = mod.activation, mod.out_args(), mod._packed_kernel
    if not isinstance(mod, QuantizedLinear):
        conv, quantize = packed().bound(act, *out), mod.quantize_input
        return lambda x: conv(quantize(x))
    forced = mod.forced

    def run(x: torch.Tensor) -> torch.Tensor:
        if not forced and (x.dim() < 2 or not mod.int8_wins_rows(x.numel() // mod.in_features, False)):
            return _data(mod(x))
        return packed()(mod.quantize_input(x), act, *out)
    return run


def _passes_qparams(value: Any, qparams: tuple[float, int]) -> bool:
    return isinstance(value, QTensor) and (value.scale, value.zero_point) == qparams


def lower(node: fx.Node, values: dict[fx.Node, Any], gen: Codegen, model: nn.Module, site: Any) -> int | None:
    """Emit ``node`` as a direct kernel call into ``gen`` and return 1, or None (generic)."""
    if node.op == "call_module":
        return _module(node, values, gen, model.get_submodule(node.target))
    if isinstance(site, QuantizedModule):  # a weight op call site: its input is the first argument
        x = node.args[0] if node.args else node.kwargs.get("input")
        return _layer(node, x, values, gen, site) if isinstance(x, fx.Node) else None
    if site is not None:
        return _site(node, values[node], gen, site)
    if node.op in ("call_function", "call_method"):
        return _function(node, values[node], gen)
    return None


def _emit(gen: Codegen, node: fx.Node, source: str, qparams: tuple[float, int] | None) -> int:
    gen.lines.append(f"{gen.var(node)} = {source}")
    if qparams is not None:
        gen.q[node] = qparams
    return 1


def _layer(node: fx.Node, x: fx.Node, values: dict[fx.Node, Any], gen: Codegen,
           mod: QuantizedModule) -> int | None:
    """An int8 conv/linear on ``x``: a module call, or a weight op call site routed to it."""
    value, qx, xv = values[node], gen.q.get(x), gen.var(x)
    if mod.backend != "onednn":
        return None
    out_q = mod._out if mod.output_int8 else None
    if not (_passes_qparams(value, out_q) if out_q else type(value) is torch.Tensor):
        return None
    if qx is not None:
        kernel = _int8_kernel(mod) if qx == mod._in else None
    else:
        kernel = float_input_kernel(mod) if type(values[x]) is torch.Tensor else None
    return None if kernel is None else _emit(gen, node, f"{gen.const(kernel, 'k')}({xv})", out_q)


def _module(node: fx.Node, values: dict[fx.Node, Any], gen: Codegen, mod: nn.Module) -> int | None:
    if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    x, value = node.args[0], values[node]
    qx, xv = gen.q.get(x), gen.var(x)
    if isinstance(mod, QuantizedModule):
        return _layer(node, x, values, gen, mod)
    if qx is None or not _passes_qparams(value, qx):
        return None
    kind = type(mod)
    if returns_its_input(mod):  # nn.Identity and look-alikes
        return _emit(gen, node, xv, qx)
    if kind in _CLAMP_MODULES:
        return _clamp(gen, node, xv, qx, value, *_CLAMP_MODULES[kind])
    if kind is nn.MaxPool2d and not mod.return_indices:
        rest = (mod.kernel_size, mod.stride, mod.padding, mod.dilation)
        src = f"{gen.const(max_pool_data)}({gen.const(F.max_pool2d)}, {xv}, {gen.const(rest)}, " \
              f"{gen.const({'ceil_mode': mod.ceil_mode})})"
        return _emit(gen, node, src, qx)
    if kind is nn.AdaptiveAvgPool2d:
        src = f"{gen.const(avg_pool_data)}({gen.const(F.adaptive_avg_pool2d)}, {xv}, {qx[1]!r}, " \
              f"{gen.const((mod.output_size,))}, {{}})"
        return _emit(gen, node, src, qx)
    if is_dropout(mod):  # identity in eval mode; in training
        # mode (set on this module alone) the graph raises and the call runs eagerly
        return _emit(gen, node, f"({xv} if not {gen.const(mod, 'm')}.training else "
                                f"{gen.const(_dropout_training)}())", qx)
    if kind is nn.AvgPool2d:  # as its forward calls F.avg_pool2d, without the QTensor wrapper
        rest = (mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                mod.divisor_override)
        pool = f"{gen.const(avg_pool_data)}({gen.const(F.avg_pool2d)}"
        src = f"{pool}, {xv}, {qx[1]!r}, {gen.const(rest)}, {{}})"
        return _emit(gen, node, src, qx)
    if kind is nn.ZeroPad2d:
        return _emit(gen, node, f"{gen.const(F.pad)}({xv}, {gen.const(mod.padding)}, value={qx[1]!r})", qx)
    if kind is nn.Flatten:
        return _emit(gen, node, f"{xv}.flatten({mod.start_dim!r}, {mod.end_dim!r})", qx)
    return None


def _dropout_training() -> None:
    raise RuntimeError("a dropout module is in training mode: the graph runtime does not apply")


def _clamp(gen: Codegen, node: fx.Node, xv: str, qx: tuple[float, int], value: QTensor,
           lo: float | None, hi: float | None) -> int:
    qmin, qmax = clamp_bounds(lo, hi, qx[0], qx[1], value.int_data.dtype)
    if qmin is None and qmax is None:
        return _emit(gen, node, xv, qx)  # already in range (a ReLU after a fused ReLU)
    return _emit(gen, node, f"{gen.const(torch.clamp)}({xv}, {qmin!r}, {qmax!r})", qx)


def _site(node: fx.Node, value: Any, gen: Codegen, site: Any) -> int | None:
    """An int8 call-site add of two int8 values (the uint8 add kernel), or an int8 mul of an int8
    value by another (the native channel-gate kernel), with constant qparams."""
    if site.op not in ("add", "mul") or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    qa = gen.q.get(a) if isinstance(a, fx.Node) else None
    qb = gen.q.get(b) if isinstance(b, fx.Node) else None
    scale, zp = site.qparams()
    if site.op == "mul":
        if qa is None:
            a, b, qa, qb = b, a, qb, qa
        if qa is None or not isinstance(b, fx.Node):
            return None
        if qb is not None and site.backend == "onednn":  # an int8 gate: dequantized in the kernel
            gate = eltwise.ChannelGate(*qa, *qb, scale, zp, site.activation)
            src = f"{gen.const(gate, 'gate')}({gen.var(a)}, {gen.var(b)})"
        else:
            mul = eltwise.mul_uint8 if site.backend == "onednn" else reference.mul
            src = f"{gen.const(mul)}({gen.var(a)}, {qa[0]!r}, {qa[1]!r}, {gen.expr(b, dequantize=True)}, " \
                  f"{scale!r}, {zp!r}, {site.activation!r})"
    elif qa is None or qb is None:
        return None
    else:
        add = eltwise.add_uint8 if site.backend == "onednn" else reference.add
        src = f"{gen.const(add)}({gen.var(a)}, {qa[0]!r}, {qa[1]!r}, {gen.var(b)}, {qb[0]!r}, {qb[1]!r}, " \
              f"{scale!r}, {zp!r}, {site.activation!r}, {site.numerics!r})"
    if site.output_int8:
        return _emit(gen, node, src, (scale, zp)) if _passes_qparams(value, (scale, zp)) else None
    if type(value) is not torch.Tensor:
        return None
    return _emit(gen, node, f"_dq({src}, {scale!r}, {zp!r})", None)


def _function(node: fx.Node, value: Any, gen: Codegen) -> int | None:
    """Functional ops on one int8 value (the first argument; no other int8 argument)."""
    args = node.args
    if not args or not isinstance(args[0], fx.Node) or args[0] not in gen.q:
        return None
    held: list[fx.Node] = []
    fx.node.map_arg((args[1:], node.kwargs), held.append)
    if any(n in gen.q for n in held):
        return None
    x, qx = args[0], gen.q[args[0]]
    xv = gen.var(x)
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return _emit(gen, node, gen.call(f"{xv}.{node.target}", args[1:], node.kwargs), None)
    if node.target is getattr and len(args) == 2 and args[1] in _METADATA_ATTRS:
        return _emit(gen, node, f"{xv}.{args[1]}", None)
    if not _passes_qparams(value, qx):
        return None
    func = op_callable(node)
    if func in _CLAMPS:
        return _clamp(gen, node, xv, qx, value, *_CLAMPS[func])
    handler = _NATIVE.get(func)
    rest, kwargs = gen.expr(tuple(args[1:])), gen.expr(dict(node.kwargs))
    if handler is _max_pool:
        return _emit(gen, node, f"{gen.const(max_pool_data)}({gen.const(func)}, {xv}, {rest}, {kwargs})", qx)
    if handler is _avg_pool:
        src = f"{gen.const(avg_pool_data)}({gen.const(func)}, {xv}, {qx[1]!r}, {rest}, {kwargs})"
        return _emit(gen, node, src, qx)
    if handler is _pad and value.zero_point == qx[1]:  # zero padding: the zero point is 0.0
        pad = args[1] if len(args) > 1 else node.kwargs.get("pad")
        if not _has_node(pad):
            return _emit(gen, node, f"{gen.const(F.pad)}({xv}, {gen.const(pad)}, value={qx[1]!r})", qx)
    if handler is _view and not node.kwargs:
        return _emit(gen, node, gen.call(gen.const(view_data), (Raw(xv),) + tuple(args[1:]), {}), qx)
    if handler is _on_data:
        if node.op == "call_method":
            return _emit(gen, node, gen.call(f"{xv}.{node.target}", args[1:], node.kwargs), qx)
        return _emit(gen, node, gen.call(gen.const(func), (Raw(xv),) + tuple(args[1:]), node.kwargs), qx)
    return None


