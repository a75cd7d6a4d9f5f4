"""Weight-only quantization: int8 or int4 weights, float activations, no calibration data
(int4 decode quantizes its input to int8 blocks inside the kernel: ``QuantConfig.int4_activations``).

For decoder language models on CPU, where a decode step reads every weight once per token:
``quantize_weight_only`` swaps each ``nn.Linear`` (the mapping table's ``"weight_only"`` entry)
for a :class:`~quanta.modules.weight_only.WeightOnlyLinear` under the same name, records a
``Plan`` (the reason for every layer left in float) and attaches a ``QuantaState`` so report and
save/load treat these models like the others. The model's own forward is untouched, so
transformers' ``generate`` and its KV cache work as with the float model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch.nn as nn

from quanta.api import _copy, _resolve_config, _set_module
from quanta.capture.plan import LayerPlan, Plan
from quanta.config import QuantConfig, QuantSpec
from quanta.errors import UnsupportedModelError
from quanta.modules import mapping
from quanta.modules.state import QuantaState
from quanta.modules.weight_only import weight_only_problem
from quanta.rewrites import check_rewritten


def weight_only_spec(config: QuantConfig, name: str, module: nn.Module) -> tuple[bool, QuantSpec, str]:
    """(skipped, weight spec with bits resolved, reason) of one layer, overrides applied."""
    skipped, spec, _, why = config.for_module(name, module)
    return skipped, dataclasses.replace(spec, bits=spec.bits or 8), why


def _describe(spec: QuantSpec, int4_activations: str) -> str:
    if spec.bits == 8:
        return "weight-only int8 (per output channel)"
    groups = f"groups of {spec.group_size}" if spec.group_size else "per output channel"
    decode = "int8 activations per block of 32" if int4_activations == "int8" else "float activations"
    return f"weight-only int4 ({'symmetric' if spec.symmetric else 'asymmetric'}, {groups}; decode: {decode})"


def plan_weight_only(model: nn.Module, config: QuantConfig) -> Plan:
    """One LayerPlan per leaf module: int8/int4 weight-only, or float with the reason."""
    plan = Plan("weight_only")
    for name, m in model.named_modules():
        if not name or next(m.children(), None) is not None:
            continue
        lp = LayerPlan(name, "module", type(m).__name__, "float")
        if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            lp.macs = sum(p.numel() for p in m.parameters(recurse=False) if p.dim() >= 2)
        target = mapping.quantized_type(m, "weight_only")
        if target is None:
            has_weights = next(m.parameters(recurse=False), None) is not None
            lp.reason = mapping.float_reason(m, "no weight-only kernel" if has_weights else
                                             "no weights (runs in float)")
        else:
            skipped, spec, why = weight_only_spec(config, name, m)
            problem = weight_only_problem(m, spec)
            if skipped:
                lp.reason = why
            elif problem:
                lp.reason = problem
            else:
                lp.precision, lp.quantized_type, lp.weight_bits = "int8", target.__name__, spec.bits
                lp.weight_only = True
                lp.reason, lp.backend = _describe(spec, config.int4_activations), "native"
        plan.layers[name] = lp
    return plan


def quantize_weight_only(model: nn.Module, config: QuantConfig | None = None, *,
                         skip: Iterable[str] | None = None, inplace: bool = False) -> nn.Module:
    """Weight-only quantization of every ``nn.Linear`` in ``model`` (a deep copy unless ``inplace``).

    ``config.weight`` says how: the default is int8 symmetric per output channel;
    ``QuantSpec(bits=4, group_size=32)`` is int4 in groups of 32 (asymmetric; ``symmetric=True``
    for symmetric groups). ``Override``s set other specs per layer; ``skip`` keeps layers float.
    Raises ``UnsupportedModelError`` if nothing can be quantized.
    """
    config = _resolve_config(config, "weight_only", skip)
    check_rewritten(model, config, "quanta.quantize_weight_only")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "_quanta", None), QuantaState):
        raise UnsupportedModelError("this model is already prepared or quantized by quanta")
    plan = plan_weight_only(model, config)
    if not plan.int8_layers():
        reasons = sorted({lp.reason for lp in plan.layers.values() if lp.macs})
        raise UnsupportedModelError(
            f"weight-only quantization found nothing to quantize in {type(model).__name__}: it "
            f"supports nn.Linear{' (' + '; '.join(reasons[:3]) + ')' if reasons else ''}")
    model = _copy(model, inplace)
    modules = dict(model.named_modules())
    for lp in plan.int8_layers():
        float_module = modules[lp.name]
        _, spec, _ = weight_only_spec(config, lp.name, float_module)
        qtype = mapping.MAPPING[mapping.mapped_type(float_module)]["weight_only"]
        _set_module(model, lp.name, qtype(float_module, spec, layer_name=lp.name,
                                          int4_activations=config.int4_activations))
    model.eval()
    # no low-coverage warning: weight-only layers multiply in float by design (their MACs count as
    # float in the report), the saving is in the bytes read
    QuantaState(plan, config).attach(model)
    return model
