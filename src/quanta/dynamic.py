"""Dynamic quantization: int8 weights, activations quantized on the fly, no calibration data.

``quantize_dynamic`` swaps every supported module (Linear, LSTM, LSTMCell, GRU, GRUCell, and
Embedding/EmbeddingBag as weight-only int8) for its dynamic counterpart under the same name,
records a ``Plan`` (one entry per leaf module, with the reason for each float one) and attaches
a ``QuantaState`` so report and save/load treat dynamic models like static ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from quanta.api import _copy, _resolve_config, _set_module, warn_low_coverage
from quanta.capture.callsites import LeafMarker
from quanta.capture.plan import LayerPlan, Plan
from quanta.config import QuantConfig
from quanta.errors import UnsupportedModelError
from quanta.modules import mapping
from quanta.modules.backends import resolve_weight_bits
from quanta.modules.dynamic import DynamicModule, QuantizedEmbedding, embedding_weight_spec
from quanta.modules.state import QuantaState
from quanta.rewrites import check_rewritten


def dynamic_types() -> tuple[type[nn.Module], ...]:
    """Float module types that have a dynamic int8 counterpart (from the mapping table)."""
    return tuple(t for t, modes in mapping.MAPPING.items() if "dynamic" in modes)


def _supported_names() -> str:
    return ", ".join(t.__name__ for t in dynamic_types())


def selected_types(modules: Iterable[Any] | None) -> tuple[type[nn.Module], ...]:
    """The float types ``quantize_dynamic(modules=...)`` selects (default: every supported one)."""
    if modules is None:
        return dynamic_types()
    if isinstance(modules, type):
        modules = [modules]
    by_name = {t.__name__: t for t in dynamic_types()}
    chosen = []
    for m in modules:
        t = by_name.get(m) if isinstance(m, str) else m
        if not (isinstance(t, type) and t in dynamic_types()):
            shown = m if isinstance(m, str) else getattr(m, "__name__", repr(m))
            raise UnsupportedModelError(
                f"quantize_dynamic(modules=...) got {shown}: dynamic quantization supports "
                f"{_supported_names()}"
            )
        chosen.append(t)
    return tuple(chosen)


def _unsupported_reason(module: nn.Module) -> str:
    if getattr(module, "proj_size", 0):
        return f"proj_size={module.proj_size} has no dynamic int8 kernel"
    if getattr(module, "max_norm", None) is not None:
        return "max_norm renormalizes weights in place: no int8 kernel"
    return ""


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if n and next(m.children(), None) is None and not isinstance(m, LeafMarker)]


def plan_dynamic(model: nn.Module, config: QuantConfig, selected: tuple[type[nn.Module], ...]) -> Plan:
    """One LayerPlan per leaf module: int8 with its dynamic type, or float with the reason."""
    plan = Plan("dynamic")
    for name, m in _leaves(model):
        target = mapping.quantized_type(m, "dynamic")
        lp = LayerPlan(name, "module", type(m).__name__, "float")
        if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):  # lookups multiply nothing
            lp.macs = sum(p.numel() for p in m.parameters(recurse=False) if p.dim() >= 2)
        skipped, wspec, _, why = config.for_module(name, m)
        if target is None:
            has_weights = next(m.parameters(recurse=False), None) is not None
            lp.reason = mapping.float_reason(m, "no dynamic int8 kernel" if has_weights else
                                             "no weights (runs in float)")
        elif type(m) not in selected:
            lp.reason = "not selected by modules="
        elif skipped:
            lp.reason = why
        elif _unsupported_reason(m):
            lp.reason = _unsupported_reason(m)
        elif config.backend_for(name, type(m).__name__)[0] == "float":
            lp.reason = f"float requested ({config.backend_for(name, type(m).__name__)[1]})"
        else:
            lp.precision, lp.quantized_type = "int8", target.__name__
            weight_only = isinstance(m, (nn.Embedding, nn.EmbeddingBag))
            spec = embedding_weight_spec(wspec) if weight_only else resolve_weight_bits(wspec, config.backend)
            lp.weight_bits = spec.bits
        plan.layers[name] = lp
    return plan


def quantize_dynamic(model: nn.Module, config: QuantConfig | None = None, *,
                     modules: Iterable[Any] | None = None, skip: Iterable[str] | None = None,
                     inplace: bool = False, per_row: bool | None = None) -> nn.Module:
    """Dynamic int8 quantization of ``model`` (a deep copy unless ``inplace``).

    ``modules``: the float types to quantize (e.g. ``{nn.Linear, nn.LSTM}``; default all that
    are supported). ``skip``: module names or class names kept in float. ``per_row``: quantize
    activations with one scale per row instead of per tensor (default
    ``config.dynamic_per_row``). Raises ``UnsupportedModelError`` if nothing can be quantized.
    """
    config = _resolve_config(config, "dynamic", skip)
    check_rewritten(model, config, "quanta.quantize_dynamic")
    if per_row is not None:
        config = dataclasses.replace(config, dynamic_per_row=bool(per_row))
    selected = selected_types(modules)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "_quanta", None), QuantaState):
        raise UnsupportedModelError("this model is already prepared or quantized by quanta")
    plan = plan_dynamic(model, config, selected)
    if not plan.int8_layers():
        skipped = sorted({lp.reason for lp in plan.layers.values()
                          if lp.reason.startswith(("excluded", "not selected"))})
        extra = f" (candidates were {'; '.join(skipped)})" if skipped else ""
        raise UnsupportedModelError(
            f"dynamic quantization found nothing to quantize in {type(model).__name__}: it supports "
            f"{_supported_names()}{extra}"
        )
    model = _copy(model, inplace)
    modules_by_name = dict(model.named_modules())
    for lp in plan.int8_layers():
        float_module = modules_by_name[lp.name]
        _, wspec, _, _ = config.for_module(lp.name, float_module)
        wspec = dataclasses.replace(wspec, bits=lp.weight_bits)
        qtype = mapping.MAPPING[mapping.mapped_type(float_module)]["dynamic"]
        backend = config.backend_for(lp.name, lp.float_type)[0]
        q = qtype(float_module, weight_spec=wspec, backend=backend,
                  per_row=config.dynamic_per_row, layer_name=lp.name)
        lp.weight_bits = q.weight_bits
        if isinstance(q, DynamicModule):
            lp.backend, lp.backend_reason = q.backend_label(), q.backend_reason()
            lp.float_macs = lp.macs if lp.backend == "float" else 0
            q.nonfinite = config.nonfinite
        lp.activation = "none"
        granularity = "per row" if config.dynamic_per_row else "per tensor"
        weight_only = isinstance(q, QuantizedEmbedding)
        lp.reason = "weight-only int8 (one scale per row)" if weight_only else \
            f"input quantized at run time ({granularity})"
        _set_module(model, lp.name, q)
    model.eval()
    state = QuantaState(plan, config)
    state.attach(model)  # sets model._quanta without registering it as a child module
    warn_low_coverage(plan)
    return model
