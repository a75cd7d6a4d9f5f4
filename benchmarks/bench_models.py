"""Benchmark models, inputs and calibration data (random weights; real MNIST images)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple]  # (batch, seed) -> positional inputs
    is_transformer: bool = False


def _image(shape: tuple[int, ...]) -> Callable[[int, int], tuple]:
    def make(batch: int, seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, *shape, generator=g),)
    return make


def _mnist(batch: int, seed: int) -> tuple:
    from quanta.zoo.mnist import load_mnist

    images, _ = load_mnist("test")
    start = (seed * 97) % (images.shape[0] - batch)
    return (images[start:start + batch].contiguous(),)


def _tokens(batch: int, seed: int, seq: int = 128) -> tuple:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    ids[:, 0] = 101
    return (ids, torch.ones(batch, seq, dtype=torch.int64))


def _resnet18() -> nn.Module:
    from quanta.zoo.vision import resnet18
    return resnet18().eval()


def _mobilenet_v2() -> nn.Module:
    from quanta.zoo.vision import mobilenet_v2
    return mobilenet_v2().eval()


def _minilm() -> nn.Module:
    from quanta.zoo.minilm import minilm_encoder_random
    return minilm_encoder_random().eval()


def _mnist_cnn() -> nn.Module:
    from quanta.zoo.mnist import load_pretrained_mnist_cnn
    return load_pretrained_mnist_cnn()


CASES = {
    "resnet18": ModelCase("ResNet-18", _resnet18, _image((3, 224, 224))),
    "mobilenet_v2": ModelCase("MobileNetV2", _mobilenet_v2, _image((3, 224, 224))),
    "minilm": ModelCase("MiniLM encoder (6x384, seq 128)", _minilm, _tokens, is_transformer=True),
    "mnist_cnn": ModelCase("MNIST CNN", _mnist_cnn, _mnist),
}


def calibration(case: ModelCase, batches: int = 4, batch: int = 4) -> list[tuple]:
    return [case.inputs(batch, 1000 + i) for i in range(batches)]


def rel_l2(out: Any, ref: torch.Tensor) -> float:
    out = out.float() if isinstance(out, torch.Tensor) else torch.as_tensor(out).float()
    return float((out.reshape(ref.shape) - ref).norm() / ref.norm().clamp_min(1e-12))
