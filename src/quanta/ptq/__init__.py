"""Post-training corrections applied around calibration, each behind a ``QuantConfig`` flag.

- ``rotate``: the residual stream of an RMSNorm transformer rotated, on a copy of the float
  model, before anything else and in any post-training mode (:mod:`.rotation`);
- ``equalize``: cross-layer equalization of conv/linear pairs, on a copy of the float model,
  before calibration (:mod:`quanta.ptq.equalization`);
- ``smoothquant``: each Linear's input outliers migrated into its weight columns, on that copy,
  before calibration (:mod:`.smoothquant`);
- ``gptq``: in dynamic and weight-only modes, each Linear's weights rounded for the least output
  error on the calibration inputs, after SmoothQuant (:mod:`.gptq`);
- ``bias_correction``: the mean output error of each layer moved into its bias, after conversion
  (:mod:`.bias_correction`);
- ``adaround``: learned weight rounding, layer by layer (:mod:`.adaround`);
- ``learn_ranges``: the activation ranges (and biases) learned for the model's output error
  through the int8 simulation, last, keeping the int8 weights (:mod:`.range_learning`).

``quanta.quantize(model, data, config=QuantConfig(adaround=True, ...))`` runs them in that order;
``corrections_of(qmodel)`` says what each did. Measured on real models in docs/ptq.md.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from quanta.capture.record import first_batch
from quanta.config import QuantConfig, QuantSpec
from quanta.errors import CalibrationError
from quanta.kernels.cpu import weight_bits_for_cpu
from quanta.ptq.adaround import RoundingResult, adaround
from quanta.ptq.bias_correction import BiasShift, correct_bias
from quanta.ptq.equalization import EqualizationResult, equalize
from quanta.ptq.gptq import GPTQResult, gptq
from quanta.ptq.range_learning import RangeLearningResult, learn_ranges
from quanta.ptq.rotation import RotatedLinear, RotationResult, rotate
from quanta.ptq.smoothquant import SmoothedLinear, SmoothingResult, smooth

__all__ = ["Corrections", "RotatedLinear", "SmoothedLinear", "adaround", "correct_bias", "corrections_of",
           "equalize", "gptq", "gptq_targets", "learn_ranges", "quantize_corrected", "quantize_with_data",
           "rotate", "smooth"]


@dataclass
class Corrections:
    """What the post-training corrections of one quantized model did."""

    rotation: RotationResult | None = None
    equalization: EqualizationResult | None = None
    smoothing: SmoothingResult | None = None
    gptq: GPTQResult | None = None
    ranges: RangeLearningResult | None = None
    rounding: list[RoundingResult] = field(default_factory=list)
    bias: list[BiasShift] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per correction applied, in the order they ran."""
        lines = [] if self.rotation is None else [self.rotation.summary()]
        if self.equalization is not None:
            lines.append(self.equalization.table().splitlines()[0])
        if self.smoothing is not None:
            lines.append(self.smoothing.summary())
        if self.gptq is not None:
            lines.append(self.gptq.summary())
        if self.bias:
            worst = max(self.bias, key=lambda b: b.relative)
            lines.append(f"bias correction: {len(self.bias)} layers, largest shift {worst.relative:.1%} of "
                         f"the output's rms ({worst.name}; {self.seconds.get('bias_correction', 0):.0f} s)")
        if self.rounding:
            kept = [r for r in self.rounding if r.kept]
            gain = sum(r.error_nearest for r in kept) / max(1e-30, sum(r.error_learned for r in kept))
            lines.append(f"AdaRound: learned rounding kept in {len(kept)} of {len(self.rounding)} layers "
                         f"(output error on the calibration rows {gain:.2f}x lower than round-to-nearest; "
                         f"{self.seconds.get('adaround', 0):.0f} s)")
        if self.ranges is not None:
            lines.append(self.ranges.summary())
        return "\n".join(lines)


def corrections_of(qmodel: nn.Module) -> Corrections | None:
    """The corrections ``quanta.quantize`` applied to ``qmodel`` (None: none were asked for)."""
    state = getattr(qmodel, "_quanta", None)
    return None if state is None else state.__dict__.get("corrections")


def rotate_for_quantize(model: nn.Module, calibration_data: Iterable[Any] | None, example_inputs: Any,
                        config: QuantConfig, *, inplace: bool) -> tuple[nn.Module, Any, Any, RotationResult]:
    """(rotated model, calibration data, example inputs, what was rotated) for ``quanta.quantize``
    with ``QuantConfig(rotate=True)``: a copy of ``model`` unless ``inplace``; the example is
    ``example_inputs`` or the first calibration batch (a one-shot iterator keeps it)."""
    if example_inputs is None:
        if calibration_data is None or isinstance(calibration_data, torch.Tensor):
            example_inputs = calibration_data
        else:
            example_inputs, calibration_data = first_batch(calibration_data)
    if example_inputs is None:
        raise CalibrationError("QuantConfig(rotate=True) needs example_inputs= (or calibration_data): one "
                               "forward finds the residual stream and checks the rotated model")
    rotated = model if inplace else copy.deepcopy(model)

    def quantized(name: str) -> bool:
        return not config.for_module(name, rotated.get_submodule(name))[0]

    result = rotate(rotated, example_inputs, seed=config.rotation_seed, online=quantized)
    return rotated, calibration_data, example_inputs, result


def attach_rotation(qmodel: nn.Module, rotation: RotationResult) -> nn.Module:
    """Record ``rotation`` in ``qmodel``'s corrections (what ``corrections_of`` returns)."""
    done = corrections_of(qmodel) or Corrections()
    done.rotation = rotation
    qmodel._quanta.__dict__["corrections"] = done
    return qmodel


def quantize_corrected(model: nn.Module, calibration_data: Iterable[Any], config: QuantConfig, *,
                       example_inputs: Any, max_batches: int | None, show_progress: bool) -> nn.Module:
    """Static quantization with the corrections ``config`` turns on (``quanta.quantize`` calls
    this). The calibration batches are kept in memory: each correction reads them again."""
    import time

    from quanta.api import calibrate, convert, prepare

    batches = _batches(calibration_data, max_batches)
    done = Corrections()
    float_model = model
    if config.equalize:  # on a copy: the user's model is left as it was
        float_model = copy.deepcopy(model)
        start = time.monotonic()
        done.equalization = equalize(float_model, example_inputs)
        done.seconds["equalize"] = time.monotonic() - start
    if config.smoothquant:
        if float_model is model:
            float_model = copy.deepcopy(model)
        _smooth(float_model, batches, config, done, show_progress)
    prepared = prepare(float_model, example_inputs, config)
    calibrate(prepared, batches, show_progress=show_progress)
    qmodel = convert(prepared, inplace=True)
    float_model.eval()
    if config.bias_correction:  # before AdaRound: measured better than after (docs/ptq.md)
        start = time.monotonic()
        done.bias = correct_bias(float_model, qmodel, batches, show_progress=show_progress)
        done.seconds["bias_correction"] = time.monotonic() - start
    if config.adaround:
        start = time.monotonic()
        done.rounding = adaround(float_model, qmodel, batches, seconds=config.adaround_seconds,
                                 iterations=config.adaround_iterations, show_progress=show_progress)
        done.seconds["adaround"] = time.monotonic() - start
    if config.learn_ranges:  # last: it keeps the weights the corrections above chose
        qmodel, done.ranges = learn_ranges(float_model, qmodel, batches, seconds=config.learn_ranges_seconds,
                                           steps=config.learn_ranges_steps, show_progress=show_progress)
        done.seconds["learn_ranges"] = done.ranges.seconds
    qmodel._quanta.__dict__["corrections"] = done
    return qmodel


def quantize_with_data(model: nn.Module, calibration_data: Iterable[Any] | None, config: QuantConfig, *,
                       inplace: bool, max_batches: int | None, show_progress: bool,
                       **kwargs: Any) -> nn.Module:
    """Dynamic or weight-only quantization (``config.mode``) of ``model`` rewritten first from
    its behaviour on ``calibration_data``: smoothed (``smoothquant``, dynamic mode: the inputs of
    each Linear choose its smoothing), then its Linear weights rounded by GPTQ (``gptq``).
    ``quanta.quantize`` calls this."""
    import time

    from quanta.dynamic import quantize_dynamic
    from quanta.weight_only import quantize_weight_only

    smoothing = config.smoothquant and config.mode == "dynamic"  # weight-only inputs stay float
    flags = " and ".join(n for n, on in (("smoothquant=True", smoothing), ("gptq=True", config.gptq)) if on)
    if calibration_data is None:
        raise CalibrationError(f"QuantConfig({flags}) in {config.mode} mode needs calibration_data: the "
                               "inputs of each Linear decide")
    if isinstance(calibration_data, torch.Tensor):
        calibration_data = [calibration_data]
    batches = _batches(calibration_data, max_batches)
    rewritten = model if inplace else copy.deepcopy(model)
    done = Corrections()
    if smoothing:
        _smooth(rewritten, batches, config, done, show_progress)
    if config.gptq:
        start = time.monotonic()
        targets = gptq_targets(rewritten, config, kwargs.get("modules"))
        done.gptq = gptq(rewritten, batches, targets, config.mode, show_progress=show_progress)
        done.seconds["gptq"] = time.monotonic() - start
    quantize = quantize_dynamic if config.mode == "dynamic" else quantize_weight_only
    qmodel = quantize(rewritten, config=config, inplace=True, **kwargs)
    qmodel._quanta.__dict__["corrections"] = done
    return qmodel


def gptq_targets(model: nn.Module, config: QuantConfig, modules: Any = None) -> dict[str, QuantSpec]:
    """The ``nn.Linear`` modules ``config.mode`` (dynamic or weight-only) will quantize, with their
    weight specs at the bits conversion resolves: the mode's own plan decides (``modules``: the
    dynamic ``modules=`` selection), so no layer left float is rounded."""
    from quanta.dynamic import plan_dynamic, selected_types
    from quanta.weight_only import plan_weight_only, weight_only_spec

    weight_only = config.mode == "weight_only"
    plan = plan_weight_only(model, config) if weight_only else \
        plan_dynamic(model, config, selected_types(modules))
    targets = {}
    for name, lp in plan.layers.items():
        m = model.get_submodule(name)
        if lp.precision != "int8" or not isinstance(m, nn.Linear):
            continue
        spec = weight_only_spec(config, name, m)[1] if weight_only else config.for_module(name, m)[1]
        targets[name] = spec.with_bits(lp.weight_bits)
    return targets


def _batches(calibration_data: Iterable[Any], max_batches: int | None) -> list[Any]:
    """The calibration batches held in memory (each correction reads them again)."""
    batches = list(itertools.islice(calibration_data, max_batches) if max_batches else calibration_data)
    if not batches:
        raise CalibrationError("calibration data is empty: it yielded no batch")
    return batches


def _smooth(model: nn.Module, batches: list[Any], config: QuantConfig, done: Corrections,
            show_progress: bool) -> None:
    """SmoothQuant on ``model`` in place, at this CPU's weight bits, recorded in ``done``."""
    import time

    start = time.monotonic()
    bits = config.weight.bits if config.weight.bits is not None else weight_bits_for_cpu()
    done.smoothing = smooth(model, batches, config, alpha=config.smoothquant_alpha, weight_bits=bits,
                            show_progress=show_progress)
    done.seconds["smoothquant"] = time.monotonic() - start
