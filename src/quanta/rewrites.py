"""The float rewrites ``quanta.quantize`` runs before a mode's quantization (the rotation, GPTQ),
checked where a lower-level entry point cannot run them itself."""

from __future__ import annotations

import torch.nn as nn

from quanta.config import QuantConfig


def check_rewritten(model: nn.Module, config: QuantConfig, where: str) -> None:
    """The float rewrites ``quanta.quantize`` runs before quantizing (``rotate``: one example
    input; ``gptq``: calibration data) reached a function that cannot run them: the model must
    have been rewritten already, else this raises rather than silently ignore the flag."""
    if config.rotate and "_quanta_rotation" not in getattr(model, "__dict__", {}):
        raise ValueError(f"QuantConfig(rotate=True): {where} does not rotate the model; call "
                         "quanta.quantize(model, ..., example_inputs=...), which rotates first, or "
                         "quanta.ptq.rotate(model, example_inputs) before")
    if not config.gptq:
        return
    if config.mode not in ("dynamic", "weight_only"):
        raise ValueError(f"QuantConfig(gptq=True) rounds weights for mode='dynamic' or 'weight_only', not "
                         f"{config.mode!r} (static mode learns its rounding with adaround=True)")
    if "_quanta_gptq" not in getattr(model, "__dict__", {}):
        raise ValueError(f"QuantConfig(gptq=True): {where} has no calibration data to run GPTQ; call "
                         f"quanta.quantize(model, calibration_data, mode={config.mode!r}, config=...), or "
                         "quanta.ptq.gptq(model, batches, targets, mode) before")
