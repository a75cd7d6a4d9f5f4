"""Quantized models called from several Python threads at once (a server's worker pool): every
output bit-identical to the single-threaded one, while threads share models, build their graph
runtimes concurrently on the first calls, and evict each other's cached kernels (more input
shapes than a layer keeps)."""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch
import torch.nn as nn

import quanta
from quanta.config import QuantConfig
from quanta.kernels.native import ops as native_ops
from quanta.zoo.mnist import load_mnist, load_pretrained_mnist_cnn
from quanta.zoo.vision import BasicBlock

THREADS = 4
CALLS = 60  # per thread
BATCHES = range(1, native_ops._MAX_SHAPES + 5)  # more shapes than a layer keeps: constant eviction


def _models() -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
    torch.manual_seed(0)
    train, _ = load_mnist("train")
    mnist = quanta.quantize(load_pretrained_mnist_cnn(), [train[:200]], show_progress=False)
    blocks = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), BasicBlock(16, 16),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    images = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    # eager mode on purpose: its residual add runs through the per-thread call-site mode
    eager = quanta.quantize(blocks, images, config=QuantConfig(runtime="eager"), show_progress=False)
    mlp = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 24)).eval()
    dynamic = quanta.quantize(mlp, mode="dynamic")
    lstm = quanta.quantize(nn.Sequential(nn.LSTM(24, 32, batch_first=True)).eval(), mode="dynamic")
    g = torch.Generator().manual_seed(1)
    return {
        "mnist static (graph)": (mnist, [train[200 + b:200 + 2 * b] for b in BATCHES]),
        "residual static (eager)": (eager, [torch.randn(b, 3, 16, 16, generator=g) for b in BATCHES]),
        "mlp dynamic": (dynamic, [torch.randn(b, 48, generator=g) for b in BATCHES]),
        "lstm dynamic": (lstm, [torch.randn(b, 5, 24, generator=g) for b in BATCHES]),
    }


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("threads_per_call", [1, 2])
def test_threads_models_and_evictions_are_bit_identical(threads_per_call: int) -> None:
    models = _models()
    # expected outputs from copies, single-threaded; the originals are first called by the threads
    expected = {}
    with torch.no_grad():
        for name, (model, inputs) in models.items():
            twin = copy.deepcopy(model)
            expected[name] = [_first(twin(x)) for x in inputs]
    jobs = [(name, i) for name in models for i in range(len(BATCHES))]
    start, errors, mismatches = threading.Barrier(THREADS), [], []
    previous = torch.get_num_threads()

    def worker(seed: int) -> None:
        torch.set_num_threads(threads_per_call)  # OpenMP threads of this caller
        rng = random.Random(seed)
        start.wait()
        try:
            with torch.no_grad():
                for _ in range(CALLS):
                    name, i = rng.choice(jobs)
                    model, inputs = models[name]
                    if not torch.equal(_first(model(inputs[i])), expected[name][i]):
                        mismatches.append((name, i))
        except Exception as exc:  # noqa: BLE001 - reported below with the thread's seed
            errors.append(f"thread {seed}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    torch.set_num_threads(previous)
    assert not any(w.is_alive() for w in workers), "a worker hung"
    assert not errors, errors
    assert not mismatches, f"{len(mismatches)} of {THREADS * CALLS} outputs differ, e.g. {mismatches[:3]}"
    mnist = models["mnist static (graph)"][0]
    assert quanta.runtime_status(mnist).startswith("graph")  # built once, under concurrent first calls
