"""Sibling int8 Linears as one GEMM in the graph runtime (attention's query, key and value).

Linears that read the same float tensor at the same input qparams run as one int8 GEMM over
their concatenated weights: one input quantization, one kernel call and one epilogue instead of
three. Dynamic Linears qualify always (their input is quantized on the fly from that tensor);
static ones when their calibrated input qparams agree and their outputs are float. Each output
element is computed exactly as the separate layers compute it (int32 accumulation, then the same
per-element scaling), so the graph's equality check with eager mode holds; the outputs are column
slices (views) of one tensor. Any call the fused kernel would not take as the layers' hot path
(few rows, NaN/Inf, other dtypes) runs the layers one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from quanta.errors import NonFiniteInputError
from quanta.kernels import onednn
from quanta.kernels.dynamic import DynamicLinearKernel
from quanta.modules.dynamic import DynamicQuantizedLinear
from quanta.modules.quantized import QuantizedLinear


class FusedDynamicLinears:
    """``(m(x) for m in modules)`` through one GEMM: the modules' int8 weights stacked."""

    def __init__(self, modules: list[DynamicQuantizedLinear]) -> None:
        self.modules = modules
        self.in_features, self.per_row = modules[0].in_features, modules[0].per_row
        self.splits = [m.out_features for m in modules]
        weight = torch.cat([m.weight for m in modules])
        scale = torch.cat([m.weight_scale for m in modules])
        self.kernel = DynamicLinearKernel(weight, scale, "onednn")
        biases = [m.bias for m in modules]
        self.bias = None if biases[0] is None else torch.cat(biases)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = self.in_features
        if type(x) is torch.Tensor and x.dtype == torch.float32 and x.dim() > 1 and x.shape[-1] == k \
                and x.numel() > self.kernel.small_m * k:
            try:
                if self.per_row:
                    y = self.kernel.onednn_per_row(x.reshape(-1, k), self.bias)
                    y = y.reshape(*x.shape[:-1], sum(self.splits))
                else:
                    y = self.kernel.onednn_per_tensor(x, self.bias)
                return tuple(y.split(self.splits, dim=-1))
            except NonFiniteInputError:
                pass  # the layers raise or propagate as configured
        return tuple(m(x) for m in self.modules)


class FusedStaticLinears:
    """Static int8 Linears with float outputs and one input qparams, through one packed GEMM."""

    def __init__(self, modules: list[QuantizedLinear], kernels: list[Callable]) -> None:
        first = modules[0]
        self.modules, self.kernels = modules, kernels
        self.splits = [m.out_features for m in modules]
        biases = [m.bias for m in modules]
        bias = None if biases[0] is None else torch.cat(biases)
        weight, scale = torch.cat([m.weight for m in modules]), torch.cat([m.weight_scale for m in modules])
        self.packed = onednn.PackedLinear(weight, scale, bias, *first._in)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = x.numel() // self.modules[0].in_features if x.dim() >= 2 else 0
        if rows and all(m.forced or m.int8_wins_rows(rows, False) for m in self.modules):
            try:
                y = self.packed(self.modules[0].quantize_input(x), self.modules[0].activation)
                return tuple(y.split(self.splits, dim=-1))
            except NonFiniteInputError:
                pass  # each layer raises or propagates as configured
        return tuple(kernel(x) for kernel in self.kernels)


def _static(node: fx.Node, module: nn.Module, values: dict[fx.Node, Any]) -> tuple | None:
    """The grouping key of a static int8 Linear with a float input and a float output."""
    if type(module) is not QuantizedLinear or module.backend != "onednn" or module.output_int8:
        return None
    x, y = values.get(node.args[0]), values.get(node)
    if type(x) is not torch.Tensor or x.dtype != torch.float32 or type(y) is not torch.Tensor:
        return None
    return ("static", node.args[0], module.in_features, module._in, module.activation, module.forced,
            module.numerics, module.bias is None)


def _fusable(node: fx.Node, model: nn.Module, values: dict[fx.Node, Any]) -> DynamicQuantizedLinear | None:
    if node.op != "call_module" or node.kwargs or len(node.args) != 1:
        return None
    if not isinstance(node.args[0], fx.Node):
        return None
    module = model.get_submodule(node.target)
    if type(module) is not DynamicQuantizedLinear or module.kernel("weight").backend != "onednn":
        return None
    x, y = values.get(node.args[0]), values.get(node)
    if type(x) is not torch.Tensor or x.dtype != torch.float32 or type(y) is not torch.Tensor:
        return None
    return module


def groups(graph: fx.Graph, model: nn.Module, values: dict[fx.Node, Any]) -> dict[fx.Node, tuple[int, int]]:
    """node -> (group, position) for each int8 Linear that shares its input with another of the
    same kind, input size and quantization (dynamic: per row or not; static: input qparams,
    activation, float output) and bias presence."""
    by_input: dict[tuple, list[tuple[fx.Node, nn.Module]]] = {}
    for node in graph.nodes:
        module = _fusable(node, model, values)
        if module is not None:
            key = ("dynamic", node.args[0], module.in_features, module.per_row, module.bias is None)
            by_input.setdefault(key, []).append((node, module))
        elif node.op == "call_module" and not node.kwargs and len(node.args) == 1 \
                and isinstance(node.args[0], fx.Node):
            key = _static(node, model.get_submodule(node.target), values)
            if key is not None:
                by_input.setdefault(key, []).append((node, model.get_submodule(node.target)))
    found: dict[fx.Node, tuple[int, int]] = {}
    for members in by_input.values():
        if len(members) > 1:
            group = len({g for g, _ in found.values()})
            found.update({node: (group, i) for i, (node, _) in enumerate(members)})
    return found
