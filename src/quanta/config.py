"""Frozen, versioned configuration: what to quantize and how.

``QuantSpec`` describes one tensor's quantization; ``QuantConfig`` a whole model's. Both
round-trip through plain dicts (``to_dict``/``from_dict``) for the saved manifest.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from quanta.kernels.reference import NUMERICS

# version 2 added QuantSpec.group_size and mode "weight_only"; version 3 the post-training
# corrections (bias_correction, equalize, adaround); version 4 numerics; version 5 learn_ranges;
# version 6 smoothquant; version 7 adaround_iterations, learn_ranges_steps; version 8 rotate,
# rotation_seed; version 9 gptq; version 10 int4_activations (older dicts load with "float", the
# arithmetic they were saved with); version 11 activation_matmul; older dicts load unchanged otherwise
CONFIG_VERSION = 11
OBSERVERS = ("minmax", "moving_average", "percentile", "histogram", "entropy")
MODES = ("static", "dynamic", "qat", "weight_only")
BACKENDS = ("auto", "reference", "onednn")
OVERRIDE_BACKENDS = (*BACKENDS, "float")  # "float": dequantized weights, for ops where int8 loses


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``bits`` below 8 restricts the integer range (7-bit weights avoid the int16 saturation of
    AVX2 without VNNI; 4-bit is for experiments). ``bits=None`` on a weight spec means "pick
    for this CPU" and is resolved at convert time. ``group_size`` (weight-only mode, 4-bit):
    one scale per group of that many input columns instead of one per output channel.
    """

    dtype: str = "uint8"  # "uint8" | "int8"
    symmetric: bool = False
    per_channel: bool = False
    axis: int = 0
    bits: int | None = 8
    observer: str = "minmax"
    percentile: float = 99.99
    averaging_constant: float = 0.01
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "int8"):
            raise ValueError(f"QuantSpec.dtype must be 'uint8' or 'int8', got {self.dtype!r}")
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be in 2..8 or None, got {self.bits}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"QuantSpec.observer must be one of {OBSERVERS}, got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantSpec.percentile must be in (50, 100], got {self.percentile}")
        if self.group_size is not None and (type(self.group_size) is not int or self.group_size <= 0):
            raise ValueError(f"QuantSpec.group_size must be a positive int or None, got {self.group_size!r}")

    def with_bits(self, bits: int) -> QuantSpec:
        return dataclasses.replace(self, bits=bits)


WEIGHT_INT8 = QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=None)
ACTIVATION_UINT8 = QuantSpec(dtype="uint8", symmetric=False, per_channel=False, observer="histogram")


def check_activation_spec(spec: QuantSpec, where: str) -> None:
    """Activations run as uint8 per tensor in every kernel: reject specs the runtime would
    silently not honour (an int8 or per-channel or narrower activation would be clamped to
    the uint8 range, not simulated)."""
    if spec.dtype != "uint8" or spec.per_channel or spec.bits not in (None, 8):
        raise ValueError(
            f"{where}: activations are quantized as uint8 per tensor with 8 bits (symmetric or "
            f"not, any observer); got dtype={spec.dtype!r}, per_channel={spec.per_channel}, "
            f"bits={spec.bits}"
        )


def is_weight_only_spec(spec: QuantSpec) -> bool:
    """A grouped or 4-bit asymmetric spec: only weight-only mode can run it."""
    return spec.group_size is not None or (spec.bits == 4 and not spec.symmetric)


def check_weight_spec(spec: QuantSpec, mode: str, where: str) -> None:
    """Static, dynamic and QAT weights are symmetric int8 per channel; weight-only weights are
    8-bit symmetric per channel or 4-bit per group. A weight-only spec is accepted in any mode at
    construction (``quantize(mode="weight_only", config=...)`` sets the mode later); the other
    flows reject it when they run (:func:`check_mode_weights`)."""
    if is_weight_only_spec(spec):
        if spec.bits != 4:
            raise ValueError(f"{where}: group_size and asymmetric weights are for 4-bit weight-only "
                             f"quantization (bits=4), got bits={spec.bits}")
        if spec.group_size is not None and spec.group_size % 32:
            raise ValueError(f"{where}: group_size must be a multiple of 32, got {spec.group_size}")
    elif spec.dtype != "int8" or not spec.symmetric:
        raise ValueError(f"{where} must be a symmetric int8 spec (or, for mode='weight_only', a 4-bit "
                         "spec with group_size)")
    if mode == "weight_only" and spec.bits not in (None, 4, 8):
        raise ValueError(f"{where}: weight-only mode stores 4- or 8-bit weights, got bits={spec.bits}")


def check_mode_weights(config: QuantConfig) -> None:
    """Raise if a flow other than weight-only is given a weight-only spec it cannot run."""
    if config.mode == "weight_only":
        return
    specs = [("QuantConfig.weight", config.weight)]
    specs += [(f"Override({o.pattern!r}).weight", o.weight) for o in config.overrides if o.weight]
    for where, spec in specs:
        if is_weight_only_spec(spec):
            raise ValueError(f"{where}: grouped or asymmetric 4-bit weights need mode='weight_only', "
                             f"not {config.mode!r}")


@dataclass(frozen=True)
class Override:
    """Per-module settings. ``pattern`` matches a qualified module name (glob, or a prefix
    ending at a dot boundary) or a module class name such as ``"Linear"``."""

    pattern: str
    skip: bool = False
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    backend: str | None = None  # force a kernel: "auto" | "reference" | "onednn" | "float"

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in OVERRIDE_BACKENDS:
            raise ValueError(f"Override.backend must be one of {OVERRIDE_BACKENDS}, got {self.backend!r}")
        if self.activation is not None:
            check_activation_spec(self.activation, f"Override({self.pattern!r}).activation")
        if self.weight is not None:
            check_weight_spec(self.weight, "", f"Override({self.pattern!r}).weight")

    def matches(self, name: str, module: nn.Module) -> bool:
        return self.matches_name(name, type(module).__name__)

    def matches_name(self, name: str, type_name: str) -> bool:
        """A call site ``"block.conv:conv2d#0"`` is inside module ``block.conv``: patterns that
        match the module match its call sites too."""
        p = self.pattern
        module = name.split(":", 1)[0]
        return (
            name == p
            or module == p
            or module.startswith(p + ".")
            or fnmatch.fnmatchcase(name, p)
            or type_name == p
        )


RUNTIMES = ("graph", "eager")
NONFINITE = ("raise", "propagate")
INT4_ACTIVATIONS = ("int8", "float")
ACTIVATION_MATMUL = ("float", "int8")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides how a model is quantized. Frozen; build variants with
    ``dataclasses.replace`` or the ``skip=``/``overrides=`` arguments of ``quanta.quantize``."""

    mode: str = "static"
    weight: QuantSpec = WEIGHT_INT8
    activation: QuantSpec = ACTIVATION_UINT8
    backend: str = "auto"
    skip: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    # dynamic mode: one input scale/zero point per row (token) rather than per tensor; never less
    # accurate, and as fast since the quantize pass and the epilogue are native
    dynamic_per_row: bool = True
    runtime: str = "graph"  # "graph": replay the traced forward (quanta.modules.graph) | "eager"
    # NaN/Inf reaching a quantized layer at inference: "raise" a QuantizedInputError naming the
    # layer, or "propagate" them as float does (that call runs the layer in float)
    nonfinite: str = "raise"
    # static mode, post-training corrections applied by quanta.quantize (quanta.ptq), each off by
    # default and measured in docs/ptq.md: cross-layer equalization of conv pairs before
    # calibration; empirical bias correction after conversion; AdaRound (learned weight rounding,
    # layer by layer) within adaround_seconds of wall time, or adaround_iterations per layer
    # (reproducible: the same model on any machine at any load; the seconds are then not used)
    equalize: bool = False
    bias_correction: bool = False
    adaround: bool = False
    adaround_seconds: float = 300.0
    adaround_iterations: int | None = None
    # learned activation ranges (and biases) for the model's output error, through a fake-quantized
    # copy of the int8 model, after the other corrections, keeping their int8 weights
    # (quanta.ptq.range_learning), for learn_ranges_seconds or (reproducible) learn_ranges_steps
    learn_ranges: bool = False
    learn_ranges_seconds: float = 300.0
    learn_ranges_steps: int | None = None
    # SmoothQuant: each Linear's input outliers moved into its weight columns before calibration
    # (quanta.ptq.smoothquant; static, or dynamic given data); smoothquant_alpha None chooses
    # alpha per layer (or none at all)
    smoothquant: bool = False
    smoothquant_alpha: float | None = None
    # residual-stream rotation of RMSNorm transformers before quantizing, any mode (quanta.ptq.rotation):
    # exact in float, it spreads outlier channels so per-row int8 scales fit; needs one example input
    rotate: bool = False
    rotation_seed: int = 0
    # GPTQ: each Linear's weights rounded for the least output error on the calibration inputs
    # (quanta.ptq.gptq), after the rotation and SmoothQuant; dynamic and weight-only modes
    gptq: bool = False
    # weight-only int4 decode (the GEMV, fewer than 8 rows per call): "int8" quantizes the input per
    # block of 32 columns and sums each block's products in integers (llama.cpp's Q4 x Q8 blocks;
    # docs/architecture.md); "float" multiplies float inputs by the weights dequantized in registers
    int4_activations: str = "int8"
    # static mode: a matmul of two activations (attention's Q.K^T and P.V) in "float", or "int8"
    # (uint8 operands, exact int32 sums, a float output or an int8 one for an int8 reader). Float by
    # default: on the CPUs measured int8 ran slower and lost accuracy (docs/architecture.md)
    activation_matmul: str = "float"
    # whose int8 rounding the model reproduces bit for bit: "onnxruntime" (its .onnx export) or
    # "xnnpack" (its ExecuTorch .pte); they differ in how float inputs are quantized and adds
    # rounded, by one LSB on ~1e-6 / ~2e-5 of values (reference.NUMERICS)
    numerics: str = "onnxruntime"
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"QuantConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"QuantConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        check_weight_spec(self.weight, self.mode, "QuantConfig.weight")
        check_activation_spec(self.activation, "QuantConfig.activation")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"QuantConfig.runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"QuantConfig.nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        if self.int4_activations not in INT4_ACTIVATIONS:
            raise ValueError(f"QuantConfig.int4_activations must be one of {INT4_ACTIVATIONS}, "
                             f"got {self.int4_activations!r}")
        if self.activation_matmul not in ACTIVATION_MATMUL:
            raise ValueError(f"QuantConfig.activation_matmul must be one of {ACTIVATION_MATMUL}, "
                             f"got {self.activation_matmul!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"QuantConfig.numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if not self.adaround_seconds > 0:
            raise ValueError(f"QuantConfig.adaround_seconds must be positive, got {self.adaround_seconds}")
        seed = self.rotation_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"QuantConfig.rotation_seed must be a non-negative integer, got {seed!r}")
        if self.rotate and self.mode == "qat":
            raise ValueError("QuantConfig(rotate=True) is for post-training modes (static, dynamic, "
                             "weight_only): rotate the float model with quanta.ptq.rotate before QAT instead")
        if self.gptq and self.mode == "qat":
            raise ValueError("QuantConfig(gptq=True) is for mode='dynamic' or 'weight_only', not 'qat'")
        for name in ("adaround_iterations", "learn_ranges_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"QuantConfig.{name} must be a positive integer or None, got {value!r}")
        if not self.learn_ranges_seconds > 0:
            raise ValueError("QuantConfig.learn_ranges_seconds must be positive, "
                             f"got {self.learn_ranges_seconds}")
        if self.smoothquant_alpha is not None and not 0.0 < self.smoothquant_alpha < 1.0:
            raise ValueError("QuantConfig.smoothquant_alpha must be in (0, 1) or None, "
                             f"got {self.smoothquant_alpha}")
        corrections = [n for n in self.corrections() if n != "smoothquant" or self.mode != "dynamic"]
        if corrections and self.mode != "static":
            also = " (smoothquant: static or dynamic)" if "smoothquant" in corrections else ""
            raise ValueError(f"QuantConfig({', '.join(f'{n}=True' for n in corrections)}) needs calibration "
                             f"data: static mode only{also}, not {self.mode!r}")
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"QuantConfig version {self.version} is newer than this quanta ({CONFIG_VERSION})"
            )

    def corrections(self) -> list[str]:
        """The post-training corrections this config turns on (``quanta.ptq``), by field name."""
        return [n for n in ("equalize", "smoothquant", "bias_correction", "adaround", "learn_ranges")
                if getattr(self, n)]

    def for_module(self, name: str, module: nn.Module) -> tuple[bool, QuantSpec, QuantSpec, str]:
        """(skipped, weight spec, activation spec, reason) for one module, overrides applied."""
        return self.for_layer(name, type(module).__name__)

    def for_layer(self, name: str, type_name: str) -> tuple[bool, QuantSpec, QuantSpec, str]:
        """:meth:`for_module` by name and type name (a call site's type name is its op)."""
        for pattern in self.skip:
            if Override(pattern).matches_name(name, type_name):
                return True, self.weight, self.activation, f"excluded by config (skip={pattern!r})"
        weight, activation = self.weight, self.activation
        for o in self.overrides:
            if o.matches_name(name, type_name):
                if o.skip:
                    return True, weight, activation, f"excluded by config (override {o.pattern!r})"
                weight = o.weight or weight
                activation = o.activation or activation
        return False, weight, activation, ""

    def activation_for(self, name: str, type_name: str) -> QuantSpec:
        """The activation spec of one layer or call site (``type_name``: e.g. "Conv2d", "add")."""
        spec = self.activation
        for o in self.overrides:
            if o.activation is not None and o.matches_name(name, type_name):
                spec = o.activation
        return spec

    def backend_for(self, name: str, float_type: str) -> tuple[str, str]:
        """(requested backend, source) for one layer: the last matching override's ``backend``,
        else the config's. ``float_type`` is the original module class name (e.g. "Conv2d")."""
        for o in reversed(self.overrides):
            if o.backend is not None and o.matches_name(name, float_type):
                return o.backend, f"override {o.pattern!r}"
        return self.backend, "config"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        d = dict(d)
        if d.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise ValueError(f"config version {d['version']} is newer than this quanta ({CONFIG_VERSION})")
        if d.get("version", CONFIG_VERSION) < 10:  # saved before int8 activations existed
            d.setdefault("int4_activations", "float")
        for key in ("weight", "activation"):
            if isinstance(d.get(key), dict):
                d[key] = QuantSpec(**d[key])
        d["skip"] = tuple(d.get("skip", ()))
        d["overrides"] = tuple(
            Override(
                pattern=o["pattern"],
                skip=o.get("skip", False),
                weight=QuantSpec(**o["weight"]) if o.get("weight") else None,
                activation=QuantSpec(**o["activation"]) if o.get("activation") else None,
                backend=o.get("backend"),
            )
            for o in d.get("overrides", ())
        )
        return cls(**d)
