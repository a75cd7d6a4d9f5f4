"""``WeightOnlyLinear``: ``nn.Linear`` with int8 or int4 weights and float activations.

For decoder language models on CPU: a decode step multiplies one row by every weight matrix, so
its time is the time to read the weights; int8 reads a quarter of fp32's bytes, int4 an eighth.
Float in, float out; int4 decode calls (fewer than 8 rows) quantize their input to int8 blocks
inside the kernel unless ``int4_activations="float"`` (``QuantConfig.int4_activations``).
Buffers (see :mod:`quanta.kernels.weight_only` for the formats): ``weight`` (int8 [N, K], or
uint8 [N, K/2] packed int4), ``weight_scale`` (float32 [N], or [N, groups]), ``weight_offset``
(int4 only, float32 [N, groups]) and the float ``bias``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from quanta.capture.callsites import LeafMarker
from quanta.config import QuantSpec
from quanta.errors import QuantizedInputError
from quanta.kernels import weight_only as kernels


def weight_only_problem(module: nn.Module, spec: QuantSpec) -> str:
    """Why ``module`` cannot take ``spec`` as weight-only (empty if it can)."""
    bits = spec.bits or 8
    if bits not in (4, 8):
        return f"weight-only supports 4- and 8-bit weights, not {bits}"
    if bits == 8 and (spec.group_size is not None or not spec.symmetric):
        return "8-bit weight-only weights are symmetric per output channel (no group_size)"
    k = module.in_features
    group = spec.group_size or k
    if bits == 4 and (k % 32 or group % 32):
        return f"int4 needs in_features and group_size multiples of 32 (got {k} and {group})"
    return ""


class WeightOnlyLinear(LeafMarker, nn.Module):
    """``nn.Linear`` with int8 (per channel) or int4 (per group) weights; float32 in and out."""

    weight_only = True

    def __init__(self, float_module: nn.Linear, weight_spec: QuantSpec, layer_name: str = "",
                 quantize: bool = True, int4_activations: str = "int8") -> None:
        super().__init__()
        problem = weight_only_problem(float_module, weight_spec)
        if problem:
            raise ValueError(f"{layer_name or 'Linear'}: {problem}")
        self.layer_name = layer_name
        self.in_features, self.out_features = float_module.in_features, float_module.out_features
        self.weight_bits = weight_spec.bits or 8
        self.symmetric = weight_spec.symmetric
        self.group_size = weight_spec.group_size or self.in_features
        self.backend = "native"
        # int4 decode: the input quantized per block of 32 ("int8") or float ("float"), from
        # QuantConfig.int4_activations
        self.int4_activations = int4_activations
        n, k = self.out_features, self.in_features
        bias = float_module.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if self.weight_bits == 8:
            q, scale = kernels.quantize_int8(float_module.weight) if quantize else (
                torch.zeros(n, k, dtype=torch.int8), torch.ones(n))
            offset = None
        elif quantize:
            q, scale, offset = kernels.quantize_int4(float_module.weight, self.group_size, self.symmetric)
        else:
            groups = -(-k // self.group_size)
            q = torch.zeros(n, k // 2, dtype=torch.uint8)
            scale, offset = torch.ones(n, groups), torch.zeros(n, groups)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale.float().contiguous())
        self.register_buffer("weight_offset", None if offset is None else offset.float().contiguous())

    @classmethod
    def empty(cls, float_module: nn.Linear, weight_spec: QuantSpec, layer_name: str = "",
              int4_activations: str = "int8") -> WeightOnlyLinear:
        """The module with zeroed buffers of the right shapes (for loading a saved file)."""
        return cls(float_module, weight_spec, layer_name, quantize=False, int4_activations=int4_activations)

    @property
    def int8_activations(self) -> bool:
        """Whether few-row calls (decode) quantize the input per block of 32 (int4 weights only)."""
        return self.weight_bits == 4 and getattr(self, "int4_activations", "float") == "int8"

    def describe(self) -> str:
        return f"{self.layer_name or 'WeightOnlyLinear'} (WeightOnlyLinear)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise QuantizedInputError(f"{self.describe()} expects a floating point input, got {got}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise QuantizedInputError(
                f"{self.describe()} expects [..., {self.in_features}] input, got shape {tuple(x.shape)}")
        dtype = x.dtype
        rows = x.reshape(-1, self.in_features).float().contiguous()
        int8 = self.int8_activations
        if self.backend == "reference":
            spec = kernels.reference_linear
            if int8 and rows.shape[0] < kernels.PREFILL_ROWS and bool(torch.isfinite(rows).all()):
                spec = kernels.reference_linear_int8_activations
            y = spec(rows, self.weight, self.weight_scale, self.weight_offset, self.group_size, self.bias)
        elif torch.compiler.is_compiling():  # one opaque op in the compiled graph (no graph break)
            y = kernels.linear_op(rows, self.weight, self.weight_scale, self.weight_offset, self.group_size,
                                  self.bias, int8)
        else:
            y = kernels.linear(rows, self.weight, self.weight_scale, self.weight_offset, self.group_size,
                               self.bias, int8)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if dtype == torch.float32 else y.to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return kernels.dequantize(self.weight, self.weight_scale, self.weight_offset, self.group_size)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer on its dequantized weights through torch (for checks)."""
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        fmt = "int8 per channel" if self.weight_bits == 8 else (
            f"int4 {'symmetric' if self.symmetric else 'asymmetric'} groups of {self.group_size}, "
            f"{'int8' if self.int8_activations else 'float'} activations in decode")
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt} (weight-only)"
