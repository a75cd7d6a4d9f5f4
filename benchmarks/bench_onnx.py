"""quanta's QDQ export vs ONNX Runtime's own quantize_static, both run in ONNX Runtime.

For each model: the float model exported to ONNX (fp32 baseline), ORT's quantize_static
(QDQ, U8S8, per-channel) of that float model, and quanta.export_onnx of quanta's quantized
model, both calibrated on the same batches. Latency: 2 intra-op threads, medians over
interleaved repetitions. Error: relative L2 distance of the outputs to the fp32 PyTorch model.
Writes benchmarks/results/onnx.json and prints a markdown table.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

import quanta
from quanta.kernels import cpu

REPS = 15
RESULTS = Path(__file__).parent / "results" / "onnx.json"


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.items = iter([{"input": b.numpy()} for b in batches])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _models() -> list[tuple[str, torch.nn.Module, list[torch.Tensor], torch.Tensor]]:
    from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn
    from quanta.zoo.vision import mobilenet_v2, resnet18

    gen = torch.Generator().manual_seed(0)
    x, _ = load_mnist("test")
    out = [("MNIST CNN", load_pretrained_mnist_cnn(), [x[i:i + 64] for i in range(0, 512, 64)], x[900:908])]
    for name, factory in (("ResNet-18", resnet18), ("MobileNetV2", mobilenet_v2)):
        calib = [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(4)]
        out.append((name, factory().eval(), calib, torch.randn(8, 3, 224, 224, generator=gen)))
    return out


def _exportable_float(model: torch.nn.Module) -> torch.nn.Module:
    """The float model with AdaptiveAvgPool2d swapped for quanta's ONNX-exportable equivalent
    (plain torch export rejects 7x7 -> 3x3 adaptive pooling in the MNIST CNN)."""
    import copy

    from quanta.io.onnx_export import _ExportAdaptiveAvgPool2d

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.AdaptiveAvgPool2d):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    _ExportAdaptiveAvgPool2d(m.output_size))
    return model


def _rel_l2(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def bench_model(name: str, model: torch.nn.Module, calib: list[torch.Tensor], x: torch.Tensor,
                workdir: Path) -> list[dict]:
    fp32_path, ort_path, quanta_path = (workdir / f"{name}-{k}.onnx" for k in ("fp32", "ort", "quanta"))
    torch.onnx.export(_exportable_float(model), (calib[0][:1],), str(fp32_path), dynamo=False,
                      opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    pre_path = workdir / f"{name}-pre.onnx"
    with contextlib.chdir(workdir):  # ORT writes its shape-inference temp files into the cwd
        quant_pre_process(str(fp32_path), str(pre_path))  # ORT's recommended step (folds BatchNorm)
    quantize_static(str(pre_path), str(ort_path), _Reader(calib), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    qmodel = quanta.quantize(model, calib, show_progress=False)
    quanta.export_onnx(qmodel, calib[0][:1], quanta_path)
    sessions = {"fp32": _session(fp32_path), "ort_quantize_static": _session(ort_path),
                "quanta_export": _session(quanta_path)}
    with torch.no_grad():
        ref = model(x).numpy()
    rows = []
    for batch in (1, 8):
        feed = {"input": x[:batch].numpy()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        chunk = {}
        for k, s in sessions.items():  # warm up; size a ~50 ms chunk of calls per session
            s.run(None, feed)
            start = time.perf_counter()
            s.run(None, feed)
            chunk[k] = max(1, int(0.05 / max(time.perf_counter() - start, 1e-6)))
        # Each repetition times a chunk of consecutive calls per session, rotating the order:
        # single interleaved calls let the other sessions' still-spinning ORT thread pools
        # compete for the 2 cores (measured 4-8x slower ResNet-18 rows than run_all.py's).
        for rep in range(REPS):
            items = list(sessions.items())
            for k, s in items[rep % len(items):] + items[:rep % len(items)]:
                start = time.perf_counter()
                for _ in range(chunk[k]):
                    s.run(None, feed)
                times[k].append((time.perf_counter() - start) / chunk[k])
        for k, s in sessions.items():
            rows.append({
                "model": name, "batch": batch, "variant": k,
                "latency_ms": 1e3 * statistics.median(times[k]),
                "rel_l2_vs_fp32": _rel_l2(s.run(None, {"input": x.numpy()})[0], ref),
                "file_bytes": {"fp32": fp32_path, "ort_quantize_static": ort_path,
                               "quanta_export": quanta_path}[k].stat().st_size,
            })
    return rows


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, calib, x in _models():
            rows += bench_model(name, model, calib, x, Path(tmp))
    meta = {"onnxruntime": ort.__version__, "torch": torch.__version__, "machine": platform.machine(),
            "vnni": cpu.has_vnni(), "threads": 2, "reps": REPS,
            "note": "vision models use random weights and random calibration data (224x224)"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"ONNX Runtime {ort.__version__}, 2 threads, VNNI={meta['vnni']}\n")
    print("| model | batch | variant | latency ms | rel. L2 vs fp32 | file MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['latency_ms']:.2f} | "
              f"{r['rel_l2_vs_fp32']:.4f} | {r['file_bytes'] / 2**20:.2f} |")


if __name__ == "__main__":
    main()
