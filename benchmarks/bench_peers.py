"""One builder per benchmark row: returns (run(inputs) -> float tensor, model bytes, note).

Peers run exactly as their documentation suggests for x86 CPU; they are benchmark-only (the
library never uses torch.ao / quantized dtypes). A builder that raises becomes a row saying why.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

Runner = tuple[Callable[[tuple], Any], int | None, str]


def state_bytes(model: nn.Module) -> int | None:
    buf = io.BytesIO()
    try:
        torch.save(model.state_dict(), buf)
    except Exception:  # noqa: BLE001
        return None
    return buf.tell()


def fp32_eager(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    return (lambda x: model(*x)), state_bytes(model), ""


def fp32_compile(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    compiled = torch.compile(copy.deepcopy(model))
    with torch.no_grad():
        compiled(*example)
    return (lambda x: compiled(*x)), state_bytes(model), "inductor"


def quanta_static(model: nn.Module, calib: list, example: tuple, case: Any, backend: str = "auto") -> Runner:
    import quanta

    q = quanta.quantize(model, calib, config=quanta.QuantConfig(backend=backend), show_progress=False)
    with torch.no_grad():
        q(*example)  # the first call builds the graph runtime (or says why it stays eager)
    return (lambda x: q(*x)), state_bytes(q), \
        f"backend={backend}; {_file_ratio(model, q)}; runtime: {quanta.runtime_status(q)}"


def _file_ratio(model: nn.Module, q: nn.Module) -> str:
    """quanta's own file (``quanta.save``, safetensors) against the fp32 state_dict as safetensors."""
    import safetensors.torch

    import quanta

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = os.path.join(tmp, "fp32.safetensors"), os.path.join(tmp, "int8.safetensors")
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fp32)
        quanta.save(q, int8)
        ratio = 100 * os.path.getsize(int8) / os.path.getsize(fp32)
        return f"quanta.save file {ratio:.1f}% of fp32 safetensors"


def quanta_dynamic(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    import quanta

    q = quanta.quantize(model, mode="dynamic", show_progress=False) if _accepts_progress() \
        else quanta.quantize(model, mode="dynamic")
    return (lambda x: q(*x)), state_bytes(q), "Linear dynamic"


def _accepts_progress() -> bool:
    import inspect

    from quanta.dynamic import quantize_dynamic
    return "show_progress" in inspect.signature(quantize_dynamic).parameters


def torch_ao_static(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    """torch.ao.quantization static with the x86 backend. Eager mode needs the model edited
    (QuantStub + FloatFunctional for every add); FX graph mode does it automatically, so the
    FX path (prepare_fx / convert_fx, x86 qconfig) stands in for it."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for batch in calib:
                prepared(*batch)
        q = convert_fx(prepared)
    return (lambda x: q(*x)), state_bytes(q), "FX graph mode, x86 qconfig"


def torch_ao_dynamic(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    return (lambda x: q(*x)), state_bytes(q), "Linear only"


def torchao_pt2e(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # strict export: the non-strict graph of `out += identity` with a shared ReLU module made
    # the quantizer fail ("Input partition has more than one output node")
    exported = torch.export.export(copy.deepcopy(model), example, strict=True).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    batch_size = example[0].shape[0]
    with torch.no_grad():  # the exported graph is specialised to the example's batch size
        for i in range(len(calib)):
            prepared(*case.inputs(batch_size, 1000 + i))
    converted = convert_pt2e(prepared)
    size = state_bytes(converted)
    compiled = compile_frozen(converted, example)
    return (lambda x: compiled(*x)), size, "X86InductorQuantizer, strict export, inductor freezing"


def compile_frozen(model: nn.Module, example: tuple) -> Callable:
    """``torch.compile`` with inductor freezing (torchao's recipe for pt2e int8: constant-fold
    and prepack the int8 weights), compiled by one call on ``example``."""
    import torch._inductor.config as inductor_config

    freezing, inductor_config.freezing = inductor_config.freezing, True
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(*example)
    finally:
        inductor_config.freezing = freezing
    return compiled


# ---------------------------------------------------------------- ONNX Runtime
def _onnx_path(model: nn.Module, example: tuple, case: Any, tmp: str) -> str:
    path = os.path.join(tmp, "model.onnx")
    names = ["input_ids", "attention_mask"] if case.is_transformer else ["input"]
    axes = {n: {0: "batch"} for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, path, input_names=names, output_names=["out"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def _session(path: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE":  # same waiting policy as the torch rows
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _ort_runner(path: str, case: Any) -> Callable[[tuple], Any]:
    sess = _session(path)
    names = [i.name for i in sess.get_inputs()]

    def run(x: tuple) -> torch.Tensor:
        feeds = {n: t.numpy() for n, t in zip(names, x, strict=False)}
        return torch.from_numpy(sess.run(None, feeds)[0])
    return run


class _Reader:
    def __init__(self, calib: list, names: list[str]) -> None:
        self.it = iter([{n: t.numpy() for n, t in zip(names, b, strict=False)} for b in calib])

    def get_next(self) -> dict | None:
        return next(self.it, None)


def ort_fp32(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    tmp = tempfile.mkdtemp()
    path = _onnx_path(model, example, case, tmp)
    return _ort_runner(path, case), os.path.getsize(path), "CPU EP, 2 intra-op threads"


def ort_static(model: nn.Module, calib: list, example: tuple, case: Any, reduce_range: bool = True) -> Runner:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tmp = tempfile.mkdtemp()
    path = _onnx_path(model, example, case, tmp)
    pre = os.path.join(tmp, "pre.onnx")
    try:
        with contextlib.chdir(tmp):  # ORT writes its shape-inference temp files into the cwd
            quant_pre_process(path, pre)
    except Exception:  # noqa: BLE001
        pre = path
    out = os.path.join(tmp, "int8.onnx")
    names = [i.name for i in _session(pre).get_inputs()]
    quantize_static(pre, out, _Reader(calib, names), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=reduce_range)
    return _ort_runner(out, case), os.path.getsize(out), f"QDQ U8S8 per-channel reduce_range={reduce_range}"


def ort_dynamic(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = tempfile.mkdtemp()
    path = _onnx_path(model, example, case, tmp)
    out = os.path.join(tmp, "dyn.onnx")
    quantize_dynamic(path, out, weight_type=QuantType.QInt8)
    return _ort_runner(out, case), os.path.getsize(out), "QInt8 weights"


ROWS: dict[str, Callable[..., Runner]] = {
    "torch fp32 eager": fp32_eager,
    "torch fp32 compile": fp32_compile,
    "quanta static int8": quanta_static,
    "quanta dynamic int8": quanta_dynamic,
    "torch.ao static (x86)": torch_ao_static,
    "torch.ao dynamic": torch_ao_dynamic,
    "torchao pt2e + inductor": torchao_pt2e,
    "ORT fp32": ort_fp32,
    "ORT static U8S8": ort_static,
    "ORT dynamic": ort_dynamic,
}

from bench_openvino import ROWS as OPENVINO_ROWS  # noqa: E402

ROWS.update(OPENVINO_ROWS)
