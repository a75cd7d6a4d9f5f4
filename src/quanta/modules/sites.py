"""``QuantizedSite``: one int8 functional call site (``x + y``, ``torch.cat``, ``q @ k``).

While calibrating it observes its output; after conversion it runs the int8 kernel. The
``QuantaState`` that holds the sites and routes calls to them is in ``modules/state.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from quanta.capture.callsites import LeafMarker
from quanta.config import QuantSpec
from quanta.errors import NonFiniteInputError, QuantizedInputError
from quanta.kernels import eltwise, onednn, reference
from quanta.kernels import matmul as matmul_kernels
from quanta.modules.float_inputs import quantize_float_input
from quanta.modules.quantized import bump_generation
from quanta.modules.state import QuantaState, _EagerCall  # noqa: F401  re-export: old pickles name them here
from quanta.numerics.observers import make_observer
from quanta.qtensor import QTensor, dequantize_any


class QuantizedSite(LeafMarker, nn.Module):
    """One functional call site: observes its output while calibrating, runs int8 after."""

    def __init__(self, key: str, op: str, activation: str, spec: QuantSpec | None = None) -> None:
        super().__init__()
        self.key, self.op, self.activation = key, op, activation
        self.spec = spec
        self.observer = make_observer(spec, f"{key} ({op})") if spec is not None else None
        self.register_buffer("output_scale", torch.tensor(1.0))
        self.register_buffer("output_zero_point", torch.tensor(0, dtype=torch.int32))
        if op == "matmul":  # qparams for an operand that arrives in float (a softmax's output)
            self.register_buffer("input_scale", torch.ones(2))
            self.register_buffer("input_zero_point", torch.zeros(2, dtype=torch.int32))
            self.input_observers = None if spec is None else nn.ModuleList(
                make_observer(spec, f"{key} ({op} operand {i})") for i in range(2))
        self.converted = False
        self.output_int8 = True
        self.backend = "reference"  # "onednn": fused one-pass int8 add (set by select_backends)
        self.fake_quant = False  # QAT: the observer is a FakeQuantize and its output is returned
        self.nonfinite = "raise"  # QuantConfig.nonfinite, set with the backend
        self.numerics = "onnxruntime"  # QuantConfig.numerics, set with the backend

    def set_qparams(self, scale: float, zero_point: int) -> None:
        self.output_scale.fill_(scale)
        self.output_zero_point.fill_(zero_point)
        self.__dict__.pop("_qp", None)
        self.converted = True
        self.observer = None
        bump_generation(self)

    def set_input_qparams(self, qparams: list[tuple[float, int]]) -> None:
        """The (scale, zero point) each matmul operand is quantized at when it arrives in float."""
        for i, (scale, zero_point) in enumerate(qparams):
            self.input_scale[i] = scale
            self.input_zero_point[i] = zero_point
        self.__dict__.pop("_input_qp", None)
        self.input_observers = None
        bump_generation(self)

    def run(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        if not self.converted:
            if self.op == "matmul" and self.input_observers is not None:
                for observer, operand in zip(self.input_observers, args, strict=False):
                    observer(dequantize_any(operand))
            out = func(*args, **kwargs)
            if self.activation != "none":  # fused: a replaced ReLU module after it no longer runs
                out = reference.apply_activation(dequantize_any(out), self.activation)
            if self.observer is not None:
                observed = self.observer(dequantize_any(out))
                if self.fake_quant:
                    return observed
            return out
        scale, zp = self.qparams()
        if self.op == "matmul":
            return self._matmul(func, args, kwargs, scale, zp)
        q = self._int8(func, args, kwargs, scale, zp)
        if q is None:
            y = func(*dequantize_any(args), **dequantize_any(kwargs))
            y = reference.apply_activation(y, self.activation)
            if not bool(torch.isfinite(y).all()):
                return self._nonfinite(y)
            if self.backend != "reference":
                # An input arrived in float (its producer runs float): no int8 kernel runs here.
                # Requantize only for an int8 consumer; a float consumer gets the float result
                # (differs from the reference by < 1/2 output quantum, or less where it clamps).
                if not self.output_int8:
                    return y
                return QTensor(onednn.quantize_uint8(y, scale, zp, numerics=self.numerics), scale, zp)
            q = reference.quantize_per_tensor(y, scale, zp, numerics=self.numerics)
        out = QTensor(q, scale, zp)
        return out if self.output_int8 else out.dequantize()

    def _matmul(self, func: Callable, args: tuple, kwargs: dict, scale: float, zp: int) -> Any:
        """int8 x int8 with an exact int32 accumulator; the output int8 for an int8 reader, else
        float straight from the accumulator (no output rounding for a softmax or a scale)."""
        operands = [self._operand(i, t) for i, t in enumerate(args)] if len(args) == 2 and not kwargs else []
        if len(operands) != 2 or None in operands:
            y = func(*dequantize_any(args), **dequantize_any(kwargs))
            if not bool(torch.isfinite(y).all()):
                return self._nonfinite(y)
            q = reference.quantize_per_tensor(y, scale, zp, numerics=self.numerics)
            return QTensor(q, scale, zp) if self.output_int8 else y
        (a, sa, za), (b, sb, zb) = operands
        kernel = matmul_kernels.matmul if self.backend != "reference" else reference.matmul
        if self.output_int8:
            return QTensor(kernel(a, sa, za, b, sb, zb, scale, zp), scale, zp)
        return kernel(a, sa, za, b, sb, zb)

    def _operand(self, i: int, t: Any) -> tuple[torch.Tensor, float, int] | None:
        """An operand's (codes, scale, zero point): a QTensor's own, or a finite float tensor
        quantized at this site's calibrated qparams for operand ``i``."""
        if isinstance(t, QTensor):
            return t.int_data, t.scale, t.zero_point
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return None
        qp = self.__dict__.get("_input_qp")
        if qp is None:
            qp = self.__dict__["_input_qp"] = [(float(s), int(z)) for s, z in
                                                zip(self.input_scale, self.input_zero_point, strict=True)]
        scale, zp = qp[i]
        try:
            return quantize_float_input(t, scale, zp, self.backend, self.numerics), scale, zp
        except NonFiniteInputError:  # the float fallback names it, or propagates it
            return None

    def _nonfinite(self, y: torch.Tensor) -> torch.Tensor:
        """NaN/Inf in a float input: a clear error, or (``nonfinite="propagate"``) the float result."""
        if self.nonfinite == "propagate":
            return y
        raise QuantizedInputError(
            f"call site {self.key} ({self.op}): its float input holds NaN/Inf; int8 cannot carry them. "
            "Pass finite inputs, or QuantConfig(nonfinite='propagate') to get them back as float does"
        )

    def _int8(self, func: Callable, args: tuple, kwargs: dict, scale: float, zp: int) -> Any:
        if self.op == "add":
            if kwargs or len(args) != 2 or not all(isinstance(a, QTensor) for a in args):
                return None
            a, b = args
            add = eltwise.add_uint8 if self.backend == "onednn" else reference.add
            return add(a.int_data, a.scale, a.zero_point, b.int_data, b.scale, b.zero_point,
                       scale, zp, self.activation, self.numerics)
        if self.op == "mul":  # an int8 activation times a float (or int8) one: a channel gate
            if kwargs or len(args) != 2:
                return None
            a, b = args if isinstance(args[0], QTensor) else args[::-1]
            if not isinstance(a, QTensor) or not isinstance(b, torch.Tensor):
                return None
            b = b.dequantize() if isinstance(b, QTensor) else b
            mul = eltwise.mul_uint8 if self.backend == "onednn" else reference.mul
            return mul(a.int_data, a.scale, a.zero_point, b, scale, zp, self.activation)
        if self.op == "cat":
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if not all(isinstance(t, QTensor) for t in tensors) or self.activation != "none":
                return None
            requantize = eltwise.requantize_uint8 if self.backend == "onednn" else reference.requantize
            parts = [requantize(t.int_data, t.scale, t.zero_point, scale, zp) for t in tensors]
            return torch.cat(parts, dim)
        return None

    def qparams(self) -> tuple[float, int]:
        """Output (scale, zero point) as python numbers, cached (read on every call)."""
        qp = self.__dict__.get("_qp")
        if qp is None:
            qp = self.__dict__["_qp"] = (float(self.output_scale), int(self.output_zero_point))
        return qp

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self.__dict__.pop("_qp", None)
        self.__dict__.pop("_input_qp", None)
        bump_generation(self)

    def extra_repr(self) -> str:
        return f"{self.key}, op={self.op}, activation={self.activation}"

