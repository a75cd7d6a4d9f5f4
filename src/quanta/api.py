"""Public workflow: prepare -> calibrate -> convert, or ``quantize`` in one call."""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from quanta.capture.plan import Plan, plan_static
from quanta.capture.record import call_with, capture, first_batch
from quanta.config import QuantConfig, QuantSpec, check_mode_weights
from quanta.debug.coverage import warning_text as coverage_warning
from quanta.errors import CalibrationError, QuantaWarning, UnsupportedModelError
from quanta.modules import opsites
from quanta.modules.backends import resolve_weight_bits, select_backends
from quanta.modules.mapping import MAPPING, mapped_type
from quanta.modules.observed import ObservedModule, fold_batchnorm
from quanta.modules.sites import QuantizedSite
from quanta.modules.state import QuantaState, site_module_key
from quanta.progress import progress
from quanta.rewrites import check_rewritten


def _set_module(model: nn.Module, name: str, new: nn.Module | nn.Parameter) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper; else ``model``."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def get_state(model: nn.Module) -> QuantaState:
    state = getattr(model, "_quanta", None)
    if not isinstance(state, QuantaState):
        raise UnsupportedModelError(
            f"{type(model).__name__} has not been prepared by quanta: call quanta.prepare() first"
        )
    return state


def _resolve_config(config: QuantConfig | None, mode: str, skip: Iterable[str] | None) -> QuantConfig:
    config = config or QuantConfig(mode=mode)
    if config.mode != mode:
        config = QuantConfig(**{**config.__dict__, "mode": mode})
    if skip:
        config = QuantConfig(**{**config.__dict__, "skip": tuple(config.skip) + tuple(skip)})
    check_mode_weights(config)
    return config


def _copy(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected an nn.Module, got {type(model).__name__}")
    if inplace:
        return model
    state = getattr(model, "_quanta", None)
    if isinstance(state, QuantaState):
        state.detach()
        try:
            out = copy.deepcopy(model)
        finally:
            state.attach(model)
        out._quanta.attach(out)
        return out
    return copy.deepcopy(model)


def prepare(model: nn.Module, example_inputs: Any, config: QuantConfig | None = None, *,
            skip: Iterable[str] | None = None, inplace: bool = False) -> nn.Module:
    """Fuse, insert observers and record the dataflow of one forward on ``example_inputs``.

    ``example_inputs`` follows the batch rule of ``calibrate``: a Tensor is passed as
    ``model(x)``, a tuple as ``model(*x)``, a dict as ``model(**x)``. The returned model runs
    the float computation and records activation ranges whenever it is called.
    """
    config = _resolve_config(config, "static", skip)
    check_rewritten(model, config, "quanta.prepare")
    model = _copy(model, inplace).eval()
    if isinstance(getattr(model, "_quanta", None), QuantaState):
        raise UnsupportedModelError("this model is already prepared or quantized by quanta")
    record = capture(model, example_inputs, config.mode)
    plan = plan_static(model, record, config)
    _apply_static(model, plan, config, record)
    return model


def swap_layers(
    model: nn.Module, plan: Plan, config: QuantConfig, record: Any,
    make_layer: Callable[..., nn.Module], make_site: Callable[[Any], QuantizedSite],
) -> QuantaState:
    """Apply a plan's fusion and swap its int8 layers and call sites; shared by static and QAT.

    ``make_layer(lp, module, bn, weight_spec, activation_spec)`` builds what replaces an int8
    layer (``bn``: the BatchNorm folded into it, or None); folded BatchNorms and ReLU modules
    whose every call was fused become ``nn.Identity``.
    """
    modules = dict(model.named_modules())
    # ReLU calls fused into int8 layers and into int8 call sites (the site applies it): a
    # module whose every call is fused becomes Identity, so no redundant op runs or is exported
    fusers = [lp for lp in plan.layers.values() if lp.precision == "int8" and not lp.weight_only]
    fused_calls = Counter(name for lp in fusers for name in lp.fused)
    layers = {}  # every int8 layer with activations: modules and weight op call sites alike
    for lp in [*plan.activation_layers(), *plan.op_sites()]:
        module = modules[lp.name] if lp.kind == "module" else opsites.float_layer(model, lp)
        _, wspec, aspec, _ = config.for_layer(lp.name, lp.float_type)
        batchnorms = (n for n in lp.fused if isinstance(modules.get(n), nn.modules.batchnorm._BatchNorm))
        bn_name = next(batchnorms, None)
        if bn_name is not None:
            _set_module(model, bn_name, nn.Identity())
            plan.layers[bn_name].replaced = True
        bn = modules[bn_name] if bn_name is not None else None
        layers[lp.name] = make_layer(lp, module, bn, wspec, aspec)
        if lp.kind == "module":
            _set_module(model, lp.name, layers[lp.name])
    for name, count in fused_calls.items():
        calls = len(record.module_nodes(name))
        if name in modules and calls == count and not plan.layers[name].replaced:
            _set_module(model, name, nn.Identity())
            plan.layers[name].replaced = True
    state = QuantaState(plan, config)
    for lp in plan.layers.values():
        if lp.kind == "site" and lp.precision == "int8" and not lp.weight:
            state.sites[site_module_key(lp.name)] = make_site(lp)
    for lp in plan.op_sites():
        state.set_op_site(lp.name, layers[lp.name])
    state.attach(model)
    return state


def _apply_static(model: nn.Module, plan: Plan, config: QuantConfig, record: Any) -> None:
    def observed(lp: Any, module: nn.Module, bn: nn.Module | None, wspec: QuantSpec,
                 aspec: QuantSpec) -> nn.Module:
        folded = fold_batchnorm(module, bn) if bn is not None else module
        return ObservedModule(folded, lp.activation, wspec, aspec, lp.name)

    swap_layers(model, plan, config, record, observed,
                lambda lp: QuantizedSite(lp.name, lp.float_type, lp.activation,
                                         config.activation_for(lp.name, lp.float_type)))


def calibrate(prepared: nn.Module, data: Iterable[Any], *, max_batches: int | None = None,
              show_progress: bool = True) -> nn.Module:
    """Run calibration batches through a prepared model (same as calling it on each batch).

    Under an initialized torch.distributed process group every rank calibrates on its own data
    (``quanta.distributed.shard``) and the observers are then reduced across ranks, so all ranks
    convert to the same qparams (a collective: call it on every rank)."""
    get_state(prepared)
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = min(total, max_batches) if total is not None else max_batches
    if isinstance(data, torch.Tensor):
        raise CalibrationError(
            "calibration data is a single Tensor: pass an iterable of batches, e.g. [x] or a DataLoader"
        )
    seen = 0
    prepared.eval()
    with torch.no_grad():
        for batch in progress(data, total=total, description="calibrating", enabled=show_progress):
            if max_batches is not None and seen >= max_batches:
                break
            call_with(prepared, batch)
            seen += 1
    from quanta.distributed.collective import active

    if active():  # each rank calibrated its shard: reduce the observers (quanta.distributed)
        from quanta.distributed.calibration import sync_observers

        seen = sync_observers(prepared, local_batches=seen)
    if seen == 0:
        raise CalibrationError("calibration data is empty: it yielded no batch")
    return prepared


def convert(prepared: nn.Module, *, inplace: bool = False, config: QuantConfig | None = None) -> nn.Module:
    """Replace observed modules by int8 modules and freeze call-site qparams.

    A model wrapped in DistributedDataParallel is converted from the model inside it."""
    prepared = unwrap(prepared)
    before = get_state(prepared).__dict__.get("before_convert")  # quanta.distributed.prepare_ddp
    if before is not None:
        before(prepared)
    model = _copy(prepared, inplace)
    state = get_state(model)
    plan, config = state.plan, config or state.config
    observed = {n: m for n, m in model.named_modules() if isinstance(m, ObservedModule)}
    observed.update((lp.name, state.sites_by_key[lp.name]) for lp in plan.op_sites())
    for name, m in list(observed.items()):
        lp = plan.layers[name]
        if not m.input_observer.observed and lp.reason.startswith("not in the example forward"):
            # a branch the example forward did not take and calibration never reached
            lp.precision, lp.quantized_type, lp.reason = "float", "", "never called during calibration"
            _set_module(model, name, m.module)
            del observed[name]
    unobserved = [n for n, m in observed.items() if not m.input_observer.observed]
    unobserved += [s.key for s in state.sites.values() if s.observer is not None and not s.observer.observed]
    if unobserved:
        raise CalibrationError(
            f"convert() found {len(unobserved)} layer(s) never calibrated: {', '.join(unobserved[:8])}"
            f"{' ...' if len(unobserved) > 8 else ''}; run quanta.calibrate(prepared, data) first"
        )
    for site in state.sites.values():
        lp = plan.layers[site.key]
        lp.output_qparams = _qparams(site.observer, site.spec or config.activation)
        if site.op == "matmul":
            spec = site.spec or config.activation
            site.set_input_qparams([_qparams(o, spec) for o in site.input_observers])
        site.set_qparams(*lp.output_qparams)
        site.output_int8 = lp.output_int8
    for name, m in observed.items():
        plan.layers[name].output_qparams = _qparams(m.output_observer, m.activation_spec)
    for lp in plan.layers.values():  # producers that only feed a cat write at its qparams
        if lp.output_from and lp.name in observed:
            lp.output_qparams = plan.layers[lp.output_from].output_qparams
    for name, m in observed.items():
        lp = plan.layers[name]
        source = plan.layers.get(lp.input_from)
        lp.input_qparams = source.output_qparams if source else _qparams(m.input_observer, m.activation_spec)
        wspec = resolve_weight_bits(m.weight_spec, config.backend)
        lp.weight_bits = wspec.bits
        qtype = MAPPING[mapped_type(m.module)]["static"]  # QAT converts to the same int8 modules
        lp.quantized_type = qtype.__name__
        q = qtype(m.module, weight_spec=wspec, input_qparams=lp.input_qparams,
                  output_qparams=lp.output_qparams, activation=lp.activation, output_int8=lp.output_int8)
        q.layer_name = name
        if lp.kind == "module":
            _set_module(model, name, q)
        else:
            state.set_op_site(name, q)
    opsites.share_parameters(model, plan, {lp.name: state.sites_by_key[lp.name] for lp in plan.op_sites()})
    for lp in plan.int8_layers():
        if lp.weight_only:  # embeddings: int8 rows, nothing to calibrate
            module = model.get_submodule(lp.name)
            wspec = resolve_weight_bits(config.for_module(lp.name, module)[1], config.backend)
            q = MAPPING[mapped_type(module)]["static"](module, weight_spec=wspec, layer_name=lp.name)
            lp.weight_bits = q.weight_bits
            _set_module(model, lp.name, q)
    select_backends(model, plan, config.backend)
    state.attach(model)
    model.eval()
    warn_low_coverage(plan)
    return model


def warn_low_coverage(plan: Plan) -> None:
    """Warn when less than half of the conv/linear MACs run int8, naming the largest float ones."""
    text = coverage_warning(plan)
    if text is not None:
        warnings.warn(text, QuantaWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The stack level of the first caller outside the quanta package (where a warning points)."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _qparams(observer: Any, spec: QuantSpec) -> tuple[float, int]:
    scale, zero_point = observer.calculate_qparams(spec)
    return float(scale), int(zero_point)


def quantize(model: nn.Module, calibration_data: Iterable[Any] | None = None, mode: str = "static",
             config: QuantConfig | None = None, *, skip: Iterable[str] | None = None,
             example_inputs: Any = None, max_batches: int | None = None, inplace: bool = False,
             show_progress: bool = True, eval_fn: Callable[[nn.Module], float] | None = None,
             max_drop: float | None = None, order: str = "sensitivity", **kwargs: Any) -> nn.Module:
    """Quantize ``model`` in one call. ``mode="static"`` calibrates on ``calibration_data``
    (its first batch doubles as example input); see ``quantize_dynamic`` for ``"dynamic"`` and
    ``quantize_weight_only`` for ``"weight_only"`` (neither needs data).

    With ``max_drop`` and ``eval_fn`` (``eval_fn(model) -> float``, higher is better), keeps the
    fewest conv/linear MACs float that bring the metric within ``max_drop`` of float's
    (``quanta.accuracy_target``; ``order``: "sensitivity" or "sqnr"); ``quanta.target_of(qmodel)``
    tells what was kept float and why.

    With ``QuantConfig(rotate=True)`` the residual stream of an RMSNorm transformer is rotated
    first (``quanta.ptq.rotation``; exact in float, checked on one example: ``example_inputs`` or
    the first calibration batch); ``quanta.ptq.corrections_of(qmodel).rotation`` tells what."""
    if config is not None and config.rotate:
        from quanta.ptq import attach_rotation, rotate_for_quantize

        model, calibration_data, example_inputs, rotation = rotate_for_quantize(
            model, calibration_data, example_inputs, _resolve_config(config, mode, skip), inplace=inplace)
        qmodel = _quantize(model, calibration_data, mode, config, skip=skip, example_inputs=example_inputs,
                           max_batches=max_batches, inplace=True, show_progress=show_progress,
                           eval_fn=eval_fn, max_drop=max_drop, order=order, rotated=True, **kwargs)
        return attach_rotation(qmodel, rotation)
    return _quantize(model, calibration_data, mode, config, skip=skip, example_inputs=example_inputs,
                     max_batches=max_batches, inplace=inplace, show_progress=show_progress, eval_fn=eval_fn,
                     max_drop=max_drop, order=order, **kwargs)


def _quantize(model: nn.Module, calibration_data: Iterable[Any] | None, mode: str, config: QuantConfig | None,
              *, skip: Iterable[str] | None, example_inputs: Any, max_batches: int | None, inplace: bool,
              show_progress: bool, eval_fn: Callable[[nn.Module], float] | None, max_drop: float | None,
              order: str, rotated: bool = False, **kwargs: Any) -> nn.Module:
    """:func:`quantize` after the optional rotation (``rotated``: ``model`` is already a copy)."""
    if (eval_fn is None) != (max_drop is None):
        raise ValueError("an accuracy target needs both eval_fn= (eval_fn(model) -> float, higher is "
                         "better) and max_drop= (the largest drop from float allowed)")
    if max_drop is not None:
        if mode != "static" or (inplace and not rotated):
            raise ValueError("max_drop= works in static mode on a copy of the model (not inplace)")
        if calibration_data is None:
            raise CalibrationError("static quantization needs calibration_data (an iterable of batches)")
        if kwargs:
            raise TypeError(f"quantize() got unexpected arguments: {', '.join(kwargs)}")
        from quanta.accuracy_target import quantize_to_target

        resolved = _resolve_config(config, "static", skip)
        if resolved.corrections():
            raise ValueError("max_drop= does not combine with the post-training corrections "
                             f"({', '.join(resolved.corrections())}) yet: its "
                             "variants share one calibration and are not corrected; use one or the other")
        return quantize_to_target(model, calibration_data, eval_fn, max_drop, resolved, order=order,
                                  example_inputs=example_inputs, max_batches=max_batches,
                                  show_progress=show_progress)
    if mode in ("dynamic", "weight_only"):
        resolved = _resolve_config(config, mode, skip)
        if resolved.gptq or (mode == "dynamic" and resolved.smoothquant):
            from quanta.ptq import quantize_with_data

            return quantize_with_data(model, calibration_data, resolved, inplace=inplace,
                                      max_batches=max_batches, show_progress=show_progress, **kwargs)
        if mode == "dynamic":
            from quanta.dynamic import quantize_dynamic

            return quantize_dynamic(model, config=config, skip=skip, inplace=inplace, **kwargs)
        from quanta.weight_only import quantize_weight_only

        return quantize_weight_only(model, config=config, skip=skip, inplace=inplace, **kwargs)
    if mode != "static":
        raise ValueError(f"quantize(mode={mode!r}): use 'static', 'dynamic' or 'weight_only' "
                         "(QAT: quanta.prepare_qat)")
    if kwargs:
        raise TypeError(f"quantize() got unexpected arguments: {', '.join(kwargs)}")
    if calibration_data is None:
        raise CalibrationError("static quantization needs calibration_data (an iterable of batches)")
    if isinstance(calibration_data, torch.Tensor):
        raise CalibrationError(
            "calibration data is a single Tensor: pass an iterable of batches, e.g. [x] or a DataLoader"
        )
    if example_inputs is None:
        example_inputs, calibration_data = first_batch(calibration_data)
        if example_inputs is None:
            raise CalibrationError("calibration data is empty: it yielded no batch")
    resolved = _resolve_config(config, "static", skip)
    check_rewritten(model, resolved, "quanta.quantize")
    if resolved.corrections():
        if inplace and not rotated:
            flags = ", ".join(n + "=True" for n in resolved.corrections())
            raise ValueError(f"QuantConfig({flags}) compares against the float model: quantize a copy "
                             "(inplace=False)")
        from quanta.ptq import quantize_corrected

        return quantize_corrected(model, calibration_data, resolved, example_inputs=example_inputs,
                                  max_batches=max_batches, show_progress=show_progress)
    prepared = prepare(model, example_inputs, resolved, inplace=inplace)
    calibrate(prepared, calibration_data, max_batches=max_batches, show_progress=show_progress)
    return convert(prepared, inplace=True)
