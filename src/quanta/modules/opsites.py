"""Weight op call sites at run time: the layer behind each site, and the model's parameters.

An op site (``capture.weightops``) is a conv/linear call outside a quantized module. Its layer
(``ObservedModule`` while calibrating, a QAT module while training, ``QuantizedConv2d`` /
``QuantizedLinear`` once converted) is built from the call's own arguments and lives in
``model._quanta.op_sites``; the call-site mode routes the call to it.

After conversion the float parameters only op sites read are not kept: each becomes a
non-persistent alias of the site's int8 weight (same shape, so a forward that reads
``self.weight.shape`` still works), so the model and its file hold each weight once, as int8.
A weight several sites read (one conv applied twice) is stored once: the first site holds it,
the others alias that tensor. A parameter that anything else reads (a float op, a module)
stays float.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from quanta.capture import weightops
from quanta.capture.plan import LayerPlan, Plan


def float_layer(model: nn.Module, lp: LayerPlan) -> nn.Module:
    """The float module computing op site ``lp`` (sharing the model's parameter tensors)."""
    weight = model.get_parameter(lp.weight)
    bias = model.get_parameter(lp.bias) if lp.bias else None
    return weightops.float_module(lp.float_type, weight, bias, lp.call)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _replace(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, attr = _owner(model, name)
    owner._parameters.pop(attr, None)
    owner.register_buffer(attr, value, persistent=False)


def _alias(layer: nn.Module, source: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        layer._buffers[name] = source._buffers[name]
        layer._non_persistent_buffers_set.add(name)


def share_parameters(model: nn.Module, plan: Plan, layers: dict[str, nn.Module]) -> None:
    """Replace every parameter that only int8 op sites read by aliases of their int8 tensors.

    ``layers``: the converted layer of each op site, by key. Called by ``convert`` and by
    ``load`` before the state dict is loaded, so the aliases see the loaded values. Sites that
    read one weight with the same bit width hold the same int8 tensor (no BatchNorm is folded
    into a shared weight), so the later ones alias the first's."""
    int8_sites = {lp.name for lp in plan.op_sites()}
    for param, readers in plan.weight_readers.items():
        if not readers or any(r not in int8_sites for r in readers):
            continue  # a float op or a module also reads it: it stays float
        first_lp, first = plan.layers[readers[0]], layers[readers[0]]
        if first_lp.weight == param:
            for key in readers[1:]:
                if plan.layers[key].weight == param and plan.layers[key].weight_bits == first_lp.weight_bits:
                    _alias(layers[key], first, ("weight", "weight_scale", "weight_zero_point"))
            _replace(model, param, first.weight.t() if first_lp.float_type == "matmul" else first.weight)
        elif first_lp.bias == param:
            _replace(model, param, _float_bias(first))


def _float_bias(layer: nn.Module) -> torch.Tensor:
    """The float value of a converted layer's int32 bias (what the float parameter held)."""
    if layer.bias is None:
        return torch.zeros(layer.weight.shape[0])
    return (layer.bias.double() * float(layer.input_scale) * layer.weight_scale.double()).float()
