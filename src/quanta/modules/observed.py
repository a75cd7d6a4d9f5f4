"""Prepared (calibration-time) modules: float compute plus observers, and BN folding."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from quanta.capture.callsites import LeafMarker
from quanta.config import QuantSpec
from quanta.kernels.reference import apply_activation
from quanta.numerics.observers import make_observer
from quanta.qtensor import dequantize_any


def fold_batchnorm(module: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of Conv/Linear ``module`` with eval-mode ``bn`` folded into weight and bias."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    fused = copy.deepcopy(module)
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    factor = (gamma * inv_std).detach()
    bias = module.bias if module.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight = nn.Parameter(module.weight * factor.reshape([-1] + [1] * (module.weight.dim() - 1)))
        fused.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)
    return fused


class ObservedModule(LeafMarker, nn.Module):
    """A float Conv/Linear (BN already folded) with its fused activation, observing the input
    and output activations during calibration. Runs exactly the float computation."""

    def __init__(self, module: nn.Module, activation: str, weight_spec: QuantSpec,
                 activation_spec: QuantSpec, name: str) -> None:
        super().__init__()
        self.module = module
        self._init_observing(activation, weight_spec, activation_spec, name, make_observer)

    def _init_observing(self, activation: str, weight_spec: QuantSpec, activation_spec: QuantSpec,
                        name: str, make: Callable[[QuantSpec, str], nn.Module]) -> None:
        """The fields ``convert`` reads, shared with the QAT modules (which pass FakeQuantize)."""
        self.activation = activation
        self.weight_spec = weight_spec
        self.activation_spec = activation_spec
        self.layer_name = name
        self.input_observer = make(activation_spec, f"{name} (input)")
        self.output_observer = make(activation_spec, f"{name} (output)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_observer(dequantize_any(x))
        y = apply_activation(self.module(x), self.activation)
        return self.output_observer(y)

    def run(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        """This layer as a weight op call site (see ``QuantizedModule.run``)."""
        return self(args[0] if args else kwargs["input"])

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
