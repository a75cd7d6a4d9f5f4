"""Residual-stream rotation (QuaRot, Ashkboos et al. 2024; SliceGPT's computational invariance).

In a pre-norm transformer with RMSNorm the hidden state travels a residual stream: an embedding
writes it, each block reads it through an RMSNorm into Linears (q/k/v, gate/up) and adds a
Linear's output back (o_proj, down_proj). RMSNorm without its gain commutes with any orthogonal
Q (``rms(x Q) == rms(x)``), so the model computes the same function when

- the embedding's rows become ``E Q`` (the stream now carries ``x Q``),
- every norm's gain goes into the Linears that read it, whose weights become ``W diag(gain) Q``
  (the gain set to 1),
- every Linear that writes the stream becomes ``Q^T W`` (bias ``Q^T b``).

Q is a signed Hadamard matrix (:mod:`quanta.ptq.hadamard`), so a channel with outliers is spread
over all channels: per-row int8 scales stop following a few channels (docs/ptq.md, "Rotated
inputs"). The writers' own inputs (attention output, the gated MLP product) are not on the stream;
each gets a rotation at run time (:class:`RotatedLinear`, ``linear(x R)`` with the weight ``W R``),
applied as two small matmuls (R = A kron B, n (a + b) float multiply-adds per row).

The structure comes from quanta's dataflow record of one forward (``capture.record``). After the
rewrite the model runs the example again and its outputs must match the original's (relative
error below :func:`tolerance`), else the original weights are restored and an error names what
did not fit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from quanta.api import _set_module
from quanta.capture.activations import is_dropout
from quanta.capture.record import DataflowRecord, Node, batch_tensors, call_with, capture
from quanta.capture.weightops import tied_parameters
from quanta.errors import UnsupportedModelError
from quanta.ptq import hadamard

TOLERANCE = 1e-3  # relative L2 error of every output tensor, rotated float32 model against the original


def tolerance(model: nn.Module) -> float:
    """The check's bound: :data:`TOLERANCE`, or 4 x the epsilon of the model's lowest-precision float
    parameters (bfloat16: 3.1e-2) where that is larger. A rotation that does not commute errs by
    order 1."""
    eps = [torch.finfo(p.dtype).eps for p in model.parameters() if p.is_floating_point()]
    return max([TOLERANCE, *(4 * e for e in eps)])


# calls between a norm and its readers, or a writer and its add, that keep the last dimension
_PASS_FUNCTIONS = ("getitem", "contiguous", "view", "reshape", "clone", "dropout", "to", "float")


class Rotation(nn.Module):
    """``x -> x R`` over the last dimension, ``R = left kron right`` (each a signed Hadamard or
    random orthogonal matrix): an orthogonal n x n matrix applied as two small matmuls, one with
    each factor (a * b == n), n (a + b) multiply-adds per row instead of n * n."""

    FLOAT_REASON = "float by design: rotates the Linear's input at run time (QuantConfig(rotate=True))"

    def __init__(self, n: int, factors: tuple[int, int], seed: int = 0) -> None:
        super().__init__()
        a, b = factors
        if a * b != n:
            raise ValueError(f"Rotation: factors {a} x {b} do not multiply to {n}")
        left = hadamard.orthogonal(a, seed + 1) if a > 1 else torch.ones(1, 1)  # a == 1: not applied
        self.register_buffer("left_t", left.T.contiguous().float())
        self.register_buffer("right", hadamard.orthogonal(b, seed + 2).float())

    @property
    def factors(self) -> tuple[int, int]:
        return self.left_t.shape[0], self.right.shape[0]

    def matrix(self) -> torch.Tensor:
        """R as a dense float64 matrix (folding it into a weight)."""
        return torch.kron(self.left_t.double().T.contiguous(), self.right.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors
        right = self.right if x.dtype == self.right.dtype else self.right.to(x.dtype)
        y = torch.mm(x.reshape(-1, b), right)  # rows of X (a x b per input row) times right
        if a > 1:  # then left^T X: R's row index is (i, j) -> i * b + j
            left_t = self.left_t if x.dtype == self.left_t.dtype else self.left_t.to(x.dtype)
            y = torch.matmul(left_t, y.view(-1, a, b))
        return y.reshape(x.shape)


class RotatedLinear(nn.Module):
    """``linear(rotation(x))``: a Linear whose input is rotated at run time (its weight carries
    the rotation, so the pair equals the original Linear)."""

    def __init__(self, rotation: Rotation, linear: nn.Linear) -> None:
        super().__init__()
        self.rotation = rotation
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rotation(x))


@dataclass
class RotationResult:
    width: int = 0  # the residual stream's width (Q is width x width)
    sources: list[str] = field(default_factory=list)  # embeddings (rows rotated)
    norms: list[str] = field(default_factory=list)  # RMSNorms whose gain moved into their readers
    readers: list[str] = field(default_factory=list)  # Linears reading the stream (W diag(g) Q)
    writers: list[str] = field(default_factory=list)  # Linears adding into it (Q^T W), inputs rotated online
    online: dict[str, tuple[int, int]] = field(default_factory=dict)  # RotatedLinear name: factors
    untied: list[str] = field(default_factory=list)  # parameters that were shared and now are not
    error: float = 0.0  # largest relative L2 error of an output, rotated float against original

    def summary(self) -> str:
        per_row = {f"{a}x{b}" for a, b in self.online.values()}
        return (f"rotation: residual stream of width {self.width} rotated ({len(self.readers)} readers, "
                f"{len(self.writers)} writers, {len(self.norms)} RMSNorm gains folded); "
                f"{len(self.online)} Linear input(s) rotated at run time ({', '.join(sorted(per_row))}); "
                f"float outputs unchanged to {self.error:.1e}")


def rms_norm_neutral(module: nn.Module) -> float | None:
    """The weight value (1.0, or 0.0 for Gemma's ``x * (1 + w)``) at which ``module`` is a plain RMS
    normalization, if it is one: its only parameter a 1-D weight, the weight acting as a gain per
    channel, and at the neutral value it commutes with a random orthogonal matrix (LayerNorm does
    not: its mean). None for anything else."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if set(params) != {"weight"} or weight is None or weight.dim() != 1 or next(module.children(), None):
        return None
    n = weight.shape[0]
    if n < 2:
        return None
    probe = copy.deepcopy(module).float().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, n, generator=g)
    q = hadamard.orthogonal(n, 1).float()
    for neutral in (1.0, 0.0):
        try:
            with torch.no_grad():
                probe.weight.copy_(torch.randn(n, generator=g))
                scaled = probe(x)
                probe.weight.fill_(neutral)
                plain = probe(x)
                turned = probe(x @ q)
        except Exception:  # noqa: BLE001 - any module that cannot take a [4, n] input is not one
            return None
        if not all(isinstance(t, torch.Tensor) and t.shape == x.shape for t in (scaled, plain, turned)):
            return None
        gain = scaled[0] / plain[0]  # the same per-channel gain on every row, or not a gain
        if torch.allclose(scaled, plain * gain, atol=1e-4) and torch.allclose(turned, plain @ q, atol=1e-4):
            return neutral
    return None


def is_rms_norm(module: nn.Module) -> bool:
    return rms_norm_neutral(module) is not None


def _effective_gain(module: nn.Module, neutral: float) -> torch.Tensor:
    """The per-channel factor ``module`` applies after normalizing (its weight, or 1 + weight)."""
    n = module.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, n, generator=g, dtype=torch.float64).sign() * (1.0 + torch.rand(8, n, generator=g,
                                                                                       dtype=torch.float64))
    real = copy.deepcopy(module).double().eval()
    plain = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        plain.weight.fill_(neutral)
        return (real(x) / plain(x)).median(0).values


@dataclass
class _Stream:
    sources: list[str] = field(default_factory=list)  # embedding weight parameters
    norms: dict[str, float] = field(default_factory=dict)  # RMSNorm module name -> neutral weight
    readers: dict[str, str | None] = field(default_factory=dict)  # Linear weight -> norm whose gain it takes
    writers: dict[str, str] = field(default_factory=dict)  # Linear weight -> its module name ("" if a call)


def _linear_weight(node: Node, modules: dict[str, nn.Module]) -> str | None:
    """The weight parameter of a Linear node (an ``nn.Linear`` module or a ``linear`` call on one)."""
    if node.kind == "module" and isinstance(modules.get(node.name), nn.Linear):
        return node.name + ".weight"
    if node.kind == "function" and node.op == "linear" and node.weight:
        return node.weight
    return None


def _passes(node: Node, modules: dict[str, nn.Module]) -> bool:
    if node.kind == "module":
        m = modules.get(node.name)
        return isinstance(m, nn.Identity) or is_dropout(m)  # is_dropout(None) is False
    return node.kind == "function" and node.op in _PASS_FUNCTIONS and len(node.inputs) == 1


def _consumers(record: DataflowRecord, node: Node, modules: dict[str, nn.Module]) -> list[Node]:
    """The nodes reading ``node``, looking through calls that keep the last dimension."""
    out: list[Node] = []
    for c in (record.nodes[i] for i in node.consumers):
        out += _consumers(record, c, modules) if _passes(c, modules) and not c.is_output else [c]
    return out


def _producer(record: DataflowRecord, node_id: int, modules: dict[str, nn.Module]) -> Node:
    node = record.nodes[node_id]
    while _passes(node, modules) and len(node.consumers) == 1:
        node = record.nodes[node.inputs[0]]
    return node


def _embedding_weight(node: Node, modules: dict[str, nn.Module]) -> str:
    """The table of an embedding lookup node (an ``nn.Embedding`` module, or an ``embedding`` call
    on a parameter inside one), or "" for any other node."""
    if node.kind == "module" and isinstance(modules.get(node.name), nn.Embedding):
        return node.name + ".weight"
    if node.kind == "function" and node.op == "embedding" and len(node.params) == 1:
        return node.params[0]
    return ""


def _scales(record: DataflowRecord, node: Node, stream_node: Node) -> bool:
    """Whether ``node`` multiplies or divides the stream by constants only (tensors no input of
    the model reaches, such as Gemma's embedding scale): a rotation commutes with a scalar, and
    the check run of the rotated model catches a constant that is not one."""
    others = [record.nodes[i] for i in node.inputs if i != stream_node.id]
    return (node.kind == "function" and node.op in ("mul", "div") and node.inputs[:1] == [stream_node.id]
            and all(o.kind == "function" and not o.inputs for o in others))


def _describe(node: Node) -> str:
    return f"{node.name} ({node.op})"


def find_stream(record: DataflowRecord, modules: dict[str, nn.Module]) -> _Stream:
    """The residual stream of a recorded forward: from each embedding through the adds, with the
    norms and Linears reading it and the Linears writing it. Raises UnsupportedModelError naming
    the first node that does not fit the pattern."""
    stream = _Stream()
    starts = [n for n in record.nodes if _embedding_weight(n, modules)]
    if not starts:
        raise UnsupportedModelError("rotation: the model has no nn.Embedding to start a residual stream from")
    on_stream = {n.id for n in starts}
    stream.sources = [_embedding_weight(n, modules) for n in starts]
    queue = list(starts)
    while queue:
        node = queue.pop(0)
        if node.is_output:
            raise UnsupportedModelError(f"rotation: the residual stream at {_describe(node)} is an output of "
                                        "the model; rotating it would change what the model returns")
        for c in _consumers(record, node, modules):
            if c.id in on_stream:
                continue
            if c.kind == "function" and c.op == "add":
                for i in c.inputs:
                    if i not in on_stream:
                        _add_writer(record, stream, c, _producer(record, i, modules), modules, on_stream)
                on_stream.add(c.id)
                queue.append(c)
            elif _scales(record, c, node):  # x * c or x / c, c a constant: still the stream, scaled
                on_stream.add(c.id)
                queue.append(c)
            elif c.kind == "module" and (neutral := rms_norm_neutral(modules[c.name])) is not None:
                stream.norms[c.name] = neutral
                for r in _consumers(record, c, modules):
                    weight = _linear_weight(r, modules)
                    if weight is None:
                        raise UnsupportedModelError(
                            f"rotation: {c.name}'s output feeds {_describe(r)}; a norm's gain can only move "
                            "into Linears")
                    stream.readers[weight] = c.name
            elif (weight := _linear_weight(c, modules)) is not None:
                stream.readers.setdefault(weight, None)
            elif not (c.kind == "module" and next(modules[c.name].parameters(), None) is None):
                raise UnsupportedModelError(
                    f"rotation: {_describe(c)} reads the residual stream; only RMSNorms (x / rms(x) * gain), "
                    "Linears and adds can (a LayerNorm's mean does not commute with a rotation)")
            # a module without parameters (e.g. a rotary embedding reading only the dtype): checked
            # by running the rotated model
    if not stream.norms:
        raise UnsupportedModelError("rotation: no RMSNorm reads the residual stream; nothing to rotate")
    return stream


def _add_writer(record: DataflowRecord, stream: _Stream, add: Node, producer: Node,
                modules: dict[str, nn.Module], on_stream: set[int]) -> None:
    if table := _embedding_weight(producer, modules):
        stream.sources.append(table)
        on_stream.add(producer.id)
        return
    weight = _linear_weight(producer, modules)
    if weight is None:
        raise UnsupportedModelError(f"rotation: {add.name} adds {_describe(producer)} to the residual "
                                    "stream; only Linear outputs and embeddings can be rotated")
    if [c.id for c in _consumers(record, producer, modules)] != [add.id]:
        raise UnsupportedModelError(f"rotation: {_describe(producer)} writes the residual stream at "
                                    f"{add.name} and is read elsewhere too")
    stream.writers[weight] = producer.name if producer.kind == "module" else ""


def _outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        out = batch_tensors(call_with(model, example_inputs))
    return [t.detach().float() for t in out if t.is_floating_point()]


def rotate(model: nn.Module, example_inputs: Any, *, seed: int = 0,
           online: Callable[[str], bool] | None = None) -> RotationResult:
    """Rotate ``model``'s residual stream in place (see the module docstring); ``online(name)``
    says which writer Linears also get their input rotated at run time (default: all; quanta
    passes the ones it quantizes). The float model computes what it did before, which is checked
    on ``example_inputs``; on a mismatch the model is restored and UnsupportedModelError raised."""
    training = model.training
    model.eval()
    try:
        modules = dict(model.named_modules())
        stream = find_stream(capture(model, example_inputs, mode="dynamic"), modules)
        before = _outputs(model, example_inputs)
        undo: list[tuple[str, Any]] = []
        result = _apply(model, stream, seed, online or (lambda name: True), undo)
        after = _outputs(model, example_inputs)
        if len(after) == len(before):
            pairs = zip(after, before, strict=True)
            errors = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in pairs]
            result.error = max(errors, default=0.0)
        else:
            result.error = float("inf")
        bound = tolerance(model)
        if not result.error <= bound:
            for name, old in reversed(undo):
                _set_module(model, name, old)
            raise UnsupportedModelError(
                f"rotation: the rotated float model's outputs differ from the original's (relative error "
                f"{result.error:.2e} > {bound:g}); some op on the residual stream does not commute with "
                "a rotation. The model is unchanged")
        model.__dict__["_quanta_rotation"] = result  # what quanta.quantize's later steps check
        return result
    finally:
        model.train(training)


def _apply(model: nn.Module, stream: _Stream, seed: int, online: Callable[[str], bool],
           undo: list[tuple[str, Any]]) -> RotationResult:
    tied = {name for group in tied_parameters(model) for name in group}
    params = dict(model.named_parameters(remove_duplicate=False))
    touched = [*stream.sources, *stream.readers, *stream.writers]
    old = {name: params[name].detach().double() for name in touched}
    gains = {norm: _effective_gain(model.get_submodule(norm), v) for norm, v in stream.norms.items()}
    width = old[stream.sources[0]].shape[1]
    q = hadamard.orthogonal(width, seed)
    result = RotationResult(width=width, sources=list(stream.sources), norms=list(stream.norms),
                            readers=list(stream.readers), writers=list(stream.writers))
    result.untied = sorted(n for n in old if n in tied)

    def replace(name: str, new: Any) -> None:  # a parameter or a module, undone in reverse order
        undo.append((name, model.get_parameter(name) if isinstance(new, nn.Parameter) else
                     model.get_submodule(name)))
        _set_module(model, name, new)

    def put(name: str, value: torch.Tensor) -> None:
        was = params[name]
        replace(name, nn.Parameter(value.to(was.dtype), requires_grad=was.requires_grad))

    for name in stream.sources:
        put(name, old[name] @ q)
    for name, norm in stream.readers.items():
        w = old[name]
        put(name, (w * gains[norm] if norm is not None else w) @ q)
    for norm, neutral in stream.norms.items():
        put(norm + ".weight", torch.full_like(gains[norm], neutral))
    for name, module_name in stream.writers.items():
        w = old[name]
        if module_name and online(module_name):
            rotation = Rotation(w.shape[1], hadamard.kronecker_factors(w.shape[1]), seed=seed + 1)
            w = w @ rotation.matrix()
            result.online[module_name] = rotation.factors
        put(name, q.T @ w)
        bias = name[: -len("weight")] + "bias"
        if bias in params and params[bias] is not None:
            put(bias, q.T @ params[bias].detach().double())
        if module_name in result.online:
            replace(module_name, RotatedLinear(rotation, model.get_submodule(module_name)))
    return result
