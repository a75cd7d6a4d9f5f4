"""The main job: quantize the bundled pretrained MNIST CNN and show what int8 bought.

``run_demo`` loads the committed CNN and the real MNIST images (4,000 train / 1,000 held out),
quantizes it statically (calibration on train batches), then prints the per-layer report,
float vs int8 top-1 on the held-out images, serialized size float vs int8, and latency
float vs int8 at batch 1 and batch 100 (medians of interleaved repetitions). Run it with
``quanta demo`` or ``python -m quanta demo``.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import quanta


@dataclass(frozen=True)
class Latency:
    """Median seconds per forward call at one batch size (interleaved float/int8 runs)."""

    batch_size: int
    float_s: float
    int8_s: float
    repeats: int

    @property
    def speedup(self) -> float:
        return self.float_s / self.int8_s


@dataclass(frozen=True)
class DemoResult:
    float_accuracy: float
    int8_accuracy: float
    float_bytes: int
    int8_bytes: int
    size_method: str
    latencies: tuple[Latency, ...]
    report: Any = field(repr=False)
    seconds: float = 0.0


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def measure_latency(float_model: nn.Module, int8_model: nn.Module, batch: Any, *, repeats: int = 20,
                    warmup: int = 2, time_budget: float = 20.0) -> tuple[float, float, int]:
    """(median float seconds, median int8 seconds, repetitions) for one forward on ``batch``.

    Float and int8 runs alternate, so a noisy neighbour on a shared machine slows both alike.
    Stops early (after at least 3 repetitions) once ``time_budget`` seconds are spent.
    """
    for _ in range(warmup):
        _call(float_model, batch)
        _call(int8_model, batch)
    float_times: list[float] = []
    int8_times: list[float] = []
    start = time.perf_counter()
    for _ in range(max(repeats, 1)):
        for model, times in ((float_model, float_times), (int8_model, int8_times)):
            t0 = time.perf_counter()
            _call(model, batch)
            times.append(time.perf_counter() - t0)
        if len(float_times) >= 3 and time.perf_counter() - start > time_budget:
            break
    return statistics.median(float_times), statistics.median(int8_times), len(float_times)


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def serialized_sizes(float_model: nn.Module, int8_model: nn.Module) -> tuple[int, int, str]:
    """(float bytes, int8 bytes, how measured): safetensors of the float state_dict vs ``quanta.save``.

    Falls back to summing tensor bytes of the two state_dicts when ``quanta.save`` is missing.
    """
    save = getattr(quanta, "save", None)
    if save is None:
        return (tensor_bytes(float_model.state_dict()), tensor_bytes(int8_model.state_dict()),
                "tensor bytes of the state_dicts (quanta.save unavailable)")
    import safetensors.torch

    with tempfile.TemporaryDirectory(prefix="quanta-demo-") as tmp:
        float_path = Path(tmp) / "float.safetensors"
        int8_path = Path(tmp) / "int8.quanta.safetensors"
        state = {k: v.detach().contiguous() for k, v in float_model.state_dict().items()}
        safetensors.torch.save_file(state, str(float_path))
        save(int8_model, int8_path)
        return float_path.stat().st_size, int8_path.stat().st_size, "files on disk (safetensors)"


def resize_batch(batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch`` cut or tiled along dim 0 to ``batch_size`` rows."""
    if batch.shape[0] >= batch_size:
        return batch[:batch_size].contiguous()
    reps = -(-batch_size // batch.shape[0])
    return batch.repeat(reps, *([1] * (batch.dim() - 1)))[:batch_size].contiguous()


def run_demo(*, calib_batches: int = 10, calib_batch_size: int = 100, threads: int | None = 2,
             batch_sizes: Sequence[int] = (1, 100), repeats: int = 20, time_budget: float = 20.0,
             console: Any = None) -> DemoResult:
    """Quantize the bundled MNIST CNN statically and print report, accuracy, size and latency.

    ``threads`` sets ``torch.set_num_threads`` (None leaves it alone); ``repeats`` and
    ``time_budget`` bound the latency measurement per batch size.
    """
    from rich.console import Console
    from rich.table import Table

    from quanta.zoo.mnist import evaluate, load_mnist, load_pretrained_mnist_cnn

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    console.rule("[bold]quanta demo: static int8 quantization of a pretrained MNIST CNN")
    float_model = load_pretrained_mnist_cnn()
    train_x, _ = load_mnist("train")
    test_x, test_y = load_mnist("test")
    n_params = sum(p.numel() for p in float_model.parameters())
    console.print(f"model: MnistCNN ({n_params:,} parameters, BatchNorm + residual adds), "
                  f"data: real MNIST, {train_x.shape[0]:,} train / {test_x.shape[0]:,} held-out images")
    calib = [train_x[i * calib_batch_size:(i + 1) * calib_batch_size] for i in range(calib_batches)]
    console.print(f"calibrating on {calib_batches} batches of {calib_batch_size} train images ...")
    t0 = time.perf_counter()
    int8_model = quanta.quantize(float_model, calib, mode="static")
    console.print(f"quantized in {time.perf_counter() - t0:.1f} s\n")

    report = quanta.report(int8_model)
    console.print(str(report), markup=False, highlight=False, soft_wrap=True)

    float_acc = evaluate(float_model, test_x, test_y)
    int8_acc = evaluate(int8_model, test_x, test_y)
    float_bytes, int8_bytes, size_method = serialized_sizes(float_model, int8_model)

    latencies = []
    for bs in batch_sizes:
        f_s, q_s, n = measure_latency(float_model, int8_model, resize_batch(test_x, bs),
                                      repeats=repeats, time_budget=time_budget)
        latencies.append(Latency(bs, f_s, q_s, n))

    table = Table(title="float vs int8", title_justify="left",
                  caption=f"size: {size_method}; latency: median of interleaved runs, "
                  f"{torch.get_num_threads()} threads", caption_justify="left")
    for col in ("", "float32", "int8", "int8 vs float"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row(f"top-1 accuracy, {test_x.shape[0]:,} held-out images", f"{float_acc:.2f} %",
                  f"{int8_acc:.2f} %", f"{int8_acc - float_acc:+.2f} pp")
    share = report.coverage.share if report.coverage is not None else None
    if share is not None:
        table.add_row("conv/linear MACs that run int8", "0 %", f"{math.floor(1000 * share) / 10:.1f} %", "")
    table.add_row("model size", _kib(float_bytes), _kib(int8_bytes),
                  f"{100.0 * int8_bytes / float_bytes:.1f} % of float")
    for lat in latencies:
        table.add_row(f"latency, batch {lat.batch_size} ({lat.repeats} runs)",
                      _ms(lat.float_s), _ms(lat.int8_s), _speed(lat.speedup))
    console.print(table)
    seconds = time.perf_counter() - start
    console.print(f"int8 kernels: {_backends(report)}; cpu: {report.cpu}")
    console.print(f"runtime: {quanta.runtime_status(int8_model)}   total time: {seconds:.1f} s")
    return DemoResult(float_acc, int8_acc, float_bytes, int8_bytes, size_method, tuple(latencies),
                      report, seconds)


def _backends(report: Any) -> str:
    from quanta.kernels import native

    names = sorted({r["backend"] for r in report.rows if r.get("backend")})
    if "onednn" in names:  # say which way oneDNN is reached
        why = native.unavailable_reason()
        names[names.index("onednn")] = "onednn (native kept primitives)" if why is None \
            else f"onednn (torch.ops; native kernels unavailable: {why})"
    return ", ".join(names) or "none"


def _speed(ratio: float) -> str:
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"
