"""Per-layer fidelity: SQNR of each quantized layer's output against the float model.

Both models run on the same batch; forward hooks capture the outputs of same-named
modules. A layer's SQNR is measured on its own output, so error accumulated upstream is
included: the first layer where SQNR drops sharply is the one to look at (or to skip).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from quanta.capture.record import call_with
from quanta.debug.report import plan_of
from quanta.kernels.reference import apply_activation
from quanta.qtensor import dequantize_any


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """20 log10(||reference|| / ||reference - test||) in dB (inf when identical)."""
    reference, test = reference.detach().double(), test.detach().double()
    noise = (reference - test).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(reference.norm() / noise))


def _capture(model: nn.Module, names: set[str], batch: Any) -> dict[str, list[torch.Tensor]]:
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        def hook(module: nn.Module, args: Any, out: Any, name: str = name) -> None:
            out = dequantize_any(out)
            if isinstance(out, torch.Tensor):
                outputs[name].append(out.detach().float().clone())
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            outputs["<output>"] = [dequantize_any(call_with(model, batch))]
    finally:
        for h in handles:
            h.remove()
    return outputs


def layer_sqnr(float_model: nn.Module, qmodel: nn.Module, batch: Any) -> dict[str, float]:
    """SQNR (dB) of every int8 layer's output, plus ``"<output>"`` for the model output.

    A layer with folded BatchNorm/ReLU is compared with the float model's output after the
    last folded module (a functional ReLU is applied to the float output). Layers called more
    than once per forward, or whose folded tail is shared, are left out.
    """
    plan = plan_of(qmodel)
    float_names = dict(float_model.named_modules())
    tails: dict[str, tuple[str, str]] = {}
    for lp in plan.int8_layers():
        if lp.name not in float_names:
            continue
        tail, activation = lp.name, "none"
        for fused in lp.fused:
            if fused in float_names:
                tail = fused
            else:
                activation = lp.activation  # a functional relu/relu6 call site
        tails[lp.name] = (tail, activation)
    ref = _capture(float_model.eval(), {t for t, _ in tails.values()}, batch)
    test = _capture(qmodel, set(tails), batch)
    result = {}
    for name, (tail, activation) in tails.items():
        if len(ref[tail]) == 1 and len(test[name]) == 1 and ref[tail][0].shape == test[name][0].shape:
            result[name] = sqnr(apply_activation(ref[tail][0], activation), test[name][0])
    out_ref, out_test = ref["<output>"][0], test["<output>"][0]
    if isinstance(out_ref, torch.Tensor) and isinstance(out_test, torch.Tensor):
        result["<output>"] = sqnr(out_ref, out_test)
    return result
