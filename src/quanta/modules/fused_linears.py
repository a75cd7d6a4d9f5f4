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


def _key(node: fx.Node, model: nn.Module, values: dict[fx.Node, Any]) -> tuple | None:
    """What a sibling must share with this int8 Linear to join its GEMM (None: not fusable): a
    call on one float32 tensor, with a float output; the input, its size and bias presence; for a
    dynamic Linear how it quantizes (per row or not), for a static one its input qparams,
    activation, per-call choice and numerics."""
    if node.op != "call_module" or node.kwargs or len(node.args) != 1 or type(node.args[0]) is not fx.Node:
        return None
    x, y = values.get(node.args[0]), values.get(node)
    if type(x) is not torch.Tensor or x.dtype != torch.float32 or type(y) is not torch.Tensor:
        return None
    module = model.get_submodule(node.target)
    if type(module) is DynamicQuantizedLinear and module.kernel("weight").backend == "onednn":
        own = ("dynamic", module.per_row)
    elif type(module) is QuantizedLinear and module.backend == "onednn" and not module.output_int8:
        own = ("static", module._in, module.activation, module.forced, module.numerics)
    else:
        return None
    return (node.args[0], module.in_features, module.bias is None, *own)


def groups(graph: fx.Graph, model: nn.Module, values: dict[fx.Node, Any]
           ) -> dict[fx.Node, tuple[list[fx.Node], int]]:
    """node -> (its group's nodes in graph order, its position) for each int8 Linear that
    shares its input and the rest of :func:`_key` with another."""
    by_key: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        key = _key(node, model, values)
        if key is not None:
            by_key.setdefault(key, []).append(node)
    return {node: (members, i) for members in by_key.values() if len(members) > 1
            for i, node in enumerate(members)}
