"""Quantization-aware training modules: float Conv/Linear (+ BN) trained through fake quantization.

Every tensor the int8 model will quantize is fake-quantized here with the same qparams and the
same rounding, and the straight-through estimator passes gradients (zero outside the range):
- the input, with the producer's output qparams when an int8 producer feeds it (as convert
  wires it), else with this layer's own moving-average observer;
- the weight, symmetric per output channel from its current min/max (as ``quantize_weight``);
- the bias, rounded to int32 at ``input_scale * weight_scale`` (as ``quantize_bias``);
- the output after the fused activation, only when the int8 module emits int8.

Conv/Linear followed by BatchNorm trains with BN folded into the weights: in train mode the
weight is scaled by ``gamma / sqrt(running_var + eps)`` before fake quantization and the conv
output is unscaled and passed through BN with batch statistics (running statistics update);
in eval mode, or once ``bn_frozen`` is set, the forward is exactly the folded conv that
``convert`` quantizes. The modules present the ``ObservedModule`` interface ``convert`` reads:
``module`` (float Conv/Linear with BN folded from the running statistics), ``activation``,
``weight_spec``, ``input_observer`` and ``output_observer``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from quanta.config import QuantSpec
from quanta.errors import UnsupportedModelError
from quanta.kernels import reference
from quanta.modules.observed import ObservedModule, fold_batchnorm
from quanta.numerics.observers import MovingAverageMinMaxObserver
from quanta.numerics.qparams import choose_qparams, fake_quantize
from quanta.qtensor import dequantize_any


class FakeQuantize(MovingAverageMinMaxObserver):
    """A moving-average min/max observer that also fake-quantizes what it sees.

    Statistics update in train mode while ``observer_enabled`` is set (``quanta.freeze`` clears
    it); an observer that has never seen data initializes on its first call in any mode.
    ``calculate_qparams`` is the one ``convert`` calls, so training and int8 share qparams.
    """

    def __init__(self, spec: QuantSpec, layer: str = "") -> None:
        super().__init__(dataclasses.replace(spec, observer="moving_average"), layer)
        self.register_buffer("observer_enabled", torch.tensor(True))

    def observe(self, x: torch.Tensor) -> None:
        if not self.observed or (self.training and bool(self.observer_enabled)):
            super().forward(x)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        learned = self._modules.get("learned_range")  # set by quanta.ptq.range_learning
        if learned is not None:
            lo, hi = learned.bounds()
            return lo.detach(), hi.detach()
        return super().range()

    def fake_quant(self, x: torch.Tensor, qparams_from: FakeQuantize | None = None) -> torch.Tensor:
        """Fake-quantize ``x`` with this observer's qparams (or ``qparams_from``'s)."""
        source = self if qparams_from is None else qparams_from
        learned = source._modules.get("learned_range")
        if learned is not None:
            return learned.fake_quant(x, source.spec)
        scale, zero_point = source.calculate_qparams()
        return fake_quantize(x, scale, zero_point, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        return self.fake_quant(x)


def fake_quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric fake quantization (same qparams as ``quantize_weight``)."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale, zero_point = choose_qparams(flat.amin(dim=1), flat.amax(dim=1), spec)
    return fake_quantize(weight, scale, zero_point, spec, axis=0), scale


def fake_quantize_bias(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """Bias rounded to int32 at ``input_scale * weight_scale`` (straight-through gradient)."""
    q = reference.quantize_bias(bias.detach(), input_scale, weight_scale)
    rounded = (q.double() * (input_scale * weight_scale.double())).to(bias.dtype)
    return bias + (rounded - bias).detach()


def _channel_shape(y: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (y.dim() - 2)


class QATModule(ObservedModule):
    """Shared QAT forward for Linear/Conv1d/Conv2d with optional folded BatchNorm.

    Subclasses ``ObservedModule`` so ``convert`` treats it as one, but keeps the trainable
    float layer as ``float_module`` (plus ``bn``) and exposes ``module`` as the folded view,
    so ``ObservedModule.__init__`` (which would register ``module``) is not called.
    """

    float_type: type[nn.Module] = nn.Module

    def __init__(self, float_module: nn.Module, *, bn: nn.modules.batchnorm._BatchNorm | None = None,
                 activation: str = "none", weight_spec: QuantSpec, activation_spec: QuantSpec,
                 name: str = "", output_int8: bool = True) -> None:
        nn.Module.__init__(self)
        own_forward = type(float_module).forward is not self.float_type.forward
        if not isinstance(float_module, self.float_type) or own_forward:
            raise UnsupportedModelError(
                f"{name or type(self).__name__}: {type(self).__name__} wraps {self.float_type.__name__}, "
                f"got {type(float_module).__name__}"
            )
        if bn is not None and (bn.running_mean is None or bn.running_var is None):
            raise UnsupportedModelError(
                f"{name}: the BatchNorm fused into it has no running statistics "
                "(track_running_stats=False), so it cannot be folded for int8"
            )
        if weight_spec.bits is None:
            raise ValueError(f"{name}: resolve weight bits before building a QAT module")
        self.float_module = float_module
        self.bn = bn
        self.output_int8 = output_int8
        self._init_observing(activation, weight_spec, activation_spec, name, FakeQuantize)
        self.register_buffer("bn_frozen", torch.tensor(False))

    @property
    def input_source(self) -> FakeQuantize | None:
        """The int8 producer's output observer whose qparams this input uses (not a submodule)."""
        return self.__dict__.get("_input_source")

    def set_input_source(self, observer: FakeQuantize | None) -> None:
        """Share the producer's qparams by reference, as ``convert`` does; kept out of
        ``_modules`` so it is neither a child nor a second copy in ``state_dict``."""
        self.__dict__["_input_source"] = observer

    @property
    def module(self) -> nn.Module:
        """The float Conv/Linear that ``convert`` quantizes: BN folded from running statistics."""
        if self.bn is None:
            return self.float_module
        return fold_batchnorm(self.float_module, self.bn)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.float_module, nn.Linear):
            return F.linear(x, weight, bias)
        return self.float_module._conv_forward(x, weight, bias)

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with BN folded from running statistics (same arithmetic as
        ``fold_batchnorm``, but differentiable so frozen-BN training still learns)."""
        w, b = self.float_module.weight, self.float_module.bias
        bn = self.bn
        if bn is None:
            return w, b
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
        beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
        factor = gamma * inv_std
        bias = b if b is not None else torch.zeros_like(bn.running_mean)
        weight = w * factor.reshape([-1] + [1] * (w.dim() - 1))
        return weight, (bias - bn.running_mean) * factor + beta

    def _forward_batch_stats(self, x: torch.Tensor) -> torch.Tensor:
        """Train-mode Conv+BN: fake-quantize the folded weight, unscale, BN on batch statistics."""
        w, bn = self.float_module.weight, self.bn
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        w_fq, _ = fake_quantize_weight(w * factor.reshape([-1] + [1] * (w.dim() - 1)), self.weight_spec)
        y = self._op(x, w_fq, None)
        y = y / factor.reshape(_channel_shape(y))
        if self.float_module.bias is not None:
            y = y + self.float_module.bias.reshape(_channel_shape(y))
        return bn(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = dequantize_any(x)
        self.input_observer.observe(x)
        source = self.input_source if self.input_source is not None else self.input_observer
        x = self.input_observer.fake_quant(x, source)
        if self.bn is not None and self.training and not bool(self.bn_frozen):
            y = self._forward_batch_stats(x)
        else:
            weight, bias = self._folded()
            w_fq, w_scale = fake_quantize_weight(weight, self.weight_spec)
            if bias is not None:
                bias = fake_quantize_bias(bias, float(source.calculate_qparams()[0]), w_scale)
            y = self._op(x, w_fq, bias)
        y = reference.apply_activation(y, self.activation)
        self.output_observer.observe(y)
        return self.output_observer.fake_quant(y) if self.output_int8 else y

    def extra_repr(self) -> str:
        text = f"activation={self.activation}, weight_bits={self.weight_spec.bits}"
        if self.bn is not None:
            text += f", bn={'frozen' if bool(self.bn_frozen) else 'batch statistics'}"
        return text


class QATLinear(QATModule):
    float_type = nn.Linear


class QATConv1d(QATModule):
    float_type = nn.Conv1d


class QATConv2d(QATModule):
    float_type = nn.Conv2d
