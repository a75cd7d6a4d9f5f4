"""``quanta.export_executorch``: a quantized model as an ExecuTorch program (``.pte``) whose int8
ops are delegated to XNNPACK.

How: the same export twin as the ONNX export (``io/onnx_export.py``: every quantized module and
int8 call site replaced by float ops between explicit quantize/dequantize steps, placed by
quanta's plan) with its steps written as torch ops, ``quantized_decomposed.quantize_per_tensor``
/ ``dequantize_per_tensor`` / ``dequantize_per_channel``. ``torch.export`` captures it and
XNNPACK's partitioner fuses each ``dequantize -> op -> quantize`` into an int8 op. The numbers are
quanta's own (no re-calibration): per-channel int8 weights, the int32 bias at ``x_scale *
w_scale`` (traced as the float it stands for; the delegate gets the int32 itself, see
``delegate_to_xnnpack``), calibrated activation qparams. XNNPACK computes on signed int8 (qs8):
quanta's uint8 value ``q`` with zero point ``z`` is the int8 value ``q - 128`` with zero point
``z - 128``, exactly. Every delegated int8 conv/linear then equals quanta's reference bit for
bit (XNNPACK's requantization is quanta's). XNNPACK's int8 add is fixed-point (21-bit integer
multipliers, ties rounded up) and it quantizes a float input as ``round(x * f32(1 / s))``: both
equal quanta's when the model was quantized with ``QuantConfig(numerics="xnnpack")``, and land one
LSB away on ~2e-5 of add pairs and ~1e-6 of float inputs otherwise (the export warns;
tests/io/test_executorch_export.py pins both).

What XNNPACK cannot run in int8 (``io/delegation.py``: fused SiLU/sigmoid/GELU/hard-swish, float
outputs) is written with quanta's integer values in float and runs in XNNPACK's fp32 kernels;
``strict=True`` refuses that instead, naming the layer and op.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quanta.errors import UnsupportedModelError
from quanta.io import delegation
from quanta.io.atomic import atomic_write_bytes
from quanta.io.onnx_export import Steps, _activation, _as_args, _ExportQuantized, export_twin
from quanta.modules.quantized import QuantizedModule
from quanta.modules.state import numerics_of


def _ops() -> Any:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed

    return torch.ops.quantized_decomposed


class XnnpackSteps(Steps):
    """The twin's steps as ``quantized_decomposed`` torch ops in XNNPACK's signed int8."""

    requantize_layout = True  # dq -> view -> q: XNNPACK runs layout ops on int8 too

    def __init__(self) -> None:
        self.qd = _ops()
        self._quantized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(dq out) -> (dq out, q)

    def quant_dequant(self, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        z = int(zero_point) - 128
        q = self.qd.quantize_per_tensor.default(x, float(scale), z, -128, 127, torch.int8)
        y = self.qd.dequantize_per_tensor.default(q, float(scale), z, -128, 127, torch.int8)
        self._quantized[id(y)] = (y, q)
        return y

    def requantized(self, x: torch.Tensor, noted: tuple[float, int] | None, scale: float,
                    zero_point: int) -> torch.Tensor:
        """Each consumer of an int8 value gets its own dequantize of it (the shape XNNPACK's
        partitioner fuses; one shared dequantize can tie two partitions into a cycle)."""
        entry = self._quantized.get(id(x))
        same = noted is not None and (float(noted[0]), int(noted[1])) == (float(scale), int(zero_point))
        if same and entry is not None and entry[0] is x:
            z = int(zero_point) - 128
            return self.qd.dequantize_per_tensor.default(entry[1], float(scale), z, -128, 127, torch.int8)
        return self.quant_dequant(x, scale, zero_point)

    def clear(self) -> None:
        self._quantized.clear()

    def prepare(self, m: _ExportQuantized, q: QuantizedModule) -> None:
        precision, why = delegation.gemm_precision(m.activation, m.output_qparams is not None)
        m.xnnpack_int8, m.xnnpack_why = precision == "int8", why
        w_q = q.weight.detach().clone()
        m.weight_min = -128 if int(w_q.min()) < -127 else -127
        m.register_buffer("weight", w_q)
        m.register_buffer("weight_zero_point", torch.zeros(w_q.shape[0], dtype=torch.int64))
        if not m.xnnpack_int8:  # quanta's integer values in float: XNNPACK's fp32 kernels
            shape = [-1] + [1] * (w_q.dim() - 1)
            m.register_buffer("weight_float", (w_q.double() * m.weight_scale.double().reshape(shape)).float())
        if m.has_bias:
            # the float the int32 bias stands for, for tracing and for XNNPACK's fp32 kernels; an
            # int8 op delegated to XNNPACK gets quanta's int32 ``bias`` itself (delegate_to_xnnpack)
            m.register_buffer("bias_float", (q.bias.double() * m.bias_scale.double()).float())

    def weight(self, m: _ExportQuantized) -> torch.Tensor:
        if not m.xnnpack_int8:
            return m.weight_float
        return self.qd.dequantize_per_channel.default(
            m.weight, m.weight_scale, m.weight_zero_point, 0, m.weight_min, 127, torch.int8)

    def bias(self, m: _ExportQuantized) -> torch.Tensor | None:
        return m.bias_float if m.has_bias else None

    def activation(self, y: torch.Tensor, activation: str, out_zero_point: int | None) -> torch.Tensor:
        if activation == "relu6":
            return F.hardtanh(y, 0.0, 6.0)  # the form XNNPACK fuses
        if activation == "silu":
            return y * torch.sigmoid(y)  # XNNPACK has sigmoid and mul, no silu
        return _activation(y, activation, out_zero_point)

    def global_pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True)  # XNNPACK's int8 global average pooling


def lower_executorch(model: torch.nn.Module, example_inputs: Any, *,
          strict: bool = False) -> tuple[Any, delegation.Delegation]:
    """The ExecuTorch program of ``model`` with XNNPACK delegation, and what was delegated.

    ``strict``: raise ``UnsupportedModelError`` naming the layer and op when any op quanta runs
    in int8 would not run in int8 in XNNPACK, or any op stays outside the delegate."""
    steps = XnnpackSteps()
    wrapper, tracker = export_twin(model, "int8", steps)
    info = delegation.Delegation()
    for name, m in wrapper.named_modules():
        if isinstance(m, _ExportQuantized) and not m.xnnpack_int8:
            info.fp32_layers.append((_layer(name), m.xnnpack_why))
    info.numerics = numerics_of(model)
    if info.numerics != "xnnpack":
        warnings.warn(delegation.NUMERICS_MISMATCH.format(numerics=info.numerics), stacklevel=2)
    if strict and info.fp32_layers:
        layer, why = info.fp32_layers[0]
        raise UnsupportedModelError(f"ExecuTorch export: layer {layer!r} cannot run int8 in XNNPACK ({why}); "
                                    f"{len(info.fp32_layers)} such layers (strict=False runs them in fp32)")
    args, kwargs = _as_args(example_inputs)
    try:
        with torch.no_grad():
            exported = torch.export.export(wrapper, args, kwargs or None, strict=False)
    except Exception as e:
        raise UnsupportedModelError(f"ExecuTorch export: torch.export failed on the model: {e}") from e
    finally:
        tracker.remove()
    edge = delegate_to_xnnpack(wrapper, exported)
    program = edge.exported_program()
    gm = program.graph_module
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("lowered_module"):
            delegation.classify_delegate(getattr(gm, node.target).original_module.graph, info)
        elif node.op == "call_function" and "executorch_call_delegate" not in str(node.target):
            op = delegation.op_name(node)
            if op not in ("getitem",) and not op.startswith(("dequantize_per", "quantize_per")):
                info.portable.append((delegation.layer_of(node), op))
    if strict and info.portable:
        layer, op = info.portable[0]
        why = delegation.XNNPACK_OPS.get(op, "no XNNPACK kernel")
        raise UnsupportedModelError(f"ExecuTorch export: XNNPACK cannot take {op!r} in {layer!r} ({why}); "
                                    f"{len(info.portable)} ops outside the delegate")
    return edge.to_executorch(), info


def delegate_to_xnnpack(module: torch.nn.Module, exported: Any) -> Any:
    """``exported`` (``torch.export`` of ``module``, which holds export-twin layers) in the edge
    dialect with its ops delegated to XNNPACK; every delegated int8 conv/linear of ``module``
    gets quanta's int32 bias (see ``_int32_bias_lowering``)."""
    from executorch.exir import to_edge_transform_and_lower

    biases = {f"{name}.bias_float": m.bias for name, m in module.named_modules()
              if isinstance(m, _ExportQuantized) and m.xnnpack_int8 and m.has_bias}
    find_program, partitioner = _int32_bias_lowering(biases)
    return to_edge_transform_and_lower(exported, transform_passes=[find_program], partitioner=[partitioner])


def _int32_bias_lowering(biases: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """A pass and XNNPACK's partitioner that hand each delegated int8 conv/linear quanta's int32
    bias instead of the float it stands for.

    XNNPACK accepts a bias only as a constant parameter, and the graph holds the float one:
    ExecuTorch quantizes it to int32 at ``x_scale * w_scale`` with ``round(b * f32(1 / scale))``
    in float32, which gives back quanta's integer only for about ``|b| < 2^22`` (15 % of biases in
    [2^22, 2^23) come back off by one, larger ones by more; BatchNorm-folded dead channels reach
    2^30). A parameter that already holds int32 is taken as it is, so once the partitioner has
    tagged a layer's float bias for XNNPACK, the program's constant is replaced by its int32.
    The partitioner itself sees a copy with fake constants and the lowering reads the real
    program's: the pass, run on the real program just before partitioning, hands it over."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult

    class Int32Bias(XnnpackPartitioner):
        program: Any = None

        def partition(self, exported_program: Any) -> Any:
            result = super().partition(exported_program)
            buffers = exported_program.graph_signature.inputs_to_buffers
            for node in result.tagged_exported_program.graph.nodes:
                key = buffers.get(node.name) if node.op == "placeholder" else None
                if key in biases and "delegation_tag" in node.meta:
                    if self.program is None or key not in self.program.state_dict:
                        raise RuntimeError(f"ExecuTorch export: cannot reach the constant {key!r}")
                    self.program.state_dict[key] = biases[key]
            return result

    partitioner = Int32Bias()

    class FindProgram(ExportedProgramPassBase):
        def call(self, exported_program: Any) -> Any:
            partitioner.program = exported_program
            return ExportedProgramPassResult(exported_program, False)

    return FindProgram(), partitioner


def _layer(name: str) -> str:
    name = name.removeprefix("twin.").removeprefix("op_sites.")
    return name


def export_executorch(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                      strict: bool = False) -> Path:
    """Write ``model`` (quantized by quanta) to ``path`` as an ExecuTorch ``.pte`` program with its
    int8 ops delegated to XNNPACK, atomically. Input shapes are those of ``example_inputs``
    (static). Ops XNNPACK cannot run in int8 run in its fp32 kernels on quanta's integer values;
    ``strict=True`` raises ``UnsupportedModelError`` naming the layer and op instead."""
    program, _ = lower_executorch(model, example_inputs, strict=strict)
    return atomic_write_bytes(path, program.buffer)


def load_pte(path: str | os.PathLike) -> Any:
    """The ``forward`` method of a ``.pte`` file in the ExecuTorch runtime's Python bindings."""
    from executorch.runtime import Runtime

    return Runtime.get().load_program(Path(path)).load_method("forward")


def run_pte(method: Any, *inputs: torch.Tensor) -> torch.Tensor:
    """One call of a loaded ``.pte`` method; the first output."""
    return method.execute(list(inputs))[0]
