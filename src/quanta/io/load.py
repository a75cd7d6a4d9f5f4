"""``quanta.load``: rebuild a quantized model from a quanta file, without calibration.

The float model supplies the architecture (its weights are not used). The file's plan says
which modules were replaced by ``nn.Identity`` (folded BatchNorm, fused ReLU), which became
which quantized class, and which functional call sites run in int8; tensors are then loaded
with strict name, dtype and shape checks and the kernels are re-selected for this CPU. Every
problem with the file raises ``quanta.FormatError`` naming it; nothing in the file is executed.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from quanta.api import _set_module
from quanta.capture.plan import LayerPlan, Plan
from quanta.capture.weightops import tied_parameters
from quanta.config import MODES, QuantConfig, QuantSpec
from quanta.errors import FormatError, UnsupportedModelError
from quanta.io import format as fmt
from quanta.io.save import quantized_classes
from quanta.kernels.reference import ACTIVATIONS
from quanta.modules import opsites
from quanta.modules.backends import select_backends
from quanta.modules.mapping import INT8_SITE_OPS, MAPPING, mapped_type
from quanta.modules.sites import QuantizedSite
from quanta.modules.state import QuantaState, site_module_key

_PARSE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError)


def _header_metadata(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise FormatError(f"the file is truncated ({len(data)} bytes): not a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise FormatError("the file is truncated or not a safetensors file (header length exceeds the file)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeError, ValueError, RecursionError):
        raise FormatError("not a safetensors file, or its header is corrupted") from None
    if not isinstance(header, dict):
        raise FormatError("not a safetensors file, or its header is corrupted")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != fmt.FORMAT_NAME or "manifest" not in meta:
        raise FormatError("not a quanta file: its safetensors metadata has no quanta manifest")
    return meta


def read_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensor blobs) of a quanta file, with format and version checks."""
    data = Path(path).read_bytes()
    meta = _header_metadata(data)
    version = meta.get("format_version")
    if not (isinstance(version, str) and version.isdigit() and len(version) < 6):
        raise FormatError(f"invalid format_version {version!r} in the file metadata")
    if int(version) > fmt.FORMAT_VERSION:
        raise FormatError(
            f"the file has format version {version}, newer than this quanta supports "
            f"({fmt.FORMAT_VERSION}): upgrade quanta to load it"
        )
    manifest = fmt.decode_manifest(meta["manifest"])
    if manifest.get("format_version") != int(version):
        raise FormatError("the manifest's format_version does not match the file metadata: corrupted file")
    try:
        blobs = safetensors.torch.load(data)
    except Exception as e:  # noqa: BLE001 - the parser's own errors, wrapped
        raise FormatError(f"the tensor data is truncated or corrupted ({e})") from None
    return manifest, blobs


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded JSON manifest of a quanta file (for reports and the CLI)."""
    return read_file(path)[0]


def _check_qparams(lp: LayerPlan, key: str) -> None:
    q = getattr(lp, key)
    if q is None:
        return
    scale, zp = q
    if not (math.isfinite(scale) and scale > 0 and 0 <= zp <= 255):
        raise FormatError(f"layer {lp.name}: invalid {key} {q} in the manifest")


def _check_layer(lp: LayerPlan) -> None:
    str_fields = ("name", "kind", "float_type", "precision", "quantized_type", "activation", "backend",
                  "output_from")
    for key in str_fields:
        if not isinstance(getattr(lp, key), str):
            raise FormatError(f"layer {lp.name!r}: field {key!r} must be a string in the manifest")
    if not isinstance(lp.fused, list) or not all(isinstance(f, str) for f in lp.fused):
        raise FormatError(f"layer {lp.name}: field 'fused' must be a list of names")
    if lp.kind not in ("module", "site") or lp.activation not in ACTIVATIONS:
        raise FormatError(f"layer {lp.name}: invalid kind {lp.kind!r} or activation {lp.activation!r}")
    if not isinstance(lp.output_int8, bool) or not isinstance(lp.replaced, bool):
        raise FormatError(f"layer {lp.name}: output_int8 and replaced must be booleans")
    if lp.weight_bits is not None and (type(lp.weight_bits) is not int or not 2 <= lp.weight_bits <= 8):
        raise FormatError(f"layer {lp.name}: invalid weight_bits {lp.weight_bits!r}")
    _check_qparams(lp, "input_qparams")
    _check_qparams(lp, "output_qparams")
    if not (isinstance(lp.weight, str) and isinstance(lp.bias, str) and type(lp.macs) is int
            and isinstance(lp.call, dict)):
        raise FormatError(f"layer {lp.name}: invalid weight, bias, call or macs in the manifest")
    for key, value in lp.call.items():
        ok = key in ("stride", "padding", "dilation", "groups") and (
            type(value) is int or value in ("same", "valid")
            or (isinstance(value, list) and all(type(v) is int for v in value)))
        if not ok:
            raise FormatError(f"call site {lp.name}: invalid call argument {key}={value!r} in the manifest")


def parse_manifest(manifest: dict[str, Any]) -> tuple[QuantConfig, Plan]:
    """The manifest's config and plan, validated."""
    try:
        config = QuantConfig.from_dict(manifest["config"])
        plan = Plan.from_dict(copy.deepcopy(manifest["plan"]))
    except _PARSE_ERRORS as e:
        raise FormatError(f"the manifest's config or plan is invalid ({type(e).__name__}: {e})") from None
    if plan.mode not in MODES or manifest.get("mode") != plan.mode:
        raise FormatError(f"invalid mode {manifest.get('mode')!r} in the manifest")
    for name, lp in plan.layers.items():
        if not isinstance(name, str):
            raise FormatError("layer names in the manifest must be strings")
        _check_layer(lp)
    for meta in plan.input_meta:
        if meta is not None and not (len(meta) == 2 and isinstance(meta[0], str) and type(meta[1]) is int):
            raise FormatError(f"invalid input_meta entry {meta!r} in the manifest")
    return config, plan


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]


def check_architecture(model: nn.Module, plan: Plan) -> None:
    """The float model has exactly the leaf modules of the plan, of the same types (modules the
    plan looked inside are checked through their op sites' parameters)."""
    planned = {n: lp for n, lp in plan.layers.items() if lp.kind == "module"}
    opened = set(plan.opened)
    leaves = [(n, m) for n, m in _leaves(model) if n not in opened]
    for lp in plan.layers.values():
        for param in (lp.weight, lp.bias) if lp.kind == "site" else ():
            if param and not isinstance(_get_parameter(model, param), nn.Parameter):
                raise FormatError(f"the model does not match the file: call site {lp.name} reads "
                                  f"parameter {param!r}, which the model does not have")
    for name, m in leaves:
        lp = planned.get(name)
        if lp is None:
            raise FormatError(f"the model does not match the file: module {name!r} "
                              f"({type(m).__name__}) is not in the file")
        if type(m).__name__ != lp.float_type:
            raise FormatError(f"the model does not match the file: module {name!r} is "
                              f"{type(m).__name__} in the model but {lp.float_type} in the file")
    names = {n for n, _ in leaves}
    for name, lp in planned.items():
        if name not in names:
            raise FormatError(f"the model does not match the file: module {name!r} ({lp.float_type}) "
                              "from the file is missing from the model")


def _get_parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _build_op_sites(model: nn.Module, plan: Plan, state: QuantaState, table: dict[str, Any]) -> None:
    """The int8 layer of every weight op call site, shaped by the float model's parameters,
    and the aliases that replace the parameters only op sites read (before the tensors load)."""
    classes = quantized_classes()
    layers = {}
    for lp in plan.op_sites():
        cls = classes.get(lp.quantized_type)
        if cls is None or not hasattr(cls, "empty_like"):
            raise FormatError(f"call site {lp.name}: unknown quantized class {lp.quantized_type!r}")
        has_bias = f"_quanta.op_sites.{site_module_key(lp.name)}.bias" in table
        layers[lp.name] = cls.empty_like(opsites.float_layer(model, lp), lp, has_bias)
        state.set_op_site(lp.name, layers[lp.name])
    opsites.share_parameters(model, plan, layers)


def _build_quantized(model: nn.Module, plan: Plan, config: QuantConfig, modules: Any,
                     table: dict[str, Any]) -> None:
    if not isinstance(modules, dict):
        raise FormatError("manifest field 'modules' must be an object")
    classes = quantized_classes()
    int8_layers = {lp.name for lp in plan.int8_layers()}
    if set(modules) != int8_layers:
        odd = sorted(set(modules) ^ int8_layers)
        raise FormatError(f"the manifest's quantized modules do not match its plan (e.g. {odd[0]!r})")
    for name, class_name in modules.items():
        cls = classes.get(class_name) if isinstance(class_name, str) else None
        float_module = model.get_submodule(name)
        if cls is None or cls not in MAPPING.get(mapped_type(float_module), {}).values():
            raise FormatError(f"module {name!r}: {type(float_module).__name__} cannot become "
                              f"{class_name!r} (unknown or mismatched quantized class in the file)")
        lp = plan.layers[name]
        if hasattr(cls, "empty_like"):
            quantized = cls.empty_like(float_module, lp, f"{name}.bias" in table)
        elif plan.mode == "weight_only":  # shapes follow the saved spec (bits, group size)
            from quanta.weight_only import weight_only_spec

            quantized = cls.empty(float_module, weight_only_spec(config, name, float_module)[1], name,
                                  int4_activations=config.int4_activations)
        else:  # modules built from the float module and a weight spec (dynamic types)
            spec = QuantSpec(dtype="int8", symmetric=True, per_channel=True, bits=lp.weight_bits or 8)
            backend = config.backend_for(name, lp.float_type)[0]
            quantized = cls(float_module, weight_spec=spec, backend=backend,
                            per_row=config.dynamic_per_row, layer_name=name)
        _set_module(model, name, quantized)


def _build_sites(plan: Plan, state: QuantaState) -> None:
    for lp in plan.layers.values():
        if lp.kind == "site" and lp.precision == "int8" and not lp.weight:
            if lp.float_type not in INT8_SITE_OPS:
                raise FormatError(f"call site {lp.name}: op {lp.float_type!r} has no int8 kernel")
            site = QuantizedSite(lp.name, lp.float_type, lp.activation, None)
            site.converted = True
            site.output_int8 = lp.output_int8
            state.sites[site_module_key(lp.name)] = site


def check_tensors(model: nn.Module, table: dict[str, tuple[str, tuple[int, ...], Any]]) -> None:
    """File tensors and the rebuilt model's state_dict agree in names, dtypes and shapes."""
    expected = model.state_dict()
    missing = [n for n in expected if n not in table]
    extra = [n for n in table if n not in expected]
    if missing:
        raise FormatError(
            f"the file is missing {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}"
        )
    if extra:
        raise FormatError(f"the file has {len(extra)} tensor(s) the model does not have, e.g. {extra[0]!r}")
    for name, t in expected.items():
        dt, shape, _ = table[name]
        if fmt.DTYPES[dt] != t.dtype or shape != tuple(t.shape):
            raise FormatError(f"tensor {name!r}: the file has {dt} {list(shape)} but the model expects "
                              f"{fmt.dtype_name(t.dtype)} {list(t.shape)}")


def _wrap_smoothed(model: nn.Module, names: Any) -> None:
    """Re-create the SmoothQuant wrappers the saved model had (their scales come from the file)."""
    from quanta.ptq.smoothquant import SmoothedLinear

    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FormatError("the manifest's 'smoothed' entry is not a list of layer names")
    for name in names:
        linear = _wrapped_linear(model, name, "smoothed")
        scale = torch.ones(linear.in_features, dtype=linear.weight.dtype)
        _set_module(model, name, SmoothedLinear(scale, linear))


def _wrap_rotated(model: nn.Module, entries: Any) -> None:
    """Re-create the run-time rotations of a rotated model's Linears (their matrices come from the file)."""
    from quanta.ptq.rotation import RotatedLinear, Rotation

    if not isinstance(entries, dict):
        raise FormatError("the manifest's 'rotated' entry is not a mapping of layer names")
    for name, factors in entries.items():
        linear = _wrapped_linear(model, name, "rotated")
        sizes = isinstance(factors, list) and len(factors) == 2 and all(isinstance(f, int) for f in factors)
        if not sizes or factors[0] * factors[1] != linear.in_features or min(factors) < 1:
            raise FormatError(f"the manifest's rotation of {name!r} is not two sizes that multiply to its "
                              f"{linear.in_features} inputs")
        _set_module(model, name, RotatedLinear(Rotation(linear.in_features, tuple(factors)), linear))


def _wrapped_linear(model: nn.Module, name: str, what: str) -> nn.Linear:
    """The model's ``nn.Linear`` under ``name`` that the file says was wrapped (``what``: "smoothed"
    or "rotated"), or FormatError."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise FormatError(f"the model does not match the file: {what} layer {name!r} is not in "
                          "the model") from None
    if type(linear) is not nn.Linear:
        raise FormatError(f"the model does not match the file: {what} layer {name!r} is a "
                          f"{type(linear).__name__}, not an nn.Linear")
    return linear


def _untie_differing(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give each name its own Parameter where the file holds different values under names that
    share one in ``model`` (a rotated model's embedding and LM head, tied in the float model)."""
    for names in tied_parameters(model):
        present = [n for n in names if n in tensors]
        if len(present) > 1 and not all(torch.equal(tensors[present[0]], tensors[n]) for n in present[1:]):
            for name in present:
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner)
                setattr(module, attr, nn.Parameter(getattr(module, attr).detach().clone()))


def load(path: str | os.PathLike, float_model: nn.Module) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on a copy of ``float_model``'s architecture.

    Outputs are bit-identical to the saved model's on the same kernels. Raises
    ``quanta.FormatError`` for a truncated, corrupted, newer-format or mismatching file.
    """
    if not isinstance(float_model, nn.Module):
        raise UnsupportedModelError(
            f"quanta.load() needs the float nn.Module, got {type(float_model).__name__}"
        )
    if isinstance(getattr(float_model, "_quanta", None), QuantaState):
        raise UnsupportedModelError("quanta.load() needs the float model, but this one is already quantized")
    manifest, blobs = read_file(path)
    table = fmt.check_table(manifest.get("tensors"))
    fmt.check_blobs(table, blobs, manifest.get("data_sha256"))
    config, plan = parse_manifest(manifest)
    model = copy.deepcopy(float_model).eval()
    _wrap_rotated(model, manifest.get("rotated", {}))  # first: a smoothed Linear may sit inside one
    _wrap_smoothed(model, manifest.get("smoothed", []))
    check_architecture(model, plan)
    try:
        for lp in plan.layers.values():
            if lp.kind == "module" and lp.replaced:
                _set_module(model, lp.name, nn.Identity())
        _build_quantized(model, plan, config, manifest.get("modules"), table)
        state = QuantaState(plan, config)
        _build_sites(plan, state)
        _build_op_sites(model, plan, state, table)
        state.attach(model)  # sets model._quanta (unregistered) and its state-dict hooks
        check_tensors(model, table)
        tensors = fmt.unpack(table, blobs)
        _untie_differing(model, tensors)
        model.load_state_dict(tensors, strict=True)
    except FormatError:
        raise
    except (*_PARSE_ERRORS, RuntimeError) as e:
        raise FormatError(f"the file does not fit the model ({type(e).__name__}: {e})") from None
    select_backends(model, plan, config.backend)
    state.attach(model)
    return model.eval()
