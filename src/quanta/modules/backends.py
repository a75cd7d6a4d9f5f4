"""Per-layer backend choice at convert time, recorded in the plan and on each module.

Order of decisions for each static int8 module:
1. the requested backend: the last matching ``Override(backend=...)``, else ``config.backend``;
2. "reference" is always honoured; "float" (dequantized weights) is honoured when asked;
3. weights wider than this CPU's int8 kernels add exactly (|w| > 64 on x86 without VNNI, where
   u8 x s8 pair sums saturate int16; ``kernels.cpu``) never go to oneDNN, even when oneDNN is
   requested: such layers run the exact float fallback (dequantized int8 values, float32 op);
4. otherwise ``kernels.dispatch.choose_backend`` applies the measured per-op rule;
5. a layer oneDNN cannot run (odd "same" padding, non-zero padding modes) takes the reference.
6. unless oneDNN was asked for, a layer oneDNN would run on its scalar reference kernel
   ("ref:any": grouped convs with 1-2 channels per group on AVX2) takes the float path.
The choice and its reason go into ``plan.layers[name].backend`` / ``.backend_reason``.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from quanta.capture.plan import Plan
from quanta.config import QuantConfig, QuantSpec
from quanta.kernels import cpu, dispatch


def resolve_weight_bits(spec: QuantSpec, backend: str) -> QuantSpec:
    """Fill in ``bits=None`` (auto): 7-bit weights where the fast kernels would saturate
    (AVX2 without VNNI), 8-bit elsewhere and on the exact reference path."""
    if spec.bits is not None:
        return spec
    bits = 8 if backend == "reference" else cpu.weight_bits_for_cpu()
    return dataclasses.replace(spec, bits=bits)


def _shape_info(module: nn.Module) -> tuple[str, dict]:
    from quanta.modules.quantized import QuantizedConv1d, QuantizedLinear

    if isinstance(module, QuantizedLinear):
        return "linear", {"in_features": module.in_features, "out_features": module.out_features}
    kind = "conv1d" if isinstance(module, QuantizedConv1d) else "conv2d"
    return kind, {"in_channels": module.in_channels, "out_channels": module.out_channels,
                  "kernel": module.kernel_size, "groups": module.groups}


def choose_module_backend(module: nn.Module, requested: str, source: str) -> tuple[str, str]:
    """(backend, reason) for one quantized module; see the module docstring for the order."""
    if requested == "reference":
        return "reference", f"reference requested ({source})"
    if requested == "float":
        return "float", f"float on dequantized weights requested ({source})"
    if not cpu.weights_fit(module.weight):
        return "float", cpu.wide_weights_reason(module.weight)
    kind, info = _shape_info(module)
    backend, why = dispatch.choose_backend(kind, info, "onednn" if requested == "onednn" else "auto")
    if requested == "onednn" and backend == "onednn":
        why = f"onednn requested ({source})"
    if backend == "onednn" and getattr(module, "padding_mode", "zeros") != "zeros":
        return "reference", "oneDNN needs zero padding"
    return backend, why


def select_backends(model: nn.Module, plan: Plan, requested: str, config: QuantConfig | None = None) -> None:
    """Pick the kernel each static quantized module runs, pack its weights, record it in the plan.

    ``config`` (default: the one attached to ``model``) supplies per-layer ``Override(backend=)``.
    """
    from quanta.modules.dynamic import DynamicModule
    from quanta.modules.quantized import QuantizedModule

    if config is None:
        config = getattr(getattr(model, "_quanta", None), "config", None)
    nonfinite = config.nonfinite if config is not None else "raise"
    numerics = config.numerics if config is not None else "onnxruntime"
    state = getattr(model, "_quanta", None)
    op_sites = [(lp.name, state.sites_by_key[lp.name]) for lp in plan.op_sites()] if state is not None else []
    for name, module in [*model.named_modules(), *op_sites]:
        lp = plan.layers.get(name)
        if isinstance(module, (DynamicModule, QuantizedModule)):
            module.nonfinite = nonfinite
        if isinstance(module, QuantizedModule):
            module.numerics = numerics
        if isinstance(module, DynamicModule) and lp is not None:
            lp.backend, lp.backend_reason = module.backend_label(), module.backend_reason()
            lp.float_macs = lp.macs if lp.backend == "float" else 0
        if not isinstance(module, QuantizedModule):
            continue
        float_type = lp.float_type if lp is not None else type(module).__name__
        asked, source = requested, "config"
        if config is not None:
            override, where = config.backend_for(name, float_type)
            if where != "config":
                asked, source = override, where
        backend, why = choose_module_backend(module, asked, source)
        try:
            module.set_backend(backend, forced=asked == "onednn")
        except (NotImplementedError, RuntimeError, ValueError) as e:
            backend, why = "reference", f"oneDNN cannot run this layer ({e})"
            module.set_backend(backend)
        if backend == "onednn" and asked != "onednn":
            slow = _reference_kernel(module)
            if slow:
                backend, why = "float", slow
                module.set_backend(backend)
        if lp is not None:
            lp.backend, lp.backend_reason = backend, why
            lp.float_macs = _float_macs(module, lp)
    _select_site_backends(model, plan, requested, config)


def _reference_kernel(module: nn.Module) -> str:
    """Why ``module`` should not run on oneDNN although it can: for some grouped convs (1-2
    channels per group) no fast oneDNN kernel exists on some CPUs and oneDNN runs its scalar
    reference ("ref:any"), 10-27x slower than float (AVX2, session 26). "" when oneDNN is fast."""
    implementation = getattr(module._packed_kernel(), "implementation", None)
    name = implementation() if implementation is not None else ""
    if not name.startswith("ref"):
        return ""
    return (f"float faster: oneDNN has only its scalar reference kernel ({name}) for this conv "
            f"({module.in_channels}->{module.out_channels}, groups={module.groups}) on this CPU")


def _float_macs(module: nn.Module, lp: object) -> int:
    """The MACs this int8 layer runs in float on the example input: all of them on the float
    backend; a Linear's when its calls there are too small for int8 to win (per-call rule)."""
    from quanta.modules.quantized import QuantizedLinear

    if module.backend == "float":
        return lp.macs
    if isinstance(module, QuantizedLinear) and module.backend == "onednn" and not module.forced:
        rows = lp.macs // max(1, module.in_features * module.out_features)
        return 0 if module.int8_wins_rows(rows, bool(lp.input_from)) else lp.macs
    return 0


def _select_site_backends(model: nn.Module, plan: Plan, requested: str, config: QuantConfig | None) -> None:
    """int8 add call sites: one fused oneDNN pass unless the reference is asked for."""
    from quanta.modules.quantized import bump_generation

    state = getattr(model, "_quanta", None)
    for site in getattr(state, "sites", {}).values() if state is not None else ():
        site.nonfinite = config.nonfinite if config is not None else "raise"
        site.numerics = config.numerics if config is not None else "onnxruntime"
        asked, source = requested, "config"
        if config is not None:
            override, where = config.backend_for(site.key, site.op)
            if where != "config":
                asked, source = override, where
        if site.op not in ("add", "mul", "cat", "matmul"):
            backend, why = "reference", f"{site.op}: requantize + torch op"
        elif asked == "reference":
            backend, why = "reference", f"reference requested ({source})"
        elif site.op == "matmul":  # the fast backend, without oneDNN: kernels/matmul.py
            backend, why = "onednn", "int8 x int8 codes summed exactly in one float32 sgemm"
        elif not cpu.onednn_available():
            backend, why = "reference", "oneDNN int8 kernels unavailable in this torch build"
        elif site.op == "cat":
            backend, why = "onednn", "uint8 join; an input at other qparams requantized by table lookup"
        elif site.op == "mul":
            backend, why = "onednn", "one native pass: multiply + requantize (channel gates)"
        else:
            backend, why = "onednn", "one-pass add + requantize (unit depthwise conv with sum post-op)"
        site.backend = backend
        bump_generation(site)
        lp = plan.layers.get(site.key)
        if lp is not None:
            lp.backend, lp.backend_reason = backend, why
