"""Dynamic int8 modules: DynamicQuantizedLinear, QuantizedEmbedding, QuantizedEmbeddingBag.

Weights are stored int8 (symmetric, per output channel / per embedding row) as buffers next to
their float32 scales and int32 zero points, so ``state_dict()`` shows what runs. Activations
are float at the module boundary: Linear quantizes its input on the fly (per tensor, or per
row with ``per_row``), accumulates in int32 and returns float32. Embeddings are weight-only:
the looked-up int8 rows are scaled back to float32. Recurrent modules live in
``dynamic_rnn.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from quanta.capture.callsites import LeafMarker
from quanta.config import QuantSpec
from quanta.errors import QuantizedInputError, UnsupportedModelError
from quanta.kernels import cpu, reference
from quanta.kernels.dynamic import DynamicLinearKernel, NonFiniteInputError, kernel_backend, resolve_backend
from quanta.kernels.native import ops as native_ops
from quanta.modules.quantized import quantize_weight
from quanta.qtensor import QTensor


class DynamicModule(LeafMarker, nn.Module):
    """Shared storage of int8 weight matrices and their lazily built kernels."""

    def __init__(self, weight_spec: QuantSpec, backend: str = "auto", per_row: bool = False) -> None:
        super().__init__()
        self.weight_bits = weight_spec.bits
        self.per_row = per_row
        self.nonfinite = "raise"  # QuantConfig.nonfinite
        self.requested_backend = backend
        self.backend = resolve_backend(backend)
        self.layer_name = ""
        self._weight_names: list[str] = []
        self._kernels: dict[str, DynamicLinearKernel] = {}

    def add_int8_weight(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> None:
        """Register ``name`` (int8), ``name_scale`` (float32), ``name_zero_point`` (int32)."""
        w_q, w_scale = quantize_weight(weight, spec)
        self.register_buffer(name, w_q)
        self.register_buffer(f"{name}_scale", w_scale.float())
        self.register_buffer(f"{name}_zero_point", torch.zeros(w_q.shape[0], dtype=torch.int32))
        self._weight_names.append(name)

    def add_float(self, name: str, value: torch.Tensor | None) -> None:
        self.register_buffer(name, None if value is None else value.detach().float().clone())

    def kernel(self, name: str) -> DynamicLinearKernel:
        k = self._kernels.get(name)
        if k is None:
            w = getattr(self, name)
            k = DynamicLinearKernel(w, getattr(self, f"{name}_scale"), kernel_backend(self.backend, w))
            self._kernels[name] = k
        return k

    def matmul(self, name: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """float [M, K] @ int8 weight ``name``.T + bias -> float [M, N]; NaN/Inf as ``nonfinite`` says."""
        try:
            return self.kernel(name)(x, bias, self.per_row)
        except NonFiniteInputError:
            return self.nonfinite_matmul(name, x, bias)

    def nonfinite_matmul(self, name: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """NaN/Inf in the input: a clear error naming this layer, or (``nonfinite="propagate"``)
        the float product with the dequantized weights, which carries them as float does."""
        if getattr(self, "nonfinite", "raise") != "propagate":  # (modules pickled before the field)
            raise QuantizedInputError(
                f"{self.describe()}: its input holds NaN or Inf; dynamic quantization needs a finite "
                "input. Pass finite inputs, or QuantConfig(nonfinite='propagate') to get them back as "
                "float does"
            ) from None
        w = getattr(self, name).float() * getattr(self, f"{name}_scale")[:, None]
        return F.linear(x, w, bias)

    def describe(self) -> str:
        return f"{self.layer_name or type(self).__name__} ({type(self).__name__})"

    def float_input(self, x: Any, what: str = "input") -> torch.Tensor:
        if isinstance(x, QTensor):
            x = x.dequantize()
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise QuantizedInputError(f"{self.describe()} expects a floating point {what}, got {got}")
        return x if x.dtype == torch.float32 else x.float()

    def backend_label(self, rows_small_possible: bool = True) -> str:
        """What runs: 'onednn' (with the exact reference for calls of <= 2 rows), 'reference', or
        'float' (the exact fallback, when the weights are wider than this CPU's kernels add exactly)."""
        fits = all(cpu.weights_fit(getattr(self, n)) for n in self._weight_names)
        if self.backend == "onednn" and not fits:
            return "float"
        if self.backend == "onednn" and rows_small_possible and not native_ops.available():
            return "onednn (reference for M<=2)"
        return self.backend

    def backend_reason(self) -> str:
        """Why :meth:`backend_label` runs: empty unless the weights forced the float fallback."""
        if self.backend_label() != "float" or self.backend != "onednn":
            return ""
        widest = max((getattr(self, n) for n in self._weight_names), key=cpu.weight_magnitude)
        return cpu.wide_weights_reason(widest)

    def _drop_kernels(self) -> None:
        self._kernels = {}

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._drop_kernels()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        self._drop_kernels()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_kernels"] = {}  # prepacked oneDNN handles are rebuilt on first use
        return state


class DynamicQuantizedLinear(DynamicModule):
    """``nn.Linear`` with int8 weights; input quantized per call; float32 output."""

    def __init__(self, float_module: nn.Linear, weight_spec: QuantSpec, backend: str = "auto",
                 per_row: bool = False, layer_name: str = "") -> None:
        super().__init__(weight_spec, backend, per_row)
        self.layer_name = layer_name
        self.in_features, self.out_features = float_module.in_features, float_module.out_features
        self.add_int8_weight("weight", float_module.weight, weight_spec)
        self.add_float("bias", float_module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is torch.Tensor and x.dtype == torch.float32:
            # hot path (oneDNN): the same computation with the least Python per call
            kernel = self._kernels.get("weight") or self.kernel("weight")
            k = self.in_features
            rows_ok = x.numel() > kernel.small_m * k
            if kernel.backend == "onednn" and x.dim() > 1 and x.shape[-1] == k and rows_ok:
                try:
                    if self.per_row:
                        y = kernel.onednn_per_row(x.reshape(-1, k), self._buffers["bias"])
                        return y.reshape(*x.shape[:-1], self.out_features)
                    return kernel.onednn_per_tensor(x, self._buffers["bias"])
                except NonFiniteInputError:
                    return self.nonfinite_matmul("weight", x, self._buffers["bias"])
        x = self.float_input(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise QuantizedInputError(
                f"{self.describe()} expects [..., {self.in_features}] input, got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        y = self.matmul("weight", x.reshape(-1, self.in_features), self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_bits={self.weight_bits}, per_row={self.per_row}, backend={self.backend}")


def embedding_weight_spec(spec: QuantSpec) -> QuantSpec:
    """Weight-only lookups never hit the u8 x s8 saturation: 'auto' bits means 8 here."""
    return spec if spec.bits is not None else dataclasses.replace(spec, bits=8)


def _reject_max_norm(module: nn.Embedding | nn.EmbeddingBag, name: str) -> None:
    if module.max_norm is not None:
        raise UnsupportedModelError(
            f"{name or type(module).__name__}: {type(module).__name__}(max_norm=...) renormalizes its "
            "weights in place at lookup; int8 weights cannot do that"
        )


class QuantizedEmbedding(DynamicModule):
    """``nn.Embedding`` with int8 rows (one symmetric scale per row); float32 lookups.
    Weight-only, so the same module serves static and dynamic mode."""

    weight_only = True

    def __init__(self, float_module: nn.Embedding, weight_spec: QuantSpec, backend: str = "auto",
                 per_row: bool = False, layer_name: str = "") -> None:
        _reject_max_norm(float_module, layer_name)
        spec = embedding_weight_spec(weight_spec)
        super().__init__(spec, "reference", per_row)
        self.layer_name = layer_name
        self.num_embeddings, self.embedding_dim = float_module.num_embeddings, float_module.embedding_dim
        self.padding_idx = float_module.padding_idx
        self.add_int8_weight("weight", float_module.weight, spec)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
            got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise QuantizedInputError(f"{self.describe()} expects integer indices, got {got}")
        return reference.embedding(self.weight, self.weight_scale, indices)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(torch.float32) * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight_bits={self.weight_bits} (weight-only)"


class QuantizedEmbeddingBag(QuantizedEmbedding):
    """``nn.EmbeddingBag`` with int8 rows: only the rows a batch uses are scaled to float,
    then reduced by ``F.embedding_bag`` exactly as the float module would on those values."""

    def __init__(self, float_module: nn.EmbeddingBag, weight_spec: QuantSpec, backend: str = "auto",
                 per_row: bool = False, layer_name: str = "") -> None:
        super().__init__(float_module, weight_spec, backend, per_row, layer_name)  # type: ignore[arg-type]
        self.mode = float_module.mode
        self.include_last_offset = float_module.include_last_offset

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point():
            got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise QuantizedInputError(f"{self.describe()} expects integer indices, got {got}")
        used, local = torch.unique(indices, return_inverse=True)
        if used.numel() and (int(used[0]) < 0 or int(used[-1]) >= self.num_embeddings):
            raise QuantizedInputError(
                f"{self.describe()}: index out of range [0, {self.num_embeddings}) in the input"
            )
        table = reference.embedding(self.weight, self.weight_scale, used)
        padding = None
        if self.padding_idx is not None:
            hit = (used == self.padding_idx).nonzero()
            padding = int(hit[0, 0]) if hit.numel() else None
        return F.embedding_bag(local, table, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset, padding_idx=padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"
