"""quanta's ExecuTorch export (.pte, int8 ops in XNNPACK) against quanta in-process and against
quanta's ONNX export in ONNX Runtime, batch 1.

For each model the same quantized model (quanta.quantize, default backend, rounding as XNNPACK
does: ``numerics="xnnpack"``) is timed three ways:
the .pte in the ExecuTorch runtime's Python bindings, the model called in-process (graph
runtime), and quanta.export_onnx in ONNX Runtime (2 intra-op threads). Medians over interleaved
chunks of calls. Also: the .pte's size, what XNNPACK took (int8 / fp32 / outside), and the .pte's
agreement with the same model on quanta's integer reference kernels and with the in-process
model (fast kernels, which round a few float ties the other way), as the share of outputs within
one output quantum and top-1; against the reference also on the inputs moved onto the stem's
quantization grid (where the way a float input is quantized cannot matter).
Writes benchmarks/results/executorch.json and prints a markdown table.

    python benchmarks/bench_executorch.py [--size 224] [--models mnist resnet18 mobilenet_v2 edge]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

import quanta
from quanta.io.executorch_export import load_pte, lower_executorch, run_pte
from quanta.kernels import cpu, reference
from quanta.modules.backends import select_backends
from quanta.modules.quantized import QuantizedModule

REPS = 15
RESULTS = Path(__file__).parent / "results" / "executorch.json"


Model = tuple[str, torch.nn.Module, list[torch.Tensor], torch.Tensor]


def _models(names: list[str], size: int) -> list[Model]:
    from quanta.zoo import vision
    from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn

    gen = torch.Generator().manual_seed(0)
    out = []
    if "mnist" in names:
        x, _ = load_mnist("test")
        calib = [x[i:i + 64] for i in range(0, 512, 64)]
        out.append(("MNIST CNN", load_pretrained_mnist_cnn(), calib, x[900:908]))
    for key, name in (("resnet18", "ResNet-18"), ("mobilenet_v2", "MobileNetV2")):
        if key in names:
            model = getattr(vision, key)().eval()
            calib = [torch.randn(8, 3, size, size, generator=gen) for _ in range(2)]
            vision.calibrate_batchnorm(model, calib)
            out.append((name, model, calib, torch.randn(8, 3, size, size, generator=gen)))
    if "edge" in names:  # the sweep's same-padded depthwise net
        from quanta.zoo import architectures as arches

        arch = next(a for a in arches.SWEEP if a.name == "efficientnet_edge_small_b")
        model = arches.build(arch)
        calib = [torch.randn(8, 3, size, size, generator=gen) for _ in range(2)]
        vision.calibrate_batchnorm(model, calib)
        out.append(("EfficientNet-EdgeTPU-S", model, calib, torch.randn(8, 3, size, size, generator=gen)))
    return out


def _time(calls: dict, reps: int = REPS) -> dict[str, float]:
    chunk = {}
    for k, f in calls.items():  # warm up; size a ~50 ms chunk of calls
        f()
        start = time.perf_counter()
        f()
        chunk[k] = max(1, int(0.05 / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in calls}
    items = list(calls.items())
    for rep in range(reps):
        for k, f in items[rep % len(items):] + items[:rep % len(items)]:
            start = time.perf_counter()
            for _ in range(chunk[k]):
                f()
            times[k].append((time.perf_counter() - start) / chunk[k])
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_model(name: str, model: torch.nn.Module, calib: list[torch.Tensor], x: torch.Tensor,
                workdir: Path) -> dict:
    config = quanta.QuantConfig(numerics="xnnpack")
    q = quanta.quantize(model, calib, config=config, show_progress=False)
    one = x[:1]
    start = time.perf_counter()
    program, info = lower_executorch(q, one)
    lower_s = time.perf_counter() - start
    pte = workdir / f"{name}.pte"
    pte.write_bytes(program.buffer)
    with warnings.catch_warnings():  # timed only: ORT rounds a few values one LSB away
        warnings.filterwarnings("ignore", message="the model was quantized with numerics=")
        onnx_path = quanta.export_onnx(q, one, workdir / f"{name}.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    method = load_pte(pte)
    with torch.no_grad():
        q(one)
        ref = q(x)
        got = torch.cat([run_pte(method, x[i:i + 1]) for i in range(len(x))])
        twin = copy.deepcopy(q)  # the same model on quanta's integer reference kernels
        select_backends(twin, twin._quanta.plan, "reference")
        ref_integer = twin(x)
        # the same inputs moved onto the stem's quantization grid: XNNPACK quantizes a float input
        # as round(x * f32(1 / s)), quanta (and ONNX) as round(x / s); on the grid both are exact
        stem = next(m for m in q.modules() if isinstance(m, QuantizedModule))
        s, z = float(stem.input_scale), int(stem.input_zero_point)
        x_grid = reference.dequantize_per_tensor(reference.quantize_per_tensor(x, s, z), s, z)
        got_grid = torch.cat([run_pte(method, x_grid[i:i + 1]) for i in range(len(x))])
        ref_grid = twin(x_grid)
        last = [n for n, m in q.named_modules() if hasattr(m, "weight_scale")][-1]
        quantum = float(q.get_submodule(last).output_scale)
        feed = {"input": one.numpy()}
        ms = _time({"pte": lambda: run_pte(method, one), "quanta": lambda: q(one),
                    "ort": lambda: session.run(None, feed)})
    return {"model": name, "pte_ms": ms["pte"], "quanta_ms": ms["quanta"], "ort_ms": ms["ort"],
            "pte_kib": pte.stat().st_size / 1024, "onnx_kib": onnx_path.stat().st_size / 1024,
            "lower_s": lower_s, "delegation": info.to_dict(),
            **_agreement(got, ref, quantum), **_agreement(got, ref_integer, quantum, "reference_"),
            **_agreement(got_grid, ref_grid, quantum, "reference_grid_")}


def _agreement(got: torch.Tensor, want: torch.Tensor, quantum: float, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}within_one_quantum": float(((got - want).abs() <= quantum * 1.0001).float().mean()),
            f"{prefix}top1_agreement": float((got.argmax(1) == want.argmax(1)).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="vision input side")
    parser.add_argument("--models", nargs="+", default=["mnist", "resnet18", "mobilenet_v2", "edge"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(*m, Path(tmp)) for m in _models(args.models, args.size)]
    import executorch

    meta = {"executorch": getattr(executorch, "__version__", "1.5.1"), "onnxruntime": ort.__version__,
            "torch": torch.__version__, "machine": platform.machine(), "threads": 2, "reps": REPS,
            "size": args.size, "batch": 1,
            "cpu": cpu.model_name(),
            "note": "vision models: random weights, BatchNorm statistics from the calibration images; "
                    "quantized with numerics='xnnpack'"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| model | .pte ms | quanta ms | ORT ms | .pte KiB | XNNPACK int8/fp32/outside | within 1q of "
          "reference: grid inputs / random / in-process | top-1 reference / in-process |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["delegation"]["counts"]
        print(f"| {r['model']} | {r['pte_ms']:.2f} | {r['quanta_ms']:.2f} | {r['ort_ms']:.2f} | "
              f"{r['pte_kib']:.1f} | {c['int8']}/{c['fp32']}/{c['portable']} | "
              f"{100 * r['reference_grid_within_one_quantum']:.1f} % / "
              f"{100 * r['reference_within_one_quantum']:.1f} % / {100 * r['within_one_quantum']:.1f} % | "
              f"{r['reference_top1_agreement']:.2f} / {r['top1_agreement']:.2f} |")


if __name__ == "__main__":
    main()
