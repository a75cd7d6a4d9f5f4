"""Weight-carrying op calls: the unit quanta quantizes, wherever the call is made.

A *weight op* is a call of ``F.conv1d/2d/3d``, ``F.linear`` or ``matmul`` whose weight operand
is a parameter of the model: inside ``nn.Conv2d.forward``, inside a subclass's own forward
(efficientnet-pytorch's same-padded convs), or as a functional call in any forward. Exact
``nn.Conv2d``/``nn.Linear`` modules whose forward is the class's own are quantized as modules
(the module *is* the op); every other weight op becomes an op site keyed by call site, run by
the same int8 module classes, built from the call's own arguments (:func:`float_module`).

This file is the one place that knows the ops' signatures: which argument is the weight, the
MACs of a call, and the float module that computes the same thing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

# canonical op name -> the float module computing the same (None: no int8 kernel, float only)
WEIGHT_OPS: dict[str, type[nn.Module] | None] = {
    "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "linear": nn.Linear, "matmul": nn.Linear,
    "conv3d": None, "conv_transpose1d": None, "conv_transpose2d": None, "conv_transpose3d": None,
}
_CONV_ARGS = ("stride", "padding", "dilation", "groups")


def operands(op: str, args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """(input, weight, bias) of a weight op call, each possibly not a tensor."""
    if op == "matmul":
        other = args[1] if len(args) > 1 else kwargs.get("other")
        return (args[0] if args else kwargs.get("input")), other, None
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, w, b


def call_args(op: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's non-tensor arguments (stride, padding, dilation, groups) as plain data."""
    if not op.startswith("conv"):
        return {}
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    out = {}
    for i, name in enumerate(_CONV_ARGS):
        v = args[3 + i] if len(args) > 3 + i else kwargs.get(name, defaults[name])
        out[name] = v if isinstance(v, (int, str)) else [int(e) for e in v]
    return out


def macs(op: str, x: Any, weight: Any, out: Any) -> int:
    """Multiply-accumulates of one call: every output element sums one weight row (a transposed
    conv: every input element scatters one weight column)."""
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, out)):
        return 0
    if op.startswith("conv_transpose"):
        return int(x.numel()) * math.prod(weight.shape[1:])
    if op == "matmul":
        per_output = weight.shape[0] if weight.dim() >= 2 else 1
    else:
        per_output = math.prod(weight.shape[1:])
    return int(out.numel()) * int(per_output)


def int8_reason(op: str, weight: torch.Tensor, call: dict[str, Any]) -> str:
    """Why this weight op call cannot run int8, or "" if it can."""
    if WEIGHT_OPS.get(op) is None:
        return f"no int8 kernel ({op})"
    if op == "matmul" and weight.dim() != 2:
        return f"matmul with a {weight.dim()}-d parameter has no int8 kernel"
    if op.startswith("conv") and weight.dim() != int(op[4]) + 2:
        return f"{op} with a {weight.dim()}-d weight"
    return ""


def float_module(op: str, weight: torch.Tensor, bias: torch.Tensor | None, call: dict[str, Any]) -> nn.Module:
    """The exact float module computing this call, sharing ``weight``/``bias`` (a matmul's
    ``x @ W`` is a Linear with weight ``W.T``)."""
    cls = WEIGHT_OPS[op]
    if cls is nn.Linear:
        w = weight.t() if op == "matmul" else weight
        m = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    else:
        m = cls(weight.shape[1] * call["groups"], weight.shape[0], tuple(weight.shape[2:]),
                stride=call["stride"], padding=call["padding"], dilation=call["dilation"],
                groups=call["groups"], bias=bias is not None, device="meta")
        w = weight
    m.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w.detach(), requires_grad=w.requires_grad)
    if bias is not None:
        m.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=False)
    return m


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id of every parameter of ``model`` -> its first qualified name (tied weights share one)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """The qualified names of each parameter reachable under more than one (tied weights: an LM
    head and its embedding)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def opened_modules(model: nn.Module, mode: str) -> list[str]:
    """Childless modules to look inside (their functional calls become call sites): user-defined
    classes holding a weight (a parameter of 2 or more dimensions) that quanta does not quantize
    as a whole module, e.g. an ``nn.Conv2d`` subclass with its own forward."""
    from quanta.capture.callsites import LeafMarker
    from quanta.modules import mapping

    opened = []
    for name, m in model.named_modules():
        if not name or next(m.children(), None) is not None or isinstance(m, LeafMarker):
            continue
        if mapping.quantized_type(m, mode) is not None or type(m).__module__.startswith("torch."):
            continue
        if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            opened.append(name)
    return opened
