"""Which elementwise activation a module or functional call computes, for fusing it into the
int8 op before it (the int8 kernels apply it as a post-op, then requantize once).

Known torch modules and functions are recognized by type and name. A parameter-free module of
another class (efficientnet-pytorch's ``MemoryEfficientSwish``, pytorchcv's ``HSwish``) is
recognized by what it computes: it is run once on a probe tensor and compared with each
candidate, so any implementation of SiLU or hard-swish fuses, whatever it is called.

Clamps (ReLU, ReLU6) are idempotent: a fused clamp that still runs on the int8 result changes
nothing, so any call of them folds. The others fold only as modules whose every call is fused
(the module is then replaced by ``nn.Identity``).
"""

from __future__ import annotations

import dis

import torch
import torch.nn as nn

from quanta.kernels.reference import apply_activation

IDEMPOTENT = ("relu", "relu6")
_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
            nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}
_FUNCTIONS = {"relu": "relu", "relu6": "relu6", "silu": "silu", "hardswish": "hardswish",
              "sigmoid": "sigmoid", "hardsigmoid": "hardsigmoid"}
_PROBED = ("relu", "relu6", "silu", "hardswish", "sigmoid", "hardsigmoid", "gelu", "gelu_tanh")


def module_kind(m: nn.Module) -> str:
    """The activation ``m`` computes, or "" if it is not one quanta can fuse."""
    kind = _MODULES.get(type(m))
    if kind:
        return kind
    if isinstance(m, nn.Hardtanh):
        return "relu6" if (m.min_val, m.max_val) == (0.0, 6.0) else ""
    if isinstance(m, nn.GELU):
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if type(m).__module__.startswith("torch.") or next(m.parameters(), None) is not None \
            or next(m.children(), None) is not None:
        return ""
    return _probe(m)


def function_kind(op: str, args: tuple) -> str:
    """The activation a functional call computes (``op``: its canonical name, ``args``: its
    non-tensor arguments), or ""."""
    if op == "hardtanh":
        return "relu6" if tuple(args[:2]) == (0.0, 6.0) else ""
    return _FUNCTIONS.get(op, "")


def _probe(m: nn.Module) -> str:
    x = torch.linspace(-10.0, 10.0, 4001).reshape(1, 1, 1, -1)
    try:
        with torch.no_grad():
            y = m(x.clone())
    except Exception:  # noqa: BLE001 - not an elementwise activation on a 4-d tensor
        return ""
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        return ""
    for kind in _PROBED:
        if torch.allclose(y, apply_activation(x, kind), rtol=1e-5, atol=1e-6):
            return kind
    return ""


def is_dropout(m: nn.Module) -> bool:
    """Whether ``m`` is a Dropout of any kind (``nn.Dropout``, ``Dropout1d/2d/3d``, the alpha
    variants): the identity outside training, so int8 data passes through it unchanged in eval
    mode. Callers that may run in training (QAT) check ``m.training`` or their mode."""
    return isinstance(m, nn.modules.dropout._DropoutNd)


def returns_its_input(m: nn.Module) -> bool:
    """Whether ``m`` is an identity by its code: a parameter-free module whose ``forward`` is
    ``return <its one argument>`` (``nn.Identity``, a library's own Identity class, such as
    efficientnet-lite's static padding of 0). int8 data passes through it unchanged."""
    forward = getattr(type(m), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is None or code.co_argcount != 2 or code.co_flags & 0x0C:  # 0x0C: *args / **kwargs
        return False
    if next(m.parameters(), None) is not None:
        return False
    ops = [(i.opname, i.argval) for i in dis.get_instructions(forward) if i.opname not in ("RESUME", "NOP")]
    return ops == [("LOAD_FAST", code.co_varnames[1]), ("RETURN_VALUE", None)]
