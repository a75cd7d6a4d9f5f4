"""Which of quanta's ops ExecuTorch's XNNPACK backend runs in int8, which in fp32, and why not.

One table, read by the ExecuTorch export (``io/executorch_export.py``) to choose how each op is
written, and by the delegation summary to say what happened. XNNPACK's static int8 ops take the
``dequantize -> op [-> relu/hardtanh] -> quantize`` pattern; an op quanta runs in int8 whose
pattern XNNPACK has no int8 kernel for is written with quanta's integer values in float
(dequantized input and weights), which XNNPACK runs in fp32: the same numbers up to float
rounding, so the program stays faithful to quanta's reference, only that op is not int8.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: fused activations XNNPACK's int8 conv/linear take (ReLU6 written as hardtanh(0, 6))
INT8_ACTIVATIONS = ("none", "relu", "relu6")

#: op (edge dialect target name) -> how XNNPACK takes it in a quanta export
XNNPACK_OPS: dict[str, str] = {
    "convolution": "int8 (per-channel int8 weights, int32 bias, fused relu/hardtanh)",
    "linear": "int8 (per-channel int8 weights, int32 bias, fused relu/hardtanh)",
    "addmm": "int8 (per-channel int8 weights, int32 bias, fused relu/hardtanh)",
    "add": "int8 (fixed point: a model quantized with numerics='xnnpack' matches it bit for bit)",
    "mul": "int8 (squeeze-excite gate)",
    "cat": "int8 (2 to 5 inputs)",
    "max_pool2d": "int8",
    "max_pool2d_with_indices": "int8",
    "mean": "int8 (global average pooling, 4-D, keepdim)",
    "view_copy": "int8 (static shapes)",
    "permute_copy": "int8",
    "hardtanh": "int8 (ReLU6)",
    "relu": "int8",
    "sigmoid": "fp32 only: XNNPACK has no int8 sigmoid",
    "hardswish": "fp32 only: XNNPACK has no int8 hard-swish",
    "gelu": "fp32 only: XNNPACK has no int8 GELU",
    "avg_pool2d": "fp32 only: XNNPACK has no int8 average pooling (global means are int8)",
    "constant_pad_nd": "int8 only folded into the conv it feeds (zero padding)",
}


#: what the summary and the export's warning say of a model not quantized for XNNPACK's rounding
NUMERICS_MISMATCH = ("the model was quantized with numerics={numerics!r}: XNNPACK quantizes float inputs "
                     "and rounds int8 adds one LSB away on ~1e-6 / ~2e-5 of values, and deep nets fan that "
                     "out. Quantize with QuantConfig(numerics='xnnpack') for a .pte that equals the model "
                     "bit for bit")


def gemm_precision(activation: str, output_int8: bool) -> tuple[str, str]:
    """How XNNPACK runs one of quanta's int8 convs/linears: ("int8", "") or ("fp32", why)."""
    if not output_int8:
        return "fp32", "float output: XNNPACK's int8 conv/linear must end in a quantize"
    if activation not in INT8_ACTIVATIONS:
        return "fp32", f"fused {activation}: XNNPACK's int8 conv/linear fuse only relu and hardtanh"
    return "int8", ""


@dataclass
class Delegation:
    """What the XNNPACK partitioner took. ``int8``/``fp32``: delegated compute ops by target;
    ``portable``: ops left to ExecuTorch's portable kernels, as (layer, op); ``fp32_layers``:
    quanta's int8 layers XNNPACK runs in fp32, as (layer, why); ``numerics``: the model's
    ``QuantConfig.numerics`` (the .pte equals the model bit for bit only for "xnnpack")."""

    int8: Counter = field(default_factory=Counter)
    fp32: Counter = field(default_factory=Counter)
    portable: list[tuple[str, str]] = field(default_factory=list)
    fp32_layers: list[tuple[str, str]] = field(default_factory=list)
    numerics: str = "xnnpack"

    def counts(self) -> dict[str, int]:
        return {"int8": sum(self.int8.values()), "fp32": sum(self.fp32.values()),
                "portable": len(self.portable)}

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts(), "int8": dict(self.int8), "fp32": dict(self.fp32),
                "portable": [list(p) for p in self.portable],
                "fp32_layers": [list(p) for p in self.fp32_layers], "numerics": self.numerics}

    def summary(self) -> str:
        c = self.counts()
        lines = [f"XNNPACK: {c['int8']} int8 ops, {c['fp32']} fp32 ops delegated; "
                 f"{c['portable']} ops outside the delegate"]
        for layer, why in self.fp32_layers:
            lines.append(f"  fp32 {layer}: {why}")
        for layer, op in self.portable:
            lines.append(f"  not delegated {layer}: {op} ({XNNPACK_OPS.get(op, 'no XNNPACK kernel')})")
        if self.numerics != "xnnpack":
            lines.append(f"  {NUMERICS_MISMATCH.format(numerics=self.numerics)}")
        return "\n".join(lines)


_QUANT_NAMES = ("quantize_per_tensor", "quantize_per_channel")
_DEQUANT_NAMES = ("dequantize_per_tensor", "dequantize_per_channel")
_PASSIVE = ("getitem", "alloc", "_to_dim_order_copy", "_clone_dim_order", "full")
_FUSABLE = ("relu", "hardtanh")


def op_name(node: Any) -> str:
    """'convolution' for the edge op aten.convolution.default."""
    target = node.target
    parts = getattr(target, "__name__", str(target)).split(".")
    return parts[1] if len(parts) > 1 and parts[0] in ("aten", "quantized_decomposed") else parts[0]


def layer_of(node: Any) -> str:
    """The module path a graph node comes from (its innermost nn_module_stack entry)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<model>"
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "twin."):
        path = path.replace(prefix, "")
    return path.removeprefix("twin") or "<model>"


def classify_delegate(graph: Any, into: Delegation) -> None:
    """Count the compute ops of one lowered XNNPACK subgraph as int8 (every input dequantized,
    output quantized, possibly through a fused relu/hardtanh) or fp32."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node)
        if name in _QUANT_NAMES + _DEQUANT_NAMES or name in _PASSIVE:
            continue
        ins = [a for a in node.all_input_nodes if a.op != "placeholder" or op_name(a) != "placeholder"]
        ins_dq = all(op_name(a) in _DEQUANT_NAMES or _is_padded_dq(a) for a in ins if a.op == "call_function")
        has_dq = any(a.op == "call_function" and op_name(a) in _DEQUANT_NAMES for a in ins)
        out = list(node.users)
        if len(out) == 1 and op_name(out[0]) in _FUSABLE and name not in _FUSABLE:
            out = list(out[0].users)
        quantized_out = bool(out) and all(op_name(u) in _QUANT_NAMES for u in out)
        if name in _FUSABLE and node.args and op_name(node.args[0]) in ("convolution", "linear", "addmm"):
            continue  # fused into the op before it
        if name == "constant_pad_nd" and quantized_out is False and all(
                op_name(u) == "convolution" for u in node.users):
            continue  # folded into the conv
        int8 = has_dq and ins_dq and quantized_out and not XNNPACK_OPS.get(name, "").startswith("fp32 only")
        (into.int8 if int8 else into.fp32)[name] += 1  # an fp32-only op between q/dq: converts around it


def _is_padded_dq(node: Any) -> bool:
    return op_name(node) == "constant_pad_nd" and op_name(node.args[0]) in _DEQUANT_NAMES
