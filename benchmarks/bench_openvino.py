"""OpenVINO rows for the benchmarks: fp32, int8 by NNCF's post-training quantization, and
quanta's own QDQ ONNX export run by OpenVINO. Benchmark-only; the library never uses them.

Each builder returns (run(inputs) -> float tensor, model bytes, note), as in bench_peers.
OpenVINO runs with as many inference threads as torch (run_all sets 2) and the latency hint.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

Runner = tuple[Callable[[tuple], Any], int | None, str]


def _compile(ov_model: Any) -> Callable[[tuple], torch.Tensor]:
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: tuple) -> torch.Tensor:
        out = request.infer([t.numpy() for t in x])
        return torch.from_numpy(out[compiled.output(0)].copy())
    return run


def _convert(model: nn.Module, example: tuple) -> Any:
    import openvino as ov

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return ov.convert_model(model, example_input=example)


def _ir_bytes(ov_model: Any) -> int:
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.xml")
        ov.save_model(ov_model, path, compress_to_fp16=False)
        return os.path.getsize(path) + os.path.getsize(path[:-4] + ".bin")


def openvino_fp32(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    ov_model = _convert(model, example)
    return _compile(ov_model), _ir_bytes(ov_model), "ov.convert_model, CPU plugin, latency hint"


def openvino_nncf_int8(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    import nncf

    ov_model = _convert(model, example)
    data = nncf.Dataset(calib, lambda batch: [t.numpy() for t in batch])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = nncf.quantize(ov_model, data, subset_size=len(calib))  # every calibration batch
    return _compile(int8), _ir_bytes(int8), "NNCF PTQ (default preset), CPU plugin, latency hint"


def openvino_on_quanta_onnx(model: nn.Module, calib: list, example: tuple, case: Any) -> Runner:
    import openvino as ov

    import quanta
    from quanta.kernels import cpu

    q = quanta.quantize(model, calib, show_progress=False)
    tmp = tempfile.mkdtemp()
    # int8 weights where this CPU adds 8-bit ones exactly (VNNI/AMX): OpenVINO runs the "auto"
    # format's uint8 weights 1.6-7x slower (README, "Save, load, export")
    fmt = "int8" if cpu.exact_weight_limit() >= 128 else "auto"
    path = quanta.export_onnx(q, example, os.path.join(tmp, "quanta.onnx"), weight_format=fmt)
    ov_model = ov.Core().read_model(str(path))
    note = f"quanta's QDQ ONNX export (weight_format={fmt!r}) read by OpenVINO"
    return _compile(ov_model), os.path.getsize(path), note


ROWS: dict[str, Callable[..., Runner]] = {
    "OpenVINO fp32": openvino_fp32,
    "OpenVINO int8 (NNCF)": openvino_nncf_int8,
    "OpenVINO on quanta ONNX": openvino_on_quanta_onnx,
}
