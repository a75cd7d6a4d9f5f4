"""Static int8 modules: QuantizedLinear, QuantizedConv1d, QuantizedConv2d.

Each holds int8 per-channel weights, an int32 bias at scale ``input_scale * weight_scale``,
and its calibrated input and output qparams as buffers, so ``state_dict()`` shows exactly
what runs. Input is a float tensor (quantized here with the input qparams) or a QTensor;
output is a QTensor when the next op consumes int8 (``output_int8``), float32 otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from quanta.capture.callsites import LeafMarker
from quanta.config import QuantSpec
from quanta.errors import QuantizedInputError
from quanta.kernels import reference
from quanta.numerics.qparams import choose_qparams, quantize
from quanta.qtensor import QTensor


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weights and their float32 scales."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale, zero_point = choose_qparams(flat.amin(dim=1), flat.amax(dim=1), spec)
    return quantize(weight.detach(), scale, zero_point, spec, axis=0), scale


class QuantizedModule(LeafMarker, nn.Module):
    """Shared state and input handling of the static int8 modules."""

    rank: tuple[int, ...] = ()

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_spec: QuantSpec,
                 input_qparams: tuple[float, int], output_qparams: tuple[float, int],
                 activation: str = "none", output_int8: bool = False) -> None:
        super().__init__()
        w_q, w_scale = quantize_weight(weight, weight_spec)
        self.register_buffer("weight", w_q)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("weight_zero_point", torch.zeros(w_q.shape[0], dtype=torch.int32))
        self.register_buffer("input_scale", torch.tensor(float(input_qparams[0])))
        self.register_buffer("input_zero_point", torch.tensor(int(input_qparams[1]), dtype=torch.int32))
        self.register_buffer("output_scale", torch.tensor(float(output_qparams[0])))
        self.register_buffer("output_zero_point", torch.tensor(int(output_qparams[1]), dtype=torch.int32))
        b = None if bias is None else reference.quantize_bias(bias.detach(), input_qparams[0], w_scale)
        self.register_buffer("bias", b)
        self.weight_bits = weight_spec.bits
        self.activation = activation
        self.output_int8 = output_int8
        self.backend = "reference"
        self.layer_name = ""
        self._sync()

    @classmethod
    def empty_like(cls, float_module: nn.Module, layer: Any, has_bias: bool) -> QuantizedModule:
        """A module shaped like ``float_module`` with the settings of ``layer`` (a LayerPlan) and
        placeholder tensors, to be filled by ``load_state_dict`` (how ``quanta.load`` rebuilds)."""
        spec = QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=layer.weight_bits or 8)
        module = cls(float_module, weight_spec=spec, input_qparams=layer.input_qparams or (1.0, 0),
                     output_qparams=layer.output_qparams or (1.0, 0), activation=layer.activation,
                     output_int8=layer.output_int8)
        module.bias = torch.zeros(module.weight.shape[0], dtype=torch.int32) if has_bias else None
        module.layer_name = layer.name
        return module

    def _sync(self) -> None:
        """Cache qparams as python numbers (read on every call)."""
        self._in = (float(self.input_scale), int(self.input_zero_point))
        self._out = (float(self.output_scale), int(self.output_zero_point))

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 data at this module's input qparams, from a float tensor or a QTensor."""
        scale, zero_point = self._in
        if isinstance(x, QTensor):
            return reference.requantize(x.int_data, x.scale, x.zero_point, scale, zero_point)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise QuantizedInputError(
                f"{self.layer_name or type(self).__name__} ({type(self).__name__}) expects a floating "
                f"point input (it quantizes it with its calibrated scale), got {got}"
            )
        if x.dim() not in self.rank:
            raise QuantizedInputError(
                f"{self.layer_name or type(self).__name__} ({type(self).__name__}) expects an input of "
                f"rank {' or '.join(map(str, self.rank))}, got shape {tuple(x.shape)}"
            )
        return reference.quantize_per_tensor(x, scale, zero_point)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return QTensor(y, *self._out) if self.output_int8 else y

    def out_args(self) -> tuple[float | None, int]:
        return (self._out if self.output_int8 else (None, 0))

    def extra_repr(self) -> str:
        return (
            f"activation={self.activation}, weight_bits={self.weight_bits}, "
            f"input=(scale={self._in[0]:.4g}, zp={self._in[1]}), "
            f"output={'int8' if self.output_int8 else 'float'}, backend={self.backend}"
        )


class QuantizedLinear(QuantizedModule):
    rank = tuple(range(2, 8))

    def __init__(self, float_module: nn.Linear, **kwargs) -> None:  # noqa: ANN003
        super().__init__(float_module.weight, float_module.bias, **kwargs)
        self.in_features, self.out_features = float_module.in_features, float_module.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = self.quantize_input(x)
        out_scale, out_zp = self.out_args()
        y = reference.linear(x_q, self._in[0], self._in[1], self.weight, self.weight_scale, self.bias,
                             self.activation, out_scale, out_zp)
        return self.finish(y)


class _QuantizedConvNd(QuantizedModule):
    def __init__(self, float_module: nn.Conv1d | nn.Conv2d, **kwargs) -> None:  # noqa: ANN003
        super().__init__(float_module.weight, float_module.bias, **kwargs)
        self.in_channels, self.out_channels = float_module.in_channels, float_module.out_channels
        self.kernel_size = float_module.kernel_size
        self.stride, self.padding = float_module.stride, float_module.padding
        self.dilation, self.groups = float_module.dilation, float_module.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = self.quantize_input(x)
        out_scale, out_zp = self.out_args()
        y = reference.conv(x_q, self._in[0], self._in[1], self.weight, self.weight_scale, self.bias,
                           self.stride, self.padding, self.dilation, self.groups,
                           self.activation, out_scale, out_zp)
        return self.finish(y)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, " + super().extra_repr())


class QuantizedConv1d(_QuantizedConvNd):
    rank = (3,)


class QuantizedConv2d(_QuantizedConvNd):
    rank = (4,)
