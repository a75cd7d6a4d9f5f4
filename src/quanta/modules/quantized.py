"""Static int8 modules: QuantizedLinear, QuantizedConv1d, QuantizedConv2d.

Each holds int8 per-channel weights, an int32 bias at scale ``input_scale * weight_scale``,
and its calibrated input and output qparams as buffers, so ``state_dict()`` shows exactly
what runs. Input is a float tensor (quantized here with the input qparams) or a QTensor;
output is a QTensor when the next op consumes int8 (``output_int8``), float32 otherwise.

``backend`` (set by ``modules.backends.select_backends``) picks the kernel:
- "reference": the integer-exact spec in :mod:`quanta.kernels.reference`;
- "onednn": weights prepacked once for ``torch.ops.onednn`` (fused activation and
  requantization, uint8 channels_last activations). Linear checks per call whether the
  row count is large enough for int8 to win and otherwise takes the float path;
- "float": float32 op on the dequantized weights (built lazily) and the dequantized input,
  for ops where int8 loses on this CPU. Results match the reference within one output quantum.
Packed weights and float copies are caches: never saved, dropped on copy/pickle, rebuilt
after ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from quanta.capture.callsites import LeafMarker
from quanta.config import QuantSpec
from quanta.errors import NonFiniteInputError, QuantizedInputError
from quanta.kernels import dispatch, onednn, reference
from quanta.modules.float_inputs import quantize_float_input
from quanta.numerics.qparams import choose_qparams, quantize
from quanta.qtensor import QTensor

KERNEL_BACKENDS = ("reference", "onednn", "float")
_CACHES = ("_packed", "_float", "_int8_rows")
_GENERATION = [0]


def generation() -> int:
    """Bumped whenever a quantized module's or call site's qparams or kernels are reset; the
    module keeps the value as its stamp. The graph runtime, which holds them as constants,
    compares the stamps of its modules when this changes and is rebuilt if one of them did."""
    return _GENERATION[0]


def bump_generation(owner: nn.Module) -> None:
    _GENERATION[0] += 1
    owner.__dict__["_generation"] = _GENERATION[0]


BIAS_LIMIT = 2**30  # |int32 bias| stays below this: room left for the accumulated products


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, min_scale: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weights and their float32 scales (at least ``min_scale``)."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale, zero_point = choose_qparams(flat.amin(dim=1), flat.amax(dim=1), spec)
    if min_scale is not None:
        scale = torch.maximum(scale, min_scale.to(scale.dtype))
    return quantize(weight.detach(), scale, zero_point, spec, axis=0), scale


def bias_scale_floor(bias: torch.Tensor, input_scale: float) -> torch.Tensor:
    """The smallest weight scale per channel at which ``bias`` fits the int32 bias (at scale
    input x weight) within ``BIAS_LIMIT``. A channel whose weights are all but zero (BatchNorm
    folded into a dead channel) and whose bias is not would otherwise overflow int32: its
    weights take a coarser scale instead, and its constant output stays exact."""
    return (bias.detach().double().abs() / (float(input_scale) * BIAS_LIMIT)).float()


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return y.relu_()
    if activation == "relu6":
        return y.clamp_(0.0, 6.0)
    return reference.apply_activation(y, activation)


class QuantizedModule(LeafMarker, nn.Module):
    """Shared state, input handling and backend caches of the static int8 modules."""

    rank: tuple[int, ...] = ()
    size_dim = 1  # the input dimension the weights' second dimension (times groups) must match
    channels_last_input = False  # quantize float inputs straight into the layout the kernel takes

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_spec: QuantSpec,
                 input_qparams: tuple[float, int], output_qparams: tuple[float, int],
                 activation: str = "none", output_int8: bool = False) -> None:
        super().__init__()
        floor = None if bias is None else bias_scale_floor(bias, input_qparams[0])
        w_q, w_scale = quantize_weight(weight, weight_spec, floor)
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
        self.forced = False  # True: run oneDNN on every call (config asked for it), no per-call choice
        self.nonfinite = "raise"  # QuantConfig.nonfinite, set with the backend
        self.numerics = "onnxruntime"  # QuantConfig.numerics: how a float input is quantized
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

    # ---- qparams and backend caches -------------------------------------------------------
    def _sync(self) -> None:
        """Cache qparams as python numbers (read on every call) and drop kernel caches."""
        self._in = (float(self.input_scale), int(self.input_zero_point))
        self._out = (float(self.output_scale), int(self.output_zero_point))
        bump_generation(self)
        for key in _CACHES:
            self.__dict__.pop(key, None)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()
        if self.backend == "onednn":
            self._packed_kernel()

    def __getstate__(self) -> dict[str, Any]:
        # prepacked oneDNN weights are opaque tensors that cannot be copied or pickled
        return {k: v for k, v in self.__dict__.items() if k not in _CACHES}

    def set_backend(self, backend: str, forced: bool = False) -> None:
        """Run on ``backend`` ("reference" | "onednn" | "float"); oneDNN weights are packed now.
        ``forced``: always oneDNN, even for calls too small for int8 to win.
        Raises NotImplementedError/RuntimeError when oneDNN cannot run this layer."""
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}; expected one of {KERNEL_BACKENDS}")
        self.backend, self.forced = backend, forced
        self._sync()
        if backend == "onednn":
            self._packed_kernel()

    def _packed_kernel(self) -> Any:
        packed = self.__dict__.get("_packed")
        if packed is None:
            packed = self.__dict__["_packed"] = self._pack()
        return packed

    def _pack(self) -> Any:
        raise NotImplementedError

    def _float_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dequantized weight and float bias, built on first use."""
        cached = self.__dict__.get("_float")
        if cached is None:
            shape = [-1] + [1] * (self.weight.dim() - 1)
            w = self.weight.float() * self.weight_scale.float().reshape(shape)
            if w.dim() == 4:  # activations are channels_last: keep the fast mkldnn conv path
                w = w.contiguous(memory_format=torch.channels_last)
            b = None
            if self.bias is not None:
                b = (self.bias.double() * self._in[0] * self.weight_scale.double()).float()
            cached = self.__dict__["_float"] = (w, b)
        return cached

    # ---- inputs and outputs ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.compute(x)
        except NonFiniteInputError:
            return self.nonfinite_forward(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """This layer as a weight op call site: ``func(x, weight, ...)`` routed here by the
        call-site mode computes ``self(x)`` (the call's weight is this layer's int8 weight)."""
        return self(args[0] if args else kwargs["input"])

    def float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def nonfinite_forward(self, x: torch.Tensor) -> torch.Tensor:
        """NaN/Inf in a float input: a clear error naming this layer, or (``nonfinite="propagate"``)
        this call in float on the dequantized weights, so the values propagate as in float."""
        with torch._C.DisableTorchFunction():
            bad = ~torch.isfinite(x.detach())
            if self.nonfinite != "propagate":
                rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist() if bad.dim() else []
                raise QuantizedInputError(
                    f"{self.layer_name or type(self).__name__} ({type(self).__name__}): its input holds "
                    f"{int(bad.sum())} NaN/Inf value(s) (in batch rows {rows[:8]}); int8 cannot carry them. "
                    "Pass finite inputs, or QuantConfig(nonfinite='propagate') to get them back as float does"
                ) from None
            w, b = self._float_params()
            return _activate(self.float_op(x.float(), w, b), self.activation)

    def _check_float_input(self, x: Any) -> None:
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
        self._check_size(x.shape)

    def _check_size(self, shape: torch.Size) -> None:
        """The feature (Linear) or channel (conv) size the weights were made for: the kernels
        would otherwise read the weights out of bounds or mix up rows."""
        dim, want = self.size_dim, self.weight.shape[1] * getattr(self, "groups", 1)
        if shape[dim] != want:
            what = "features in the last dimension" if dim == -1 else "channels"
            raise QuantizedInputError(
                f"{self.layer_name or type(self).__name__} ({type(self).__name__}) expects {want} input "
                f"{what}, got shape {tuple(shape)}"
            )

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 data at this module's input qparams, from a float tensor or a QTensor."""
        scale, zero_point = self._in
        if isinstance(x, QTensor):
            self._check_size(x.shape)
            if x.scale == scale and x.zero_point == zero_point:
                return x.int_data
            return reference.requantize(x.int_data, x.scale, x.zero_point, scale, zero_point)
        self._check_float_input(x)
        return quantize_float_input(x, scale, zero_point, self.backend, self.numerics,
                                    self.channels_last_input)

    def dequantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The float value the int8 op would see: a QTensor dequantized, a float tensor
        fake-quantized with the input qparams (round, clamp, scale back in one op)."""
        if isinstance(x, QTensor):
            return reference.dequantize_per_tensor(x.int_data, x.scale, x.zero_point)
        self._check_float_input(x)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteInputError("input holds NaN or Inf")
        return torch.fake_quantize_per_tensor_affine(x.detach().float(), self._in[0], self._in[1], 0, 255)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return QTensor(y, *self._out) if self.output_int8 else y

    def finish_float(self, y: torch.Tensor) -> torch.Tensor:
        """Activation, then requantization when the consumer takes int8 (float path)."""
        y = _activate(y, self.activation)
        if not self.output_int8:
            return y
        return QTensor(onednn.quantize_uint8(y, *self._out, numerics=self.numerics), *self._out)

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
    size_dim = -1

    def __init__(self, float_module: nn.Linear, **kwargs) -> None:  # noqa: ANN003
        super().__init__(float_module.weight, float_module.bias, **kwargs)
        self.in_features, self.out_features = float_module.in_features, float_module.out_features

    def _pack(self) -> onednn.PackedLinear:
        return onednn.PackedLinear(self.weight, self.weight_scale, self.bias, *self._in)

    def _int8_wins(self, x: torch.Tensor) -> bool:
        """Per-call choice on the oneDNN backend: int8 only when the row count is large enough."""
        quantized_input = isinstance(x, QTensor)
        data = x.int_data if quantized_input else x
        return self.int8_wins_rows(data.numel() // self.in_features, quantized_input)

    def int8_wins_rows(self, rows: int, quantized_input: bool) -> bool:
        """:meth:`_int8_wins` for ``rows`` input rows, cached per (rows, input kind)."""
        key = (rows, quantized_input)
        table = self.__dict__.setdefault("_int8_rows", {})
        wins = table.get(key)
        if wins is None:
            wins = table[key] = dispatch.linear_prefers_int8(
                rows, self.in_features, self.out_features, quantized_input or self.output_int8)
        return wins

    def float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        with torch._C.DisableTorchFunction():
            if backend == "onednn" and (self.forced or self._int8_wins(x)):
                y = self._packed_kernel()(self.quantize_input(x), self.activation, *self.out_args())
                return self.finish(y)
            if backend != "reference":
                w, b = self._float_params()
                return self.finish_float(F.linear(self.dequantized_input(x), w, b))
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

    def _pack(self) -> onednn.PackedConv:
        return onednn.PackedConv(self.weight, self.weight_scale, self.bias, *self._in, self.stride,
                                 self.padding, self.dilation, self.groups)

    def float_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        conv = F.conv1d if w.dim() == 3 else F.conv2d
        return conv(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        with torch._C.DisableTorchFunction():
            # no per-call float fallback: a float conv would need a dequantize before and a quantize
            # after it, which cost more than they save even for tiny convs (MNIST, depthwise)
            if backend == "onednn":
                y = self._packed_kernel()(self.quantize_input(x), self.activation, *self.out_args())
                return self.finish(y)
            if backend != "reference":
                w, b = self._float_params()
                return self.finish_float(self.float_op(self.dequantized_input(x), w, b))
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
    channels_last_input = True
