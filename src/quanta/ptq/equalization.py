"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction").

Two consecutive layers A -> B whose connection commutes with a positive per-channel scale
(nothing, ReLU, zero padding, pooling, Dropout in eval) compute the same function when output
channel i of A (weight row and bias) is divided by ``s_i`` and input channel i of B is
multiplied by it. With ``s_i = sqrt(r1_i / r2_i)`` (``r1_i``, ``r2_i``: the largest |weight| of
A's output channel i and of B's input channel i) both ranges become ``sqrt(r1_i * r2_i)``, so
per-channel int8 weights of A and B lose less to channels far smaller than their largest.

BatchNorm is folded first: a BatchNorm whose only input is a conv/linear (that alone reads its
weights) is folded into it in place and left as an exact identity (mean 0, variance 1, eps 0,
weight 1, bias 0), so quanta's plan still folds it and still fuses the activation after it.
Pairs are found in quanta's dataflow record of one forward (``capture.record``), so convs called
functionally inside a module's own forward (same-padded ``Conv2d`` subclasses) pair like modules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from quanta.capture import activations
from quanta.capture.record import DataflowRecord, Node, capture
from quanta.errors import UnsupportedModelError
from quanta.modules.mapping import FOLDABLE_BATCHNORM

_LAYER_OPS = ("conv1d", "conv2d", "linear")
# modules and functions that commute with a positive per-channel scale: f(s * x) = s * f(x)
_SCALE_FREE_MODULES = (nn.Identity, nn.ZeroPad1d, nn.ZeroPad2d,
                       nn.ZeroPad3d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_SCALE_FREE_FUNCTIONS = ("relu", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d",
                         "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d",
                         "adaptive_max_pool2d")
_ACTIVATIONS = {"ReLU6", "Hardtanh", "SiLU", "Sigmoid", "Tanh", "GELU", "Hardswish", "Hardsigmoid",
                "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "Mish", "Softplus", "Softmax",
                "relu6", "hardtanh", "silu", "sigmoid", "tanh", "gelu", "hardswish", "hardsigmoid",
                "leaky_relu", "prelu", "elu", "selu", "celu", "mish", "softplus", "softmax"}
_MAX_HOPS = 8  # how far past a layer the search for the next one goes (for the skipped list)


@dataclass(frozen=True)
class EqualizedPair:
    first: str  # module name, or weight parameter name for a functional conv call site
    second: str
    channels: int
    range_ratio_before: float  # mean over channels of min(r1, r2) / max(r1, r2)
    range_ratio_after: float


@dataclass
class EqualizationResult:
    pairs: list[EqualizedPair] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (first, second, reason)
    folded_batchnorms: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The equalized pairs with their range ratios, then the skipped pairs grouped by reason."""
        lines = [f"cross-layer equalization: {len(self.pairs)} pair(s) equalized, {len(self.skipped)} "
                 f"skipped, {len(self.folded_batchnorms)} BatchNorm(s) folded"]
        if self.pairs:
            lines.append("  first -> second (channels): range ratio before -> after")
            lines += [f"  {p.first} -> {p.second} ({p.channels}): {p.range_ratio_before:.3f} -> "
                      f"{p.range_ratio_after:.3f}" for p in self.pairs]
        by_reason: dict[str, list[str]] = {}
        for first, second, reason in self.skipped:
            by_reason.setdefault(reason, []).append(f"{first} -> {second}")
        for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            more = f" and {len(names) - 2} more" if len(names) > 2 else ""
            lines.append(f"  skipped {len(names)}: {reason} (e.g. {'; '.join(names[:2])}{more})")
        return "\n".join(lines)


@dataclass
class _Layer:
    """A conv/linear call whose weight (and bias) only it reads."""

    node: Node
    name: str
    kind: str  # "conv" | "linear"
    owner: nn.Module  # holds the weight (and bias) as attributes
    weight_attr: str
    bias_attr: str
    groups: int
    why: str = ""  # why it cannot be part of a pair ("" if it can)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.weight_attr)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.owner, self.bias_attr, None) if self.bias_attr else None

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups


def equalize(model: nn.Module, example_inputs: Any, *, iterations: int = 1) -> EqualizationResult:
    """Equalize, IN PLACE, the per-channel weight ranges of consecutive conv/linear pairs whose
    connection is scale-equivariant. The model's float function stays the same (up to fp32
    rounding). Puts ``model`` in eval mode and folds its BatchNorms into the layers before
    them; ``iterations`` repeats the pass so chains A -> B -> C settle."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"equalize() expects an nn.Module, got {type(model).__name__}")
    if type(iterations) is not int or iterations < 1:
        raise ValueError(f"equalize(iterations=...) must be a positive int, got {iterations!r}")
    if hasattr(model, "_quanta"):
        raise UnsupportedModelError("equalize() works on the float model: this one is already "
                                    "prepared or quantized by quanta")
    model.eval()
    result = EqualizationResult()
    record = capture(model, example_inputs)
    layers = _layers(model, record)
    if _add_missing_biases(model, record, layers):  # a zero bias changes nothing; see who reads it
        record = capture(model, example_inputs)
        layers = _layers(model, record)
    folded = _fold_batchnorms(model, record, layers)
    result.folded_batchnorms = sorted(record.nodes[i].name for i in folded)

    pairs: list[tuple[_Layer, _Layer]] = []
    seen: set[tuple[str, str]] = set()
    for node_id in sorted(layers):
        first = layers[node_id]
        if first.why:
            continue
        for second_id, reason in _followers(model, record, first.node, layers, folded):
            second = layers[second_id]
            if (first.name, second.name) in seen:
                continue
            seen.add((first.name, second.name))
            reason = reason or second.why or _mismatch(first, second)
            if reason:
                result.skipped.append((first.name, second.name, reason))
            else:
                pairs.append((first, second))
    before = [_range_ratio(a, b) for a, b in pairs]
    with torch.no_grad():
        for _ in range(iterations):
            for a, b in pairs:
                _equalize_pair(a, b)
    for (a, b), ratio in zip(pairs, before, strict=True):
        result.pairs.append(EqualizedPair(a.name, b.name, a.weight.shape[0], ratio, _range_ratio(a, b)))
    return result


def _layers(model: nn.Module, record: DataflowRecord) -> dict[int, _Layer]:
    """Node id -> layer for each conv1d/conv2d/linear call (module or functional); ``why`` says
    why one cannot be equalized (shared weights, called more than once, ...)."""
    modules = dict(model.named_modules())
    readers: Counter[int] = Counter()
    for n in record.nodes:
        if n.kind == "module":
            readers.update(id(p) for p in modules[n.name].parameters())
        elif n.kind == "function":
            readers.update(id(model.get_parameter(p)) for p in set(n.params))
    calls = Counter(n.name for n in record.nodes)
    out: dict[int, _Layer] = {}
    for n in record.nodes:
        m = modules.get(n.name) if n.kind == "module" else None
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            linear = isinstance(m, nn.Linear)
            layer = _Layer(n, n.name, "linear" if linear else "conv", m, "weight", "bias",
                           getattr(m, "groups", 1))
            dims = 2 if linear else 3 if isinstance(m, nn.Conv1d) else 4
            if getattr(m, "padding_mode", "zeros") != "zeros":
                layer.why = f"{n.name} pads with {m.padding_mode!r}"
        elif n.kind == "function" and n.op in _LAYER_OPS and n.weight:
            owner_name, _, attr = n.weight.rpartition(".")
            owner = model.get_submodule(owner_name)
            bias_attr = n.bias.rpartition(".")[2] if n.bias else ""
            if not bias_attr and "bias" in owner._parameters and owner._parameters["bias"] is None:
                bias_attr = "bias"  # an empty bias slot: _add_missing_biases may fill it
            layer = _Layer(n, n.weight, "linear" if n.op == "linear" else "conv", owner, attr, bias_attr,
                           int(n.call.get("groups", 1)))
            dims = {"linear": 2, "conv1d": 3, "conv2d": 4}[n.op]
            if n.bias and n.bias.rpartition(".")[0] != owner_name:
                layer.why = f"{n.name} reads a bias of another module"
        elif n.weight or (m is not None and any(p.dim() >= 2 for p in m.parameters())):
            out[n.id] = _Layer(n, n.weight or n.name, "other", m or model, "", "", 1,
                               why=f"{n.weight or n.name} ({n.op}) is not a conv1d/conv2d/linear")
            continue
        else:
            continue
        weight, bias = layer.weight, layer.bias
        if not isinstance(weight, torch.Tensor) or weight.dim() != dims or not weight.is_floating_point():
            layer.why = layer.why or f"{layer.name} has an unexpected weight"
        elif readers[id(weight)] != 1 or (bias is not None and readers[id(bias)] != 1):
            layer.why = layer.why or f"{layer.name} shares its weights with another layer"
        elif calls[n.name] != 1:
            layer.why = layer.why or f"{layer.name} is called more than once"
        out[n.id] = layer
    return out


def _batchnorm_after(model: nn.Module, record: DataflowRecord, layer: _Layer) -> Node | None:
    """The BatchNorm node that is the only reader of ``layer``'s output and foldable into it."""
    node = layer.node
    if node.is_output or len(node.consumers) != 1:
        return None
    bn_node = record.nodes[node.consumers[0]]
    if bn_node.kind != "module" or len(record.module_nodes(bn_node.name)) != 1:
        return None
    bn = model.get_submodule(bn_node.name)
    layer_type = nn.Linear if layer.kind == "linear" else {3: nn.Conv1d, 4: nn.Conv2d}.get(layer.weight.dim())
    if not isinstance(bn, FOLDABLE_BATCHNORM.get(layer_type, ())) or bn.running_mean is None:
        return None
    return bn_node if bn.num_features == layer.weight.shape[0] else None


def _add_missing_biases(model: nn.Module, record: DataflowRecord, layers: dict[int, _Layer]) -> bool:
    """Give every layer followed by a foldable BatchNorm a zero bias where its bias slot is empty."""
    added = False
    for layer in layers.values():
        if layer.why:
            continue
        if layer.bias is None and layer.bias_attr and _batchnorm_after(model, record, layer) is not None:
            w = layer.weight
            setattr(layer.owner, layer.bias_attr, nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype,
                                                                           device=w.device)))
            added = True
    return added


def _fold_batchnorms(model: nn.Module, record: DataflowRecord, layers: dict[int, _Layer]) -> set[int]:
    """Fold each BatchNorm that directly follows a layer into it; the node ids of those folded."""
    folded = set()
    for layer in layers.values():
        if layer.why:
            continue
        bn_node = _batchnorm_after(model, record, layer)
        bias = layer.bias
        if bn_node is None or bias is None or (layer.node.kind == "function" and not layer.node.bias):
            continue  # no bias the call reads: the BatchNorm's shift has nowhere to go
        bn = model.get_submodule(bn_node.name)
        with torch.no_grad():
            factor = bn.running_var.add(bn.eps).rsqrt()
            shift = -bn.running_mean * factor
            if bn.affine:
                factor, shift = factor * bn.weight, shift * bn.weight + bn.bias
            layer.weight.mul_(factor.reshape([-1] + [1] * (layer.weight.dim() - 1)).to(layer.weight.dtype))
            bias.copy_(bias * factor + shift)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.eps = 0.0
            if bn.affine:
                bn.weight.fill_(1.0)
                bn.bias.zero_()
        folded.add(bn_node.id)
    return folded


def _module_reason(m: nn.Module) -> str:
    """Why module ``m`` between two layers breaks their pair ("" if it commutes with scaling)."""
    if isinstance(m, _SCALE_FREE_MODULES) or activations.is_dropout(m):  # Dropout: the identity in eval mode
        return ""
    if isinstance(m, nn.ConstantPad1d | nn.ConstantPad2d | nn.ConstantPad3d) and m.value == 0:
        return ""
    if type(m).__name__ == "Identity" and not any(True for _ in m.parameters()) \
            and not any(True for _ in m.buffers()):
        return ""  # an Identity of a model's own (efficientnet-pytorch's)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f"{type(m).__name__} between them could not be folded"
    if activations.module_kind(m) == "relu":
        return ""
    if type(m).__name__ in _ACTIVATIONS or activations.module_kind(m):
        return f"{type(m).__name__} between them is not positive-homogeneous"
    return f"{type(m).__name__} between them is not known to commute with per-channel scaling"


def _node_reason(model: nn.Module, node: Node, folded: set[int]) -> str:
    if node.id in folded:
        return ""
    if len(node.inputs) > 1:
        return f"{node.op} between them also reads another tensor"
    if node.kind == "module":
        return _module_reason(model.get_submodule(node.name))
    if node.op in _SCALE_FREE_FUNCTIONS or activations.function_kind(node.op, node.args) == "relu":
        return ""
    if node.op in _ACTIVATIONS:
        return f"{node.op} between them is not positive-homogeneous"
    return f"{node.op} between them is not known to commute with per-channel scaling"


def _followers(model: nn.Module, record: DataflowRecord, start: Node, layers: dict[int, _Layer],
               folded: set[int]) -> list[tuple[int, str]]:
    """The layers ``start``'s output reaches within a few ops and through at most one op that
    breaks a pair: (node id, why the pair breaks, or "")."""
    found: list[tuple[int, str]] = []
    # (node, reason of the op that broke the path, reason of a fork or output on the way, hops)
    frontier: list[tuple[Node, str, str, int]] = [(start, "", "", 0)]
    while frontier:
        node, broken, fork, hops = frontier.pop()
        consumers = [record.nodes[c] for c in node.consumers]
        if node.is_output:
            fork = fork or "first layer's output is also a model output"
        for i, c in enumerate(consumers):
            others = sorted({o.op for j, o in enumerate(consumers) if j != i})
            why = fork or (f"first layer's output also feeds {', '.join(others)}" if others else "")
            if c.id in layers:
                found.append((c.id, broken or why))
                continue
            reason = _node_reason(model, c, folded) if c.kind != "input" else "input"
            if hops < _MAX_HOPS and not (broken and reason):
                frontier.append((c, broken or reason, why, hops + 1))
    return sorted(found, key=lambda f: f[0])


def _mismatch(first: _Layer, second: _Layer) -> str:
    """Why ``second`` cannot take ``first``'s channel scales ("" if it can)."""
    if first.kind != second.kind:
        return f"a {first.kind} feeds a {second.kind}: their channel axes differ"
    if first.weight.shape[0] != second.in_channels:
        return f"{first.weight.shape[0]} output channels feed {second.in_channels} input channels"
    if first.weight.dtype != second.weight.dtype:
        return "their weights have different dtypes"
    return ""


def _input_view(layer: _Layer) -> torch.Tensor:
    """``layer``'s weight as [groups, outputs per group, inputs per group, rest]: input channel
    ``g * inputs_per_group + j`` is ``[g, :, j, :]`` (dense, depthwise and grouped alike)."""
    w = layer.weight
    return w.view(layer.groups, w.shape[0] // layer.groups, w.shape[1], -1)


def _ranges(first: _Layer, second: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, r2): the largest |weight| of each output channel of ``first``, input channel of ``second``."""
    r1 = first.weight.detach().abs().flatten(1).amax(1)
    r2 = _input_view(second).detach().abs().amax(dim=(1, 3)).flatten()
    return r1.double(), r2.double()


def _range_ratio(first: _Layer, second: _Layer) -> float:
    r1, r2 = _ranges(first, second)
    low, high = torch.minimum(r1, r2), torch.maximum(r1, r2)
    ratio = torch.where(high > 0, low / high.clamp_min(1e-300), torch.ones_like(high))
    return float(ratio.mean())


def _equalize_pair(first: _Layer, second: _Layer) -> None:
    r1, r2 = _ranges(first, second)
    usable = (r1 > 0) & (r2 > 0) & torch.isfinite(r1) & torch.isfinite(r2)
    scale = torch.where(usable, (r1 / torch.where(usable, r2, 1.0)).sqrt(), torch.ones_like(r1))
    if not bool(usable.any()):
        return
    w = first.weight
    s = scale.to(w.dtype)
    w.div_(s.reshape([-1] + [1] * (w.dim() - 1)))
    if first.bias is not None:
        first.bias.div_(s.to(first.bias.dtype))
    _input_view(second).mul_(s.view(second.groups, 1, -1, 1).to(second.weight.dtype))

