"""The one mapping table: what each float module becomes in each mode.

Everything else (prepare, convert, report) asks this file; there is no other list.
"""

from __future__ import annotations

import torch.nn as nn

from quanta.capture.weightops import WEIGHT_OPS
from quanta.modules.dynamic import DynamicQuantizedLinear, QuantizedEmbedding, QuantizedEmbeddingBag
from quanta.modules.dynamic_rnn import (
    DynamicQuantizedGRU,
    DynamicQuantizedGRUCell,
    DynamicQuantizedLSTM,
    DynamicQuantizedLSTMCell,
)
from quanta.modules.qat import QATConv1d, QATConv2d, QATLinear
from quanta.modules.quantized import QuantizedConv1d, QuantizedConv2d, QuantizedLinear
from quanta.modules.weight_only import WeightOnlyLinear

# float type -> {mode: quantized type}
MAPPING: dict[type[nn.Module], dict[str, type[nn.Module]]] = {
    nn.Linear: {"static": QuantizedLinear, "dynamic": DynamicQuantizedLinear, "qat": QATLinear,
                "weight_only": WeightOnlyLinear},
    nn.Conv1d: {"static": QuantizedConv1d, "qat": QATConv1d},
    nn.Conv2d: {"static": QuantizedConv2d, "qat": QATConv2d},
    nn.LSTM: {"dynamic": DynamicQuantizedLSTM},
    nn.LSTMCell: {"dynamic": DynamicQuantizedLSTMCell},
    nn.GRU: {"dynamic": DynamicQuantizedGRU},
    nn.GRUCell: {"dynamic": DynamicQuantizedGRUCell},
    nn.Embedding: {"static": QuantizedEmbedding, "dynamic": QuantizedEmbedding},
    nn.EmbeddingBag: {"static": QuantizedEmbeddingBag, "dynamic": QuantizedEmbeddingBag},
}

# producer type -> BatchNorm types folded into it when nothing else reads the producer's output
FOLDABLE_BATCHNORM: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Conv1d: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d,),
    nn.Linear: (nn.BatchNorm1d,),
}

# module types that run natively on int8 activations (QTensor ops), keeping qparams
INT8_NATIVE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity,
    nn.Unflatten, nn.ZeroPad2d,
)  # and every Dropout (capture.activations.is_dropout): the identity in eval mode

# functional ops with their own observed output qparams (keyed by call site)
# ("matmul" here is activation x activation, attention's Q.K^T and P.V; a matmul by a parameter
# is a weight op)
INT8_SITE_OPS: tuple[str, ...] = ("add", "cat", "mul", "matmul")
# every functional op the call-site mode keys at run time (the recorder keys all of them while
# capturing; counters are per op name, so keying more ops never shifts these keys): the int8
# sites above and the weight ops (capture.weightops). The eager site mode, the graph runtime's
# keyer and the ONNX export all read this one tuple.
KEYED_OPS: frozenset[str] = frozenset((*INT8_SITE_OPS, *WEIGHT_OPS))


def is_weight_only(cls: type[nn.Module] | None) -> bool:
    """Weight-only int8 modules (embeddings): no activation qparams, float output."""
    return bool(getattr(cls, "weight_only", False))


def mapped_type(module: nn.Module) -> type[nn.Module] | None:
    """The MAPPING key ``module`` is quantized as: its own class, or a base class whose
    ``forward`` it inherits unchanged (a subclass that only adds attributes). A subclass with its
    own forward is not a mapped module: its weight op calls are quantized as call sites."""
    cls = type(module)
    if cls in MAPPING:
        return cls
    for base in cls.__mro__[1:]:
        if base in MAPPING:
            return base if cls.forward is base.forward else None
    return None


def quantized_type(module: nn.Module, mode: str) -> type[nn.Module] | None:
    """The quantized class for ``module`` in ``mode``, or None if it stays float."""
    return MAPPING.get(mapped_type(module), {}).get(mode)


def float_reason(module: nn.Module, default: str) -> str:
    """Why a module without a quantized class stays float: its class's own ``FLOAT_REASON`` (a
    module that is float by design, e.g. quanta.ptq.rotation.Rotation), else ``default``."""
    return getattr(type(module), "FLOAT_REASON", default)
