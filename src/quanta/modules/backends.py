"""Per-layer backend choice at convert time, recorded in the plan and on each module."""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from quanta.capture.plan import Plan
from quanta.config import QuantSpec
from quanta.kernels import cpu


def resolve_weight_bits(spec: QuantSpec, backend: str) -> QuantSpec:
    """Fill in ``bits=None`` (auto): 7-bit weights where the fast kernels would saturate
    (AVX2 without VNNI), 8-bit elsewhere and on the exact reference path."""
    if spec.bits is not None:
        return spec
    bits = 8 if backend == "reference" else cpu.weight_bits_for_cpu()
    return dataclasses.replace(spec, bits=bits)


def select_backends(model: nn.Module, plan: Plan, requested: str) -> None:
    """Pick the kernel each quantized module runs and record it in the plan."""
    from quanta.modules.quantized import QuantizedModule

    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            module.backend = "reference"
            plan.layers[name].backend = module.backend
