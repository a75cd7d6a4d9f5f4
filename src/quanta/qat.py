"""Quantization-aware training: ``prepare_qat`` -> train -> ``freeze`` (optional) -> ``convert``.

``prepare_qat`` reuses the static pipeline: the same dataflow record, the same plan (mode
"qat"), the same fusion (Conv/Linear+BN, ReLU/ReLU6) and int8-flow decisions. Instead of
observed modules it inserts QAT modules (``modules/qat.py``) that fake-quantize exactly what
the int8 model will quantize, and the int8 ``add``/``cat`` call sites fake-quantize their
outputs. ``quanta.convert`` then produces the same int8 modules static PTQ produces.

Modes: QAT trains in ``train()`` mode. A model handed over in eval mode is switched to train
mode with a warning (checkpoints are usually loaded in eval mode, so refusing would only add
a step). ``convert`` of a QAT model still in train mode is fine: it works on a copy, folds BN
from the running statistics and returns an eval-mode model; the QAT model is left as it was.
Observers (moving-average min/max) update only in train mode, so ``eval()`` evaluates with
fixed qparams, which are the ones ``convert`` bakes in.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from quanta.api import _copy, _resolve_config, get_state, swap_layers, unwrap
from quanta.capture.plan import Plan, plan_static
from quanta.capture.record import DataflowRecord, call_with, capture
from quanta.config import QuantConfig, QuantSpec
from quanta.errors import UnsupportedModelError
from quanta.modules.backends import resolve_weight_bits
from quanta.modules.mapping import MAPPING, mapped_type
from quanta.modules.qat import FakeQuantize, QATModule
from quanta.modules.sites import QuantizedSite
from quanta.modules.state import QuantaState, site_module_key


def prepare_qat(model: nn.Module, example_inputs: Any, config: QuantConfig | None = None, *,
                skip: Iterable[str] | None = None, inplace: bool = False) -> nn.Module:
    """Fuse and insert fake quantization for training; returns the QAT model in train mode.

    ``example_inputs`` follows the batch rule of ``calibrate`` (Tensor, tuple or dict). It is
    run once more through the QAT model in eval mode to initialize the activation ranges, so
    the result can be converted at any point. Weight bits left as ``None`` (auto) are resolved
    now for ``config.backend``, so training simulates exactly the weights that will deploy.
    """
    config = _resolve_config(config, "qat", skip)
    if isinstance(model, nn.Module) and not model.training:
        warnings.warn(
            f"prepare_qat: {type(model).__name__} is in eval mode; the QAT model is returned in "
            "train mode (BatchNorm uses batch statistics, observers update). Call .eval() on it "
            "to evaluate.",
            UserWarning,
            stacklevel=2,
        )
    model = _copy(model, inplace)
    if isinstance(getattr(model, "_quanta", None), QuantaState):
        raise UnsupportedModelError("this model is already prepared or quantized by quanta")
    model.eval()  # capture without touching BatchNorm running statistics
    record = capture(model, example_inputs, config.mode)
    plan = plan_static(model, record, config)
    _apply_qat(model, plan, config, record)
    with torch.no_grad():
        call_with(model, example_inputs)
    return model.train()


def simulate_static(model: nn.Module, example_inputs: Any, config: QuantConfig) -> nn.Module:
    """A copy of ``model`` that fake-quantizes exactly what static quantization with ``config``
    quantizes (the static plan: BatchNorm folded at weight op call sites too), for post-training
    corrections that learn through the int8 simulation (``quanta.ptq.range_learning``)."""
    static = _resolve_config(config, "static", None)
    model = _copy(model, False).eval()
    record = capture(model, example_inputs, static.mode)
    plan = plan_static(model, record, static)
    _apply_qat(model, plan, static, record)
    for m in [*model.modules(), *get_state(model).modules()]:
        if isinstance(m, QATModule) and m.bn is not None:
            m.bn_frozen.fill_(True)
    with torch.no_grad():
        call_with(model, example_inputs)
    return model


def _apply_qat(model: nn.Module, plan: Plan, config: QuantConfig, record: DataflowRecord) -> None:
    """Swap int8 layers for QAT modules (their BatchNorm moves inside them)."""

    def qat_layer(lp: Any, module: nn.Module, bn: nn.Module | None, wspec: QuantSpec,
                  aspec: QuantSpec) -> nn.Module:
        wspec = resolve_weight_bits(wspec, config.backend)
        lp.weight_bits = wspec.bits
        # Activation qparams use config.activation, the spec convert computes them with.
        return MAPPING[mapped_type(module)]["qat"](
            module, bn=bn, activation=lp.activation, weight_spec=wspec,
            activation_spec=config.activation, name=lp.name, output_int8=lp.output_int8,
        )

    def qat_site(lp: Any) -> QuantizedSite:
        site = QuantizedSite(lp.name, lp.float_type, lp.activation)
        site.observer = FakeQuantize(config.activation, f"{lp.name} ({lp.float_type})")
        site.fake_quant = True
        return site

    state = swap_layers(model, plan, config, record, qat_layer, qat_site)
    qat_modules = {n: m for n, m in model.named_modules() if isinstance(m, QATModule)}
    qat_modules.update((lp.name, state.sites_by_key[lp.name]) for lp in plan.op_sites())
    for name, q in qat_modules.items():
        source = plan.layers[name].input_from
        if source in qat_modules:
            q.set_input_source(qat_modules[source].output_observer)
        elif source:
            q.set_input_source(state.sites[site_module_key(source)].observer)


def freeze(qat_model: nn.Module, observers: bool = True, batchnorm: bool = True) -> nn.Module:
    """Stop updating activation ranges (``observers``) and/or BatchNorm statistics
    (``batchnorm``: fused Conv+BN then trains on the folded running-statistics weights, the
    exact int8 computation). ``False`` leaves that part as it is. Returns the model.

    A model wrapped in DistributedDataParallel is frozen inside its wrapper."""
    given, qat_model = qat_model, unwrap(qat_model)
    state = get_state(qat_model)
    before = state.__dict__.get("before_convert")  # ranks' BatchNorm statistics agree first
    if batchnorm and before is not None:
        before(qat_model)
    qat = [m for m in qat_model.modules() if isinstance(m, QATModule)]
    if state.config.mode != "qat" or not qat:
        raise UnsupportedModelError(
            "freeze() expects a model returned by quanta.prepare_qat (and not yet converted)"
        )
    for m in [*qat_model.modules(), *state.modules()]:  # state (call sites) is not a child
        if observers and isinstance(m, FakeQuantize):
            m.observer_enabled.fill_(False)
        if batchnorm and isinstance(m, QATModule) and m.bn is not None:
            m.bn_frozen.fill_(True)
    return given
